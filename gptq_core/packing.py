"""Bit packing of the GPTQ format: values along one axis form a little-endian bit stream.

Value ``j`` occupies bits ``[j*b, (j+1)*b)`` of the stream, which is cut into 32-bit words.
For 2/4/8 bits a value never straddles a word; for 3 bits, 32 values fill 3 words and values
10 and 21 of each 32 straddle a boundary (AutoGPTQ's 10-1-10-1-10 pattern).

Both directions loop over the 32 positions of a period only (never over rows or columns),
so a 4096 x 11008 layer packs in a fraction of a second.
"""

from __future__ import annotations

import math

import torch

from .errors import FormatError

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD = 32


def check_bits(bits: int) -> None:
    """Raise a clear error for a bit width the GPTQ format does not define."""
    if bits not in SUPPORTED_BITS:
        raise FormatError(
            f"bits={bits} is not a GPTQ bit width; use one of {list(SUPPORTED_BITS)}"
        )


def packed_length(count: int, bits: int) -> int:
    """Number of int32 words that hold ``count`` values of ``bits`` bits."""
    return math.ceil(count * bits / _WORD)


def _period_layout(bits: int) -> list[tuple[int, int, int]]:
    """For each of the 32 values of a period: (word, bit offset, bits spilled into next word)."""
    layout = []
    for j in range(_WORD):
        start = j * bits
        word, offset = divmod(start, _WORD)
        spill = max(0, offset + bits - _WORD)
        layout.append((word, offset, spill))
    return layout


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers ``values`` [count, cols] (0 <= v < 2**bits) along dim 0 into int32 words.

    Returns int32 [ceil(count*bits/32), cols]. The input is not modified.
    """
    check_bits(bits)
    if values.dim() != 2:
        raise FormatError(f"pack_rows expects a 2-D tensor, got shape {tuple(values.shape)}")
    if values.dtype.is_floating_point or values.dtype == torch.bool:
        raise FormatError(f"pack_rows expects an integer tensor, got {values.dtype}")
    count, cols = values.shape
    v = values.contiguous()
    if count and cols:
        lo, hi = torch.aminmax(v)
        if int(lo) < 0 or int(hi) >= 2**bits:
            raise FormatError(
                f"values to pack must lie in [0, {2**bits - 1}] for {bits}-bit, "
                f"found [{int(lo)}, {int(hi)}]"
            )
    # int32 throughout: torch shifts int32 as unsigned 32-bit words (bits shifted past bit 31
    # are dropped), which is exactly the word arithmetic needed, at half the memory of int64.
    v = v.to(torch.int32)
    periods = math.ceil(count / _WORD)
    if periods * _WORD != count:
        v = torch.cat([v, v.new_zeros(periods * _WORD - count, cols)])
    v = v.view(periods, _WORD, cols)
    out = torch.zeros(periods, bits, cols, dtype=torch.int32, device=values.device)
    for j, (word, offset, spill) in enumerate(_period_layout(bits)):
        out[:, word].bitwise_or_(v[:, j] << offset)
        if spill:
            out[:, word + 1].bitwise_or_(v[:, j] >> (bits - spill))
    return out.view(periods * bits, cols)[: packed_length(count, bits)]


def unpack_rows(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 words [W, cols] -> uint8/int16 values [count, cols]."""
    check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise FormatError(
            f"unpack_rows expects a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    need = packed_length(count, bits)
    if packed.shape[0] != need:
        raise FormatError(
            f"{count} values of {bits} bits need {need} packed rows, found {packed.shape[0]}"
        )
    cols = packed.shape[1]
    periods = math.ceil(count / _WORD)
    w = packed.contiguous()
    if periods * bits != need:
        w = torch.cat([w, w.new_zeros(periods * bits - need, cols)])
    w = w.view(periods, bits, cols)
    mask = (1 << bits) - 1
    out = torch.empty(periods, _WORD, cols, dtype=torch.uint8, device=packed.device)
    for j, (word, offset, spill) in enumerate(_period_layout(bits)):
        # int32 >> sign-extends: mask right after the shift, before merging the spilled bits
        val = (w[:, word] >> offset) & (mask >> spill)
        if spill:
            val |= (w[:, word + 1] << (bits - spill)) & mask
        out[:, j] = val
    return out.view(periods * _WORD, cols)[:count]


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers [rows, count] along dim 1 (the layout of ``qzeros``)."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`."""
    return unpack_rows(packed.t().contiguous(), bits, count).t().contiguous()
