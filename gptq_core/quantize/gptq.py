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
* ``static_groups``: every group's grid is fixed up front from the unpermuted weight;
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
    running mean is kept in ``dtype`` (float32 by default, float64 for extra headroom).
    """

    def __init__(
        self,
        in_features: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.nsamples = 0

    @classmethod
    def for_linear(cls, layer: nn.Linear, dtype: torch.dtype = torch.float32) -> GPTQ:
        return cls(layer.in_features, device=layer.weight.device, dtype=dtype)

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Fold the rows of ``inputs`` [..., K] into the Hessian."""
        if inputs.shape[-1] != self.in_features:
            raise GPTQError(
                f"input has {inputs.shape[-1]} features, this Hessian is for K={self.in_features}"
            )
        x = inputs.detach().reshape(-1, self.in_features)
        rows = x.shape[0]
        if rows == 0:
            return
        # NaN/Inf rows poison H, which quantize_linear checks once (cheaper than per batch).
        x = x.to(device=self.H.device, dtype=self.H.dtype)
        total = self.nsamples + rows
        self.H.mul_(self.nsamples / total)
        x = x.mul(math.sqrt(2.0 / total))
        self.H.addmm_(x.t(), x)
        self.nsamples = total

    def quantize(
        self,
        weight: torch.Tensor | nn.Linear,
        config: QuantizeConfig,
        bias: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[PackedWeight, LinearStats]:
        """:func:`quantize_linear` with this Hessian."""
        return quantize_linear(weight, self, config, bias, **kwargs)


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
    start = time.perf_counter()
    config = config or QuantizeConfig()
    if isinstance(weight, nn.Linear):
        if bias is None and weight.bias is not None:
            bias = weight.bias
        weight = weight.weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise FormatError("weight must be an nn.Linear or a 2-D tensor [out_features, in_features]")
    N, K = weight.shape
    device = torch.device(device) if device is not None else weight.device
    H, tokens = _resolve_hessian(hessian, inputs, K, device)
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
    result = _gptq(W, H, config, block_size)
    packed = pack_weight(
        result.q.cpu(),
        result.scales.cpu(),
        result.zeros.cpu(),
        bits=config.bits,
        group_size=config.group_size,
        g_idx=result.g_idx.cpu(),
        sym=config.sym,
        desc_act=config.desc_act,
        bias=None if bias is None else bias.detach().cpu(),
        zero_format=config.zero_format,
    )
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


def _gptq(W: torch.Tensor, H: torch.Tensor, config: QuantizeConfig, block_size: int) -> _Result:
    """The GPTQ column loop on float32 ``W`` [N, K] (modified) and ``H`` [K, K]."""
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
        W = W[:, perm]
        H = H[perm][:, perm]
    # group of each (permuted) column position
    if static:
        orig = perm if perm is not None else torch.arange(K, device=dev)
        col_group = orig // width
    else:
        col_group = torch.arange(K, device=dev) // width
    col_group_list = col_group.tolist()

    Hinv, damp = _inverse_hessian(H, config)
    Q = torch.zeros_like(W)
    losses = torch.zeros(N, device=dev)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col_group_list[col]
            if not static and col % width == 0:
                end = min(col + width, K)
                current = W1[:, i : min(end, i2) - i1]
                if end > i2:  # the rest of the group still awaits this block's lazy update
                    rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:col, i2:end]
                    current = torch.cat([current, rest], dim=1)
                scales[g], zeros[g] = group_params(current, grid)
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
