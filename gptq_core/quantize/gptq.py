"""GPTQ for one linear layer (Frantar et al. 2022): Hessian accumulation and the quantizer.

Given the layer's weight W [N, K] and the Hessian H = 2/n X X^T of its inputs X [K, n], GPTQ
quantizes the columns of W one at a time and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian, so that ``||W X - Q X||`` stays
small. Implemented from the paper:

* damping: ``H += damp * mean(diag H) * I``; when the Cholesky factorisation fails the damp
  grows by ``config.damp_auto_increment`` until it succeeds (the damp used is reported);
* dead inputs (``H[i, i] == 0``: a channel that is always zero) get ``H[i, i] = 1`` and a zero
  weight column;
* act-order (``desc_act``): columns in order of decreasing ``diag(H)``; ``g_idx`` then maps each
  input channel to its group and is not monotonic;
* group-aware order (``act_group_aware``): whole groups in order of their largest
  ``diag(H)``, and inside each group its columns in decreasing ``diag(H)``; every group stays
  contiguous in that order, so its grid is computed when it comes up (as without act-order)
  and ``g_idx`` stays monotone;
* ``static_groups``: every group's grid is fixed up front from the unpermuted weight;
* float target (``float_target`` = a): when the accumulator also saw the float model's inputs
  X of the layer (the quantized model feeds it X~), the weight GPTQ rounds is first moved to
  ``W + a W D Hd^-1`` with ``D = (X - X~) X~^T`` and Hd the damped ``X~ X~^T``: at a = 1 the
  least-squares weight whose output on X~ best matches the float output W X, so GPTQ then
  minimises ``||W X - Q X~||`` (the asymmetric calibration of GPTAQ, Li et al. 2025, by this
  projection instead of their per-column correction);
* otherwise a group's grid is computed when its first column comes up, from the group's
  weights *as updated so far* (the in-flight lazy updates included, so any group size works,
  also groups that straddle blocks or K not divisible by the group size);
* blocked lazy updates (``block_size`` columns at a time, 128 by default).

Everything runs in float32 on ``device`` (CPU or CUDA) and is deterministic.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config import QuantizeConfig
from ..errors import FormatError, GPTQError
from ..format import PackedWeight, num_groups, pack_weight
from ..rtn import quantize_values
from . import column_kernel
from .params import GridSpec, dequantize_values, group_params

logger = logging.getLogger("gptq_core.quantize")

DEFAULT_BLOCK_SIZE = 128


@dataclass
class LinearStats:
    """What happened while quantizing one linear; one line of the quantization log.

    ``error`` is GPTQ's own loss ``sum((w - q)^2 / [H^-1]_ii^2) / 2`` (the Hessian-weighted
    output error the algorithm minimises); ``damp`` the damp percent actually used; ``tokens``
    the number of calibration rows seen; ``warning`` is set when the RTN fallback was used.
    """

    error: float
    damp: float
    seconds: float
    tokens: int
    warning: str | None = None

    @property
    def fallback(self) -> bool:
        return self.warning is not None

    def to_dict(self) -> dict:
        return {**asdict(self), "fallback": self.fallback}


class GPTQ:
    """Accumulates the Hessian ``H = 2/n X X^T`` of one linear's inputs, batch by batch.

    ``add_batch`` takes the layer's input [..., K] (any leading dims); rows are tokens. The
    running mean is kept in ``dtype`` (float32 by default, float64 for extra headroom). Given
    the float model's input of the same rows too (``reference``), it also accumulates
    ``D = 2/n (X_ref - X)^T X`` for the float target (module docstring).
    """

    def __init__(
        self,
        in_features: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.D: torch.Tensor | None = None
        self.nsamples = 0

    @classmethod
    def for_linear(cls, layer: nn.Linear, dtype: torch.dtype = torch.float32) -> GPTQ:
        return cls(layer.in_features, device=layer.weight.device, dtype=dtype)

    def add_batch(self, inputs: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Fold the rows of ``inputs`` [..., K] into the Hessian (and, with the float model's
        ``reference`` input of the same rows, into ``D``). Either every batch has a reference
        or none does."""
        if inputs.shape[-1] != self.in_features:
            raise GPTQError(
                f"input has {inputs.shape[-1]} features, this Hessian is for K={self.in_features}"
            )
        if reference is not None and reference.shape != inputs.shape:
            raise GPTQError(
                f"the float reference input has shape {tuple(reference.shape)}, the input "
                f"{tuple(inputs.shape)}: they must be the same rows"
            )
        if (reference is not None) != (self.D is not None) and self.nsamples:
            raise GPTQError("give a float reference input with every batch or with none")
        x = inputs.detach().reshape(-1, self.in_features)
        rows = x.shape[0]
        if rows == 0:
            return
        # NaN/Inf rows poison H, which quantize_linear checks once (cheaper than per batch).
        total = self.nsamples + rows
        if _half_gram(x, self.H):
            self._add_half(x, reference, self.nsamples / total, 2.0 / total)
            self.nsamples = total
            return
        x = x.to(device=self.H.device, dtype=self.H.dtype)
        keep, scale = self.nsamples / total, math.sqrt(2.0 / total)
        self.H.mul_(keep)
        x = x.mul(scale)
        self.H.addmm_(x.t(), x)
        if reference is not None:
            if self.D is None:
                self.D = torch.zeros_like(self.H)
            ref = reference.detach().reshape(-1, self.in_features).to(device=self.H.device, dtype=self.H.dtype)
            self.D.mul_(keep).addmm_(ref.mul(scale).sub_(x).t(), x)
        self.nsamples = total

    def _add_half(self, x: torch.Tensor, reference: torch.Tensor | None, keep: float, alpha: float) -> None:
        """The CUDA path for fp16/bf16 inputs: ``X^T X`` on the tensor cores with float32
        accumulation (the products of two 16-bit floats are exact in float32), ten times the
        float32 matmul's rate on an H200, where the float32 Hessians of a 7B layer's 128 x 2048
        calibration tokens took over a second (docs/DESIGN.md §6). ``D`` is ``X_ref^T X - X^T X``
        from the same two products."""
        x = x.to(self.H.device)
        gram = torch.mm(x.t(), x, out_dtype=torch.float32)
        self.H.mul_(keep).add_(gram, alpha=alpha)
        if reference is not None:
            if self.D is None:
                self.D = torch.zeros_like(self.H)
            ref = reference.detach().reshape(-1, self.in_features).to(device=self.H.device, dtype=x.dtype)
            cross = torch.mm(ref.t(), x, out_dtype=torch.float32).sub_(gram)
            self.D.mul_(keep).add_(cross, alpha=alpha)

    def quantize(
        self,
        weight: torch.Tensor | nn.Linear,
        config: QuantizeConfig,
        bias: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[PackedWeight, LinearStats]:
        """:func:`quantize_linear` with this Hessian."""
        return quantize_linear(weight, self, config, bias, **kwargs)


def _half_gram(x: torch.Tensor, H: torch.Tensor) -> bool:
    """Whether ``X^T X`` can run on the tensor cores: fp16/bf16 CUDA inputs, a float32 Hessian
    on the same device, and a torch with ``mm(..., out_dtype=)``. The CPU keeps the float32
    product (bytes pinned by the tests)."""
    return (x.is_cuda and H.is_cuda and x.device == H.device and H.dtype == torch.float32
            and x.dtype in (torch.float16, torch.bfloat16) and _MM_OUT_DTYPE)


#: torch.mm's ``out_dtype`` overload (CUDA, torch >= 2.8).
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


# ---------------------------------------------------------------------------- public API
def quantize_linear(
    weight: torch.Tensor | nn.Linear,
    hessian: torch.Tensor | GPTQ | None = None,
    config: QuantizeConfig | None = None,
    bias: torch.Tensor | None = None,
    *,
    inputs: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[PackedWeight, LinearStats]:
    """Quantize one linear layer with GPTQ into the GPTQ format.

    ``weight`` is an ``nn.Linear`` (its bias is kept) or a weight [N, K]. Give either its
    ``hessian`` ([K, K] tensor or a :class:`GPTQ` accumulator) or sample ``inputs`` [..., K].
    With neither, or when no calibration token reached the layer (an MoE expert nobody was
    routed to), the layer is round-to-nearest quantized with the same grid rules and
    ``stats.warning`` says so. Work happens on ``device`` (default: the weight's); the result
    is on the CPU. The caller's tensors are not modified.
    """
    config = config or QuantizeConfig()
    if isinstance(weight, nn.Linear):
        if bias is None and weight.bias is not None:
            bias = weight.bias
        weight = weight.weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise FormatError("weight must be an nn.Linear or a 2-D tensor [out_features, in_features]")
    N, K = weight.shape
    device = torch.device(device) if device is not None else weight.device
    if device.type == "cuda":
        # the log's seconds are this linear's: the Hessian pass queued before is not billed here
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    H, tokens = _resolve_hessian(hessian, inputs, K, device)
    cross = hessian.D if isinstance(hessian, GPTQ) and config.float_target > 0 else None
    W = weight.detach().to(device=device, dtype=torch.float32, copy=True)
    if not bool(torch.isfinite(W).all()):
        raise FormatError("weight contains NaN or Inf; it cannot be quantized")
    if block_size <= 0:
        raise GPTQError(f"block_size must be positive, got {block_size}")

    warning = None
    if H is None or tokens == 0:
        warning = (
            "no calibration inputs reached this layer; quantized with round-to-nearest "
            "(GPTQ needs its inputs' Hessian)"
        )
        H = torch.eye(K, device=device)
    if cross is not None and warning is None:
        cross = cross.detach().to(device=device, dtype=torch.float32)
    else:
        cross = None
    result = _gptq(W, H, config, block_size, cross)
    # packed where it was computed: only the packed bytes (an eighth of the int32 ints at 4 bits)
    # cross to the host, and integer packing is the same bytes on any device
    packed = pack_weight(
        result.q,
        result.scales,
        result.zeros,
        bits=config.bits,
        group_size=config.group_size,
        g_idx=result.g_idx,
        sym=config.sym,
        desc_act=config.desc_act,
        bias=None if bias is None else bias.detach().to(device),
        zero_format=config.zero_format,
    ).to("cpu")
    stats = LinearStats(
        error=result.error,
        damp=result.damp,
        seconds=time.perf_counter() - start,
        tokens=tokens,
        warning=warning,
    )
    return packed, stats


def _resolve_hessian(
    hessian: torch.Tensor | GPTQ | None, inputs: torch.Tensor | None, K: int, device: torch.device
) -> tuple[torch.Tensor | None, int]:
    """(float32 Hessian on ``device`` or None, number of token rows behind it)."""
    if hessian is not None and inputs is not None:
        raise GPTQError("give either hessian= or inputs=, not both")
    if inputs is not None:
        acc = GPTQ(K, device=device)
        acc.add_batch(inputs)
        hessian = acc
    if hessian is None:
        return None, 0
    if isinstance(hessian, GPTQ):
        H, tokens = hessian.H, hessian.nsamples
    elif isinstance(hessian, torch.Tensor):
        H, tokens = hessian, -1  # unknown count: trust the caller's Hessian
    else:
        raise GPTQError(
            f"hessian must be a [K, K] tensor or a GPTQ accumulator, got {type(hessian).__name__}"
        )
    if tuple(H.shape) != (K, K):
        hint = " (sample inputs go in inputs=)" if H.dim() >= 1 and H.shape[-1] == K else ""
        raise GPTQError(f"hessian has shape {tuple(H.shape)}, a layer with K={K} needs ({K}, {K}){hint}")
    H = H.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(H).all()):
        raise GPTQError(
            "the Hessian contains NaN or Inf: the layer's calibration activations had NaN/Inf; "
            "check the model's weights and the dtype it runs in (fp16 overflow: quantize in "
            "bfloat16 or float32)"
        )
    return H, tokens


# ---------------------------------------------------------------------------- algorithm
@dataclass
class _Result:
    q: torch.Tensor  # int32 [N, K], original column order
    scales: torch.Tensor  # float [G, N]
    zeros: torch.Tensor  # int32 [G, N]
    g_idx: torch.Tensor  # int32 [K]
    error: float
    damp: float


def _inverse_hessian(H: torch.Tensor, config: QuantizeConfig) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising the damp until it factorises."""
    mean_diag = float(torch.mean(torch.diag(H)))
    damp = config.damp_percent
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    tried = []
    while damp < 1.0 + 1e-12:
        tried.append(damp)
        L, info = torch.linalg.cholesky_ex(H + (damp * mean_diag) * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                if len(tried) > 1:
                    logger.info(
                        "Cholesky failed at damp %.4f; succeeded at damp %.4f", tried[0], damp
                    )
                return U, damp
        if config.damp_auto_increment <= 0:
            break
        damp = round(damp + config.damp_auto_increment, 10)
    raise GPTQError(
        f"the Hessian is not positive definite even with damp_percent={tried[-1]:.4f} "
        f"(tried {len(tried)} value(s) from {tried[0]}); raise damp_percent or set "
        "damp_auto_increment > 0, and check the calibration data (too few tokens?)"
    )


def group_aware_order(importance: torch.Tensor, width: int) -> torch.Tensor:
    """Column order of group-aware reordering: groups of ``width`` consecutive columns by
    decreasing largest ``importance`` in the group, each group's columns by decreasing
    importance (ties keep the original order); every group stays contiguous."""
    K = importance.shape[0]
    group = torch.arange(K, device=importance.device) // width
    peak = torch.full((int(group[-1]) + 1,), float("-inf"), device=importance.device)
    peak = peak.scatter_reduce(0, group, importance.float(), reduce="amax")
    group_rank = torch.argsort(torch.argsort(peak, descending=True, stable=True), stable=True)
    within = torch.argsort(importance, descending=True, stable=True)  # global importance order
    # stable sort by the group's rank keeps each group's columns in importance order
    return within[torch.argsort(group_rank[group[within]], stable=True)]


def _group_spans(col_group: list[int]) -> dict[int, int]:
    """{first position: end position} of every run of equal groups in processing order."""
    spans, start = {}, 0
    for pos in range(1, len(col_group) + 1):
        if pos == len(col_group) or col_group[pos] != col_group[start]:
            spans[start] = pos
            start = pos
    return spans


def _gptq(
    W: torch.Tensor, H: torch.Tensor, config: QuantizeConfig, block_size: int,
    cross: torch.Tensor | None = None, use_kernel: bool | None = None,
) -> _Result:
    """The GPTQ column loop on float32 ``W`` [N, K] (modified) and ``H`` [K, K]; ``cross``:
    the float target's ``D`` (module docstring); ``use_kernel``: the Triton column kernel
    (default: on CUDA devices where Triton is importable)."""
    N, K = W.shape
    gs = config.group_size
    grid = GridSpec(
        bits=config.bits,
        sym=config.sym,
        zero_floor=1 if (not config.sym and config.zero_format == "v1") else 0,
        mse=config.mse,
    )
    G = num_groups(K, gs)
    width = K if gs == -1 else gs
    dev = W.device

    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.zeros(G, N, device=dev)
    zeros = torch.zeros(G, N, device=dev)
    static = config.static_groups or gs == -1
    if static:  # every grid fixed up front from the unpermuted (dead-zeroed) weight
        for g in range(G):
            scales[g], zeros[g] = group_params(W[:, g * width : (g + 1) * width], grid)

    perm = None
    if config.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    elif config.act_group_aware:
        perm = group_aware_order(torch.diag(H), width)
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
        if cross is not None:
            cross = cross[perm][:, perm]
    # group of each (permuted) column position: act-order's groups are runs of the processing
    # order, the others' (group-aware, static) are the original column blocks
    orig = perm if perm is not None else torch.arange(K, device=dev)
    col_group = orig // width if (static or config.act_group_aware) else torch.arange(K, device=dev) // width
    col_group_list = col_group.tolist()
    spans = {} if static else _group_spans(col_group_list)

    Hinv, damp = _inverse_hessian(H, config)
    if cross is not None and config.float_target > 0:
        # W + a (W D) Hd^-1 with Hd^-1 = Hinv^T Hinv (Hinv is the upper Cholesky factor)
        W += config.float_target * ((W @ cross) @ Hinv.t()) @ Hinv
        W[:, dead[perm] if perm is not None else dead] = 0
    Q = torch.zeros_like(W)
    losses = torch.zeros(N, device=dev)
    # On a GPU the column loop runs as one Triton kernel per span of columns (.column_kernel);
    # the torch loop below is the reference it is tested against, and the CPU's path.
    kernel = use_kernel if use_kernel is not None else column_kernel.available(dev)
    if kernel:
        block_size = min(block_size, column_kernel.MAX_BLOCK)
        col_group_kernel = col_group.to(torch.int32)
        maxq = 2**config.bits - 1
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        def start_group(i: int) -> None:
            """The grid of the group starting at block column ``i``, from the weights as
            updated so far (the part past this block with the block's pending update)."""
            col = i1 + i
            end = spans[col]
            current = W1[:, i : min(end, i2) - i1]
            if end > i2:  # the rest of the group still awaits this block's lazy update
                rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:col, i2:end]
                current = torch.cat([current, rest], dim=1)
            g = col_group_list[col]
            scales[g], zeros[g] = group_params(current, grid)

        if kernel:
            # one launch per run of columns whose grids are known when it starts
            bounds = sorted({0, i2 - i1, *(c - i1 for c in range(i1, i2) if c in spans)})
            block_groups = col_group_kernel[i1:i2].contiguous()
            hinv_block = Hinv1.contiguous()  # [B, B]: one small copy, plain row stride
            for a, b in zip(bounds, bounds[1:]):
                if a + i1 in spans:
                    start_group(a)
                column_kernel.quantize_span(W1, hinv_block, Q1, Err1, losses, scales, zeros, block_groups,
                                            a, b, maxq)
        else:
            for i in range(i2 - i1):
                col = i1 + i
                g = col_group_list[col]
                if col in spans:
                    start_group(i)
                s, z = scales[g], zeros[g]
                w = W1[:, i]
                d = Hinv1[i, i]
                q = quantize_values(w, s, z, config.bits)
                err = (w - dequantize_values(q, s, z)) / d
                Q1[:, i] = q
                losses += err.square()
                W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
                Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        col_group = col_group[inv]
    return _Result(
        q=Q.to(torch.int32),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=col_group.to(torch.int32),
        error=float(losses.sum()) / 2,
        damp=damp,
    )
