"""The backward pass through a quantized linear, once for every backend.

A quantized weight is frozen (LoRA and the like train adapters beside it), so the only
gradient a :class:`~gptq_core.quant_linear.QuantLinear` owes is its input's: ``dX = dY @ W``.
Instead of a transposed kernel per backend, the core dequantizes W from the layer's own GPTQ
tensors (docs/DESIGN.md §2), in the activation dtype on the layer's device, and lets the
device's GEMM do the product (fp32 accumulation for fp16/bf16 on GPUs). The forward still
runs the bound backend's fast ``qmatmul`` (docs/DESIGN.md §3): :class:`QuantMatmul` is an
autograd function around it, used only when a gradient is wanted, so inference keeps its
lean path.

W is dequantized on every backward call unless the layers share a :class:`DequantBudget`
(:class:`TrainingOptions.dequant_cache_mb`): then the first backward of each layer keeps its
dequantized copy while the budget lasts. Layers are kept in the order they first ask
(no eviction): a training step visits every layer once per step in the same order, so
evicting would only trade one layer's copy for another's.

Under ``torch.compile`` the backward dequantizes inline (the cache is Python state a traced
graph must not bake in), so inductor can fuse the dequantization into few kernels.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import GPTQError
from .format import PackedWeight, ZeroFormat
from .options import BackendOptions, OptionsError, option
from .packing import unpack_cols, unpack_rows

#: Largest dequantized block (elements) built at once when nothing is cached: a 7B-sized
#: layer (11008 x 4096, 45M) in one piece, a 70B MLP (28672 x 8192) in four.
MAX_BLOCK_ELEMENTS = 1 << 26

_MB = 1 << 20


@dataclass(frozen=True)
class TrainingOptions(BackendOptions):
    """How the backward pass of quantized layers spends memory (docs/DESIGN.md §12); parsed
    like a backend's options (:meth:`BackendOptions.parse`)."""

    LISTED_BY: typing.ClassVar[str] = "see gptq_core.training.TrainingOptions"

    dequant_cache_mb: float = option(
        0.0,
        "memory (MiB, per model) for dequantized weight copies reused by every backward pass; "
        "0 dequantizes on each backward call (slower, no extra memory)",
    )

    def __post_init__(self) -> None:
        if self.dequant_cache_mb < 0:
            raise OptionsError(
                f"training option dequant_cache_mb={self.dequant_cache_mb} is negative; "
                "use 0 (no cache) or a size in MiB"
            )

    @classmethod
    def of(cls, values: TrainingOptions | Mapping[str, Any] | None = None) -> TrainingOptions:
        """An instance as it is, else :meth:`parse` of a mapping such as
        ``{"dequant_cache_mb": 2048}``."""
        return values if isinstance(values, cls) else cls.parse(values)


