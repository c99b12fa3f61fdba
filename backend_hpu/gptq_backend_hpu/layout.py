"""GPTQ v1/v2 tensors -> the packed layout ``torch.ops.hpu.convert_from_uint4`` reads (plain torch).

What the op takes (its schema in habana_frameworks: ``hpu::convert_from_uint4(Tensor input,
Tensor scale, Tensor? zero_point, ScalarType out_dtype) -> Tensor``; its meta function makes
the output ``input.shape`` with the last dimension times 8):

- ``input``: int32 [K, N/8], eight unsigned 4-bit values per word packed along N, value j of
  a word at bits [4j, 4j+4) (the orientation of GPTQ's ``qzeros``, not of its ``qweight``,
  which packs along K);
- ``scale``: [G, N] in the output dtype;
- ``zero_point``: int32 [G, N/8], the real zero points (not GPTQ v1's zero - 1), packed like
  ``input``;
- row k of the output uses group row ``k // (K / G)``: groups are contiguous, equal runs of
  rows, so act-order weights have their rows sorted by group first (docs/DESIGN.md §2,
  act-order) and the activation columns are permuted the same way at run time.

The result is ``W[k, n] = (q[k, n] - z[k // (K/G), n]) * scale[k // (K/G), n]``, [K, N], so
``x @ W`` is the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_core.errors import NotSupportedError
from gptq_core.format import PackedWeight
from gptq_core.packing import pack_cols

#: The op decodes 4-bit values only (``convert_from_uint4`` / ``convert_from_int4``; there is
#: no 8-bit sibling), eight to an int32 word along N.
BITS = 4
VALUES_PER_WORD = 32 // BITS
MAX_ZERO = 2**BITS - 1


@dataclass(frozen=True, eq=False)
class HpuLayout:
    """One layer in the op's layout, on the CPU or already on the device."""

    qweight: torch.Tensor  # int32 [K, N/8], packed along N
    zeros: torch.Tensor  # int32 [G, N/8], real zero points packed along N
    scales: torch.Tensor  # [G, N] in the activation dtype
    perm: torch.Tensor | None  # int32 [K]: activation columns to gather (act-order), else None

    def to(self, device: torch.device) -> HpuLayout:
        """The same layout with every tensor on ``device``."""
        return HpuLayout(
            qweight=self.qweight.to(device),
            zeros=self.zeros.to(device),
            scales=self.scales.to(device),
            perm=None if self.perm is None else self.perm.to(device),
        )


def rows_per_group(in_features: int, group_size: int) -> int:
    """The contiguous run of rows that shares one scale row (the op's K / G)."""
    return in_features if group_size == -1 else group_size


def group_order(weight: PackedWeight) -> torch.Tensor | None:
    """The row order that makes the groups contiguous equal runs, or None if they already are.

    Raises NotSupportedError when no order can: the op's groups all have K / G rows, so a
    g_idx whose groups differ in size (not one GPTQ's act-order writes) cannot be expressed.
    """
    K = weight.in_features
    run = rows_per_group(K, weight.group_size)
    g = weight.g_idx.detach().to("cpu", torch.int64)
    want = torch.arange(K, dtype=torch.int64) // run
    if torch.equal(g, want):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], want):
        counts = torch.bincount(g, minlength=weight.num_groups)
        bad = int(torch.nonzero(counts != run)[0])
        raise NotSupportedError(
            f"g_idx puts {int(counts[bad])} input channels in group {bad}, but "
            f"convert_from_uint4 needs every group to hold {run}; use another backend "
            "(backend='torch') for this layer",
            ["act-order groups of unequal size"],
        )
    return perm


def to_hpu_layout(weight: PackedWeight, scale_dtype: torch.dtype) -> HpuLayout:
    """Convert a 4-bit GPTQ layer (v1 or v2 zeros) into :class:`HpuLayout` on the CPU.

    The caller's tensors are read, never modified. Rows are reordered by group for act-order
    (the permutation is returned for the activations).
    """
    if weight.bits != BITS:
        raise NotSupportedError(
            f"{weight.bits}-bit weights: convert_from_uint4 decodes 4-bit values only",
            [f"{weight.bits}-bit is not supported (supports [4])"],
        )
    N = weight.out_features
    if N % VALUES_PER_WORD:
        raise NotSupportedError(
            f"N={N} is not divisible by {VALUES_PER_WORD} (eight 4-bit values per int32 word)",
            [f"N={N} is not divisible by {VALUES_PER_WORD}"],
        )
    cpu = weight.to("cpu")
    zeros = cpu.zeros()  # real zero points [G, N], whatever zero_format stores
    if int(zeros.max()) > MAX_ZERO or int(zeros.min()) < 0:
        # GPTQ v1 cannot store a zero of 0: the ecosystem reads it back as 16 (format.py).
        raise NotSupportedError(
            f"a zero point of {int(zeros.max())} does not fit in 4 unsigned bits (a v1 "
            "checkpoint that stored zero 0); re-save it as gptq_v2 or use backend='torch'",
            ["zero point outside [0, 15]"],
        )
    q = cpu.unpack_qweight()  # uint8 [K, N]
    perm = group_order(cpu)
    if perm is not None:
        q = q.index_select(0, perm)
    return HpuLayout(
        qweight=pack_cols(q.to(torch.int32), BITS),
        zeros=pack_cols(zeros, BITS),
        scales=cpu.scales.to(scale_dtype).contiguous(),
        perm=None if perm is None else perm.to(torch.int32),
    )
