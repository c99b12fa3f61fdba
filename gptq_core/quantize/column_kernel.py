"""GPTQ's column loop for one span of a block as one Triton kernel (the GPU path of :mod:`.gptq`).

The torch loop of :func:`.gptq._gptq` issues about fifteen small kernels per column: on a GPU
that is launch latency, not arithmetic, and it made the GPTQ maths of a Llama-2-7B layer take
seconds (docs/DESIGN.md §6, NOTES/quantizer.md). Every output row of W is quantized
independently given ``Hinv``, so one program owns ``BLOCK_N`` rows of the block in registers
and walks the span's columns itself: quantize with the column's grid, error over the diagonal
of ``Hinv``, rank-one update of the rest of its tile. A span is a run of columns whose grids are
known when it starts (one group, or the whole block for static groups); the caller computes a
dynamic group's grid in torch between spans, exactly where the torch loop does, so the kernel
changes launch counts, not the algorithm.

Rounding: division is IEEE round-to-nearest (``div_rn``), rounding to integers is
half-to-even (as ``torch.round``); the rank-one update may contract into an fma where torch
rounds the product first, so the last bit of an updated weight, and rarely one integer, can
differ from the torch loop's on a GPU. Under Triton's interpreter (numpy arithmetic, no fma)
the results equal the torch loop's exactly: tests/test_column_kernel.py pins that. Deterministic.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton: the torch loop serves
    triton = None

#: Rows per program; the block's columns (at most MAX_BLOCK) are held for each row.
BLOCK_N = 16
#: The widest block a program holds in registers.
MAX_BLOCK = 128


def available(device: torch.device) -> bool:
    """The kernel serves CUDA tensors where Triton is importable."""
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        r = tl.floor(x + 0.5)
        tie = (r - x) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _columns_kernel(
        W, Hinv, Q, Err, losses, scales, zeros, col_group,
        n_rows, width, h_stride, start, stop, maxq,
        BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_B)
        row_ok = rows < n_rows
        tile_mask = row_ok[:, None] & (cols[None, :] < width)
        offsets = rows[:, None] * width + cols[None, :]
        tile = tl.load(W + offsets, mask=tile_mask, other=0.0)
        loss = tl.zeros([BLOCK_N], dtype=tl.float32)
        # A constant trip count with a branch, not range(start, stop): Triton's interpreter
        # (the CPU tests) cannot loop over runtime bounds.
        for i in range(0, BLOCK_B):
            if (i >= start) & (i < stop):
                w = tl.sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)
                g = tl.load(col_group + i)
                s = tl.load(scales + g * n_rows + rows, mask=row_ok, other=1.0)
                z = tl.load(zeros + g * n_rows + rows, mask=row_ok, other=0.0)
                q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(w, s)) + z, 0.0), maxq)
                d = tl.load(Hinv + i * h_stride + i)
                err = tl.math.div_rn(w - s * (q - z), d)
                tl.store(Q + rows * width + i, q, mask=row_ok)
                tl.store(Err + rows * width + i, err, mask=row_ok)
                loss += err * err
                h = tl.load(Hinv + i * h_stride + cols, mask=(cols >= i) & (cols < width), other=0.0)
                tile = tile - err[:, None] * h[None, :]
        tl.store(W + offsets, tile, mask=tile_mask)
        tl.store(losses + rows, tl.load(losses + rows, mask=row_ok, other=0.0) + loss, mask=row_ok)


def quantize_span(
    W1: torch.Tensor, Hinv1: torch.Tensor, Q1: torch.Tensor, Err1: torch.Tensor, losses: torch.Tensor,
    scales: torch.Tensor, zeros: torch.Tensor, col_group: torch.Tensor, start: int, stop: int, maxq: int,
) -> None:
    """Columns ``start..stop-1`` of the block: ``W1`` [N, B] (updated in place for every column
    from ``start`` on), ``Q1``/``Err1`` [N, B] written at those columns, ``losses`` [N] summed;
    ``scales``/``zeros`` [G, N] float32 and ``col_group`` [B] int32 give each column's grid.
    ``Hinv1`` is the block's [B, B] slice of the upper Cholesky factor, contiguous."""
    N, B = W1.shape
    if B > MAX_BLOCK:
        raise ValueError(f"a block of {B} columns is wider than the kernel's {MAX_BLOCK}")
    grid = (triton.cdiv(N, BLOCK_N),)
    _columns_kernel[grid](
        W1, Hinv1, Q1, Err1, losses, scales, zeros, col_group,
        N, B, B, start, stop, float(maxq),
        BLOCK_N=BLOCK_N, BLOCK_B=max(16, triton.next_power_of_2(B)),
    )
