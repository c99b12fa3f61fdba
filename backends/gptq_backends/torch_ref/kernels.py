"""The torch backend's custom ops (``gptq_torch::qmatmul``), with fake and autograd support."""

from __future__ import annotations

import torch

from gptq_core.packing import unpack_rows
from gptq_core.training import dequantize_rows

# Rows of K dequantized at once: a multiple of 32 (a period of every bit width), sized so a
# chunk of a wide layer stays near 16M elements.
_MAX_CHUNK_ELEMENTS = 1 << 24


def chunk_rows(in_features: int, out_features: int) -> int:
    rows = max(32, (_MAX_CHUNK_ELEMENTS // max(out_features, 1)) // 32 * 32)
    return min(rows, (in_features + 31) // 32 * 32)


def _dequant_chunk(qweight, zeros, scales, g_idx, bits, k0, k1, dtype):
    """Rows [k0, k1) of the dequantized weight, [k1-k0, N] in ``dtype`` (k0 % 32 == 0)."""
    w0 = k0 * bits // 32
    w1 = -(-k1 * bits // 32)
    q = unpack_rows(qweight[w0:w1], bits, k1 - k0)
    g = g_idx[k0:k1].long()
    return (q.to(dtype) - zeros[g].to(dtype)) * scales[g].to(dtype)


#: Every activation dtype is computed and accumulated in float32: this is the reference.
_COMPUTE_DTYPE = torch.float32


@torch.library.custom_op("gptq_torch::qmatmul", mutates_args=())
def qmatmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor:
    K, N = g_idx.shape[0], scales.shape[1]
    cdt = _COMPUTE_DTYPE
    out = torch.zeros(x.shape[0], N, dtype=cdt, device=x.device)
    step = chunk_rows(K, N)
    for k0 in range(0, K, step):
        k1 = min(K, k0 + step)
        w = _dequant_chunk(qweight, zeros, scales, g_idx, bits, k0, k1, cdt)
        out.addmm_(x[:, k0:k1].to(cdt), w)
    if bias is not None:
        out += bias.to(cdt)
    return out.to(x.dtype)


@qmatmul_op.register_fake
def _(x, qweight, zeros, scales, g_idx, bias, bits):
    return x.new_empty(x.shape[0], scales.shape[1])


def grad_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the input gradient is computed in: the activations' own (fp16/bf16) on a GPU,
    where the GEMM accumulates in fp32 and tensor cores serve it, float32 otherwise (the CPU
    keeps the reference's float32, which the float64 checks hold to its tight tolerance)."""
    if device.type != "cpu" and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return _COMPUTE_DTYPE


@torch.library.custom_op("gptq_torch::qmatmul_grad_input", mutates_args=())
def qmatmul_grad_input_op(
    grad: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """``grad @ W`` (W as [N, K]): the input gradient of ``qmatmul``, chunked the same way.

    Each chunk of W is dequantized directly in the compute dtype (docs/DESIGN.md §2 math,
    through the core's :func:`~gptq_core.training.dequantize_rows`), never in float32 first
    on a GPU.
    """
    K, N = g_idx.shape[0], scales.shape[1]
    cdt = grad_compute_dtype(grad.dtype, grad.device)
    out = torch.empty(grad.shape[0], K, dtype=grad.dtype, device=grad.device)
    step = chunk_rows(K, N)
    g = grad.to(cdt)
    for k0 in range(0, K, step):
        k1 = min(K, k0 + step)
        w = dequantize_rows(qweight, zeros, scales, g_idx, bits, k0, k1, cdt)
        out[:, k0:k1] = (g @ w.t()).to(grad.dtype)
    return out


@qmatmul_grad_input_op.register_fake
def _(grad, qweight, zeros, scales, g_idx, bits):
    return grad.new_empty(grad.shape[0], g_idx.shape[0])


def _setup_context(ctx, inputs, output):
    x, qweight, zeros, scales, g_idx, bias, bits = inputs
    ctx.save_for_backward(qweight, zeros, scales, g_idx)
    ctx.bits = bits
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    qweight, zeros, scales, g_idx = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = qmatmul_grad_input_op(grad.contiguous(), qweight, zeros, scales, g_idx, ctx.bits)
    return grad_x, None, None, None, None, None, None


qmatmul_op.register_autograd(_backward, setup_context=_setup_context)