class DequantBudget:
    """Bytes of dequantized weight copies that the layers sharing this budget may keep."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = int(limit_bytes)
        self.used = 0

    @classmethod
    def of(cls, options: TrainingOptions) -> DequantBudget | None:
        """The budget ``options`` ask for, or None (nothing cached)."""
        limit = int(options.dequant_cache_mb * _MB)
        return cls(limit) if limit > 0 else None

    def reserve(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)

    def __repr__(self) -> str:
        return f"DequantBudget(used={self.used / _MB:.1f} MiB of {self.limit / _MB:.1f} MiB)"


def dequantize_rows(
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    k0: int,
    k1: int,
    dtype: torch.dtype,
    group_rows: int | None = None,
) -> torch.Tensor:
    """Rows ``[k0, k1)`` of the dequantized weight W.T, ``[k1-k0, N]`` in ``dtype``.

    ``zeros`` are the real zero points ``[G, N]`` (``PackedWeight.zeros()``) and ``k0`` is a
    multiple of 32 (a period of every bit width). 2/4/8-bit words are split by one broadcast
    shift instead of :func:`~gptq_core.packing.unpack_rows`' loop over the 32 positions.
    ``group_rows`` (see :func:`contiguous_groups`) says that group g holds rows
    ``[g*group_rows, (g+1)*group_rows)``: zero points and scales are then broadcast over the
    block's groups instead of gathered per row (two fewer passes over K x N).
    ``q - z`` is exact in every float dtype (integers of at most 9 bits); the product with the
    scale is rounded once (for bf16 it is formed in fp32: the fp16 scale does not fit bf16).
    """
    N = qweight.shape[1]
    if 32 % bits == 0:
        per = 32 // bits
        words = qweight[k0 // per: -(-k1 // per)]
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
        q = (words.unsqueeze(1) >> shifts.view(1, per, 1)).bitwise_and_((1 << bits) - 1)
        q = q.reshape(-1, N)[: k1 - k0]
    else:
        q = unpack_rows(qweight[k0 * bits // 32: -(-k1 * bits // 32)], bits, k1 - k0)
    work = torch.float32 if dtype == torch.bfloat16 else dtype
    rows = k1 - k0
    w = q.to(work)  # a new tensor: the arithmetic below is in place (fewer passes' allocations)
    if group_rows is not None and k0 // group_rows == (k1 - 1) // group_rows:  # one group
        g = k0 // group_rows
        w.sub_(zeros[g: g + 1].to(work)).mul_(scales[g: g + 1].to(work))
    elif group_rows is not None and k0 % group_rows == 0 and rows % group_rows == 0:
        g0, count = k0 // group_rows, rows // group_rows
        blocks = w.view(count, group_rows, N)
        blocks.sub_(zeros[g0: g0 + count].to(work).unsqueeze(1))
        blocks.mul_(scales[g0: g0 + count].to(work).unsqueeze(1))
    else:
        g = g_idx[k0:k1].long()
        w.sub_(zeros.index_select(0, g).to(work)).mul_(scales.index_select(0, g).to(work))
    return w.to(dtype)


def contiguous_groups(g_idx: torch.Tensor, group_size: int) -> int | None:
    """The rows per group when ``g_idx`` is the default ``k // group_size`` (group -1: one
    group of all K rows), else None (act-order). One comparison on the layer's device, made
    once per layer; a traced graph gets None (it must not branch on values)."""
    if torch.compiler.is_compiling():
        return None
    K = g_idx.shape[0]
    size = K if group_size == -1 else group_size
    expected = torch.arange(K, dtype=torch.int32, device=g_idx.device) // size
    return size if torch.equal(g_idx.to(torch.int32), expected) else None


def block_rows(in_features: int, out_features: int) -> int:
    """Rows of W.T dequantized at once: all of them up to MAX_BLOCK_ELEMENTS, else a multiple of 32."""
    rows = max(32, MAX_BLOCK_ELEMENTS // max(out_features, 1) // 32 * 32)
    return in_features if rows >= in_features else rows


def grad_input(
    grad: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    cached: torch.Tensor | None = None,
    group_rows: int | None = None,
) -> torch.Tensor:
    """``grad [M, N] @ W [N, K]``: the input gradient of ``y = x @ W.T``, in ``grad``'s dtype."""
    if cached is not None:
        return grad @ cached.t()
    K, N = g_idx.shape[0], scales.shape[1]
    step = block_rows(K, N)
    if step >= K:
        w = dequantize_rows(qweight, zeros, scales, g_idx, bits, 0, K, grad.dtype, group_rows)
        return grad @ w.t()
    out = grad.new_empty(grad.shape[0], K)
    for k0 in range(0, K, step):
        k1 = min(K, k0 + step)
        w = dequantize_rows(qweight, zeros, scales, g_idx, bits, k0, k1, grad.dtype, group_rows)
        torch.mm(grad, w.t(), out=out[:, k0:k1])
    return out


