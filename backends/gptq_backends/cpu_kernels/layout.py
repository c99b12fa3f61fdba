"""The cpu backend's prepared layout: GPTQ weights repacked once, at load, for streaming.

Columns are cut into blocks of ``BLOCK_N`` (64: four AVX-512 vectors of fp32 outputs). Within
a block the weight rows follow one another K-contiguously, ``vals_per_byte`` rows per byte
(8-bit: 1, 4- and 3-bit: 2 nibbles, 2-bit: 4), so one byte per column holds a "unit" of rows
and a thread streams one block from start to end. Rows are sorted by group (act-order:
docs/DESIGN.md §2; the activation columns are permuted to match at run time), and each run of
rows of one group (a *segment*) starts on a fresh unit, so any group size works and every
segment has one scale (and zero) vector per column block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptq_core.format import PackedWeight
from gptq_core.policy import DispatchPolicy

BLOCK_N = 64

#: Quantized values per byte of ``qdata`` for each bit width (3-bit values take a nibble).
VALS_PER_BYTE = {2: 4, 3: 2, 4: 2, 8: 1}


@dataclass(frozen=True, eq=False)
class CpuLayout:
    """What the C++ kernel reads (see ``csrc/qgemm_body.h``)."""

    qdata: torch.Tensor  # uint8 [NB, units, 64]
    scales: torch.Tensor  # float32 [NB, S, 64]
    zeros: torch.Tensor | None  # float32 [NB, S, 64]; None when every zero is sym_zero
    segs: torch.Tensor  # int32 [S, 4]: x start, rows, unit offset, group
    perm: torch.Tensor | None  # int64 [K]: x[:, perm] is x in the sorted row order; None: identity
    vals_per_byte: int
    sym_zero: float
    in_features: int
    out_features: int


@dataclass(frozen=True, eq=False)
class CpuPrepared:
    """A layer prepared for the cpu backend: its layout, the path per M, and (when the C++
    kernels are not available) torch's own kernel and its operands."""

    layout: CpuLayout | None
    policy: DispatchPolicy
    bits: int
    #: Rows above which the GEMM path serves (the policy's threshold, read once per call).
    gemm_above: int
    #: Operands of torch's int4 kernel when the C++ kernels are not built (fallback.py).
    fallback: object | None = None
    #: The layout bound once into the extension (``EagerLayer``): ``eager_qmatmul(x, bias)``
    #: for plainly eager calls on [..., K] inputs (``QuantLinear.forward`` takes it; None when
    #: the C++ kernels are not built).
    eager_qmatmul: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None


def sort_rows(g_idx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(perm or None, groups of the segments, rows of the segments) of a g_idx: rows sorted by
    group (stable, so a monotonic g_idx keeps its order and needs no permutation)."""
    g = g_idx.to(torch.int64)
    perm = None
    if g.numel() > 1 and bool((g[1:] < g[:-1]).any()):
        perm = torch.argsort(g, stable=True)
        g = g[perm]
    groups, rows = torch.unique_consecutive(g, return_counts=True)
    return perm, groups, rows


def repack(weight: PackedWeight) -> CpuLayout:
    """The CPU layout of ``weight`` (on the CPU; the caller's tensors are not modified)."""
    w = weight.to("cpu")
    K, N, bits = w.in_features, w.out_features, w.bits
    P = VALS_PER_BYTE[bits]
    stored_bits = 8 // P
    nb = -(-N // BLOCK_N)
    n_pad = nb * BLOCK_N - N

    perm, groups, rows = sort_rows(w.g_idx)
    q = w.unpack_qweight()  # uint8 [K, N]
    if perm is not None:
        q = q[perm]
    units = (rows + P - 1) // P
    unit_off = torch.cumsum(units, 0) - units
    x_start = torch.cumsum(rows, 0) - rows
    total_units = int(units.sum())

    # Row r of the sorted weight goes to padded row unit_off[s] * P + (r - x_start[s]).
    seg_of_row = torch.repeat_interleave(torch.arange(len(rows)), rows)
    dest = unit_off[seg_of_row] * P + (torch.arange(K) - x_start[seg_of_row])
    padded = torch.zeros(total_units * P, N + n_pad, dtype=torch.int32)
    padded[dest, :N] = q.to(torch.int32)
    padded = padded.view(total_units, P, nb * BLOCK_N)
    packed = torch.zeros(total_units, nb * BLOCK_N, dtype=torch.int32)
    for i in range(P):
        packed |= padded[:, i, :] << (i * stored_bits)
    qdata = packed.to(torch.uint8).view(total_units, nb, BLOCK_N).transpose(0, 1).contiguous()

    def per_segment(t: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.pad(t[groups].to(torch.float32), (0, n_pad))
        return t.view(len(groups), nb, BLOCK_N).transpose(0, 1).contiguous()

    z = w.zeros()
    first = int(z.flatten()[0])
    same_zero = bool((z == first).all())
    segs = torch.stack([x_start, rows, unit_off, groups], dim=1).to(torch.int32).contiguous()
    return CpuLayout(
        qdata=qdata,
        scales=per_segment(w.scales),
        zeros=None if same_zero else per_segment(z),
        segs=segs,
        perm=perm,
        vals_per_byte=P,
        sym_zero=float(first),
        in_features=K,
        out_features=N,
    )


def unpack_layout(layout: CpuLayout, bits: int) -> torch.Tensor:
    """The dequantized float64 weight [K, N] in the original row order, read back from the
    layout (the tests' round trip; never on the hot path)."""
    P = layout.vals_per_byte
    stored_bits = 8 // P
    qd = layout.qdata.to(torch.int32).transpose(0, 1).reshape(layout.qdata.shape[1], -1)
    rows = torch.stack([(qd >> (i * stored_bits)) & ((1 << stored_bits) - 1) for i in range(P)], 1)
    rows = rows.reshape(-1, qd.shape[1])  # [units * P, NB * 64]
    nb = layout.qdata.shape[0]
    scales = layout.scales.transpose(0, 1).reshape(-1, nb * BLOCK_N).double()
    zeros = (layout.zeros.transpose(0, 1).reshape(-1, nb * BLOCK_N).double()
             if layout.zeros is not None else torch.full_like(scales, layout.sym_zero))
    out = torch.empty(layout.in_features, nb * BLOCK_N, dtype=torch.float64)
    for s, (x0, n, u0, _) in enumerate(layout.segs.tolist()):
        q = rows[u0 * P: u0 * P + n].double()
        out[x0: x0 + n] = (q - zeros[s]) * scales[s]
    if layout.perm is not None:
        unsorted = torch.empty_like(out)
        unsorted[layout.perm] = out
        out = unsorted
    return out[:, : layout.out_features]