class WeightSource:
    """What one layer's backward reads: its frozen GPTQ tensors, and its cached copies.

    Built once per bound layer at its first forward that needs a gradient (the unpacked zero
    points cost ``G x N`` int32); :meth:`release` returns a cached copy's bytes to the budget.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        group_size: int,
        zero_format: ZeroFormat,
        budget: DequantBudget | None = None,
    ) -> None:
        self.qweight, self.scales, self.g_idx, self.bits = qweight, scales, g_idx, bits
        self.group_rows = contiguous_groups(g_idx, group_size)
        # The real zero points, as PackedWeight.zeros() reads them; plain tensor ops (no value
        # checks: the layer's tensors were checked when it was bound), so a traced forward
        # can build a source too.
        stored = unpack_cols(qzeros, bits, scales.shape[1]).to(torch.int32)
        self.zeros = stored + 1 if zero_format == "v1" else stored
        self.budget = budget
        self._cache: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def of(cls, weight: PackedWeight, budget: DequantBudget | None = None) -> WeightSource:
        return cls(weight.qweight, weight.qzeros, weight.scales, weight.g_idx, weight.bits,
                   weight.group_size, weight.zero_format, budget)

    @property
    def cached_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._cache.values())

    def cached(self, dtype: torch.dtype) -> torch.Tensor | None:
        """W.T ``[K, N]`` in ``dtype`` when the budget holds it (dequantized at the first ask)."""
        w = self._cache.get(dtype)
        if w is not None or self.budget is None:
            return w
        K, N = self.g_idx.shape[0], self.scales.shape[1]
        if not self.budget.reserve(K * N * dtype.itemsize):
            return None
        w = dequantize_rows(self.qweight, self.zeros, self.scales, self.g_idx, self.bits, 0, K, dtype,
                            self.group_rows)
        self._cache[dtype] = w
        return w

    def release(self) -> None:
        if self.budget is not None:
            self.budget.release(self.cached_bytes)
        self._cache.clear()


class QuantMatmul(torch.autograd.Function):
    """``y = qmatmul(x, prepared, bias)`` with ``dX = dY @ W``; no gradient for the weight.

    The GPTQ tensors are passed (and saved) as tensors so a traced graph sees them as inputs.
    """

    @staticmethod
    def forward(x, qweight, zeros, scales, g_idx, bits, group_rows, qmatmul, prepared, bias, source):  # noqa: ARG004
        return qmatmul(x, prepared, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, qweight, zeros, scales, g_idx, bits, group_rows, _, _, _, source = inputs
        ctx.save_for_backward(qweight, zeros, scales, g_idx)
        ctx.bits, ctx.group_rows, ctx.source = bits, group_rows, source

    @staticmethod
    def backward(ctx, grad):
        grad_x = None
        if ctx.needs_input_grad[0]:
            qweight, zeros, scales, g_idx = ctx.saved_tensors
            source = None if torch.compiler.is_compiling() else ctx.source
            cached = source.cached(grad.dtype) if source is not None else None
            grad_x = grad_input(grad.contiguous(), qweight, zeros, scales, g_idx, ctx.bits, cached,
                                ctx.group_rows)
        return grad_x, None, None, None, None, None, None, None, None, None, None


def differentiable_qmatmul(
    qmatmul: Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor],
    x: torch.Tensor,
    prepared: Any,
    bias: torch.Tensor | None,
    source: WeightSource,
) -> torch.Tensor:
    """A backend's ``qmatmul`` of a contiguous ``[M, K]`` x, differentiable in ``x``."""
    return QuantMatmul.apply(x, source.qweight, source.zeros, source.scales, source.g_idx,
                             source.bits, source.group_rows, qmatmul, prepared, bias, source)


def quant_linears(model: nn.Module) -> list[nn.Module]:
    """Every QuantLinear that computes in ``model``: a fused group's shared layer (which is
    outside the module tree) once, in place of its members."""
    from .quant_linear import QuantLinear

    seen: dict[int, nn.Module] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            layer = getattr(m, "fused", m)
            seen.setdefault(id(layer), layer)
    return list(seen.values())


def configure_training(
    model: nn.Module, options: TrainingOptions | Mapping[str, Any] | None = None
) -> DequantBudget | None:
    """Give every quantized layer of ``model`` one shared budget for dequantized copies.

    ``configure_training(model, {"dequant_cache_mb": 4096})`` keeps up to 4 GiB of
    dequantized weights (in the activation dtype, on each layer's device) for the backward
    pass; ``0`` or no options go back to dequantizing on every call. Returns the budget.
    """
    opts = TrainingOptions.of(options)
    budget = DequantBudget.of(opts)
    layers = quant_linears(model)
    if not layers:
        raise GPTQError(
            f"{type(model).__name__} holds no QuantLinear layers; load a quantized model with "
            "gptq_core.AutoGPTQForCausalLM.from_quantized (or quantize one) first"
        )
    for layer in layers:
        layer.set_dequant_budget(budget)
    return budget
