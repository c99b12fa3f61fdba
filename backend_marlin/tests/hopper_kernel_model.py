"""A bit-level model of the Hopper kernel's dequantization (``hopper/csrc/kernel.cuh``'s
``dequant4``), written from the kernel, so that the tests can check it against layout.py's
fragment table and the float64 weight on a CPU (as marlin_kernel_model.py does for marlin).
"""

from __future__ import annotations

import torch
from marlin_kernel_model import _halves

from gptq_backend_marlin.hopper import layout


def decode_word(word: int, zeros: tuple[float, float], scales: tuple[float, float],
                bf16: bool = False) -> list[tuple[float, float]]:
    """A model of kernel.cuh's ``dequant4``, bit for bit up to the final products (taken in
    float64 here): one 32-bit word -> registers a0..a3 as (low, high) values. ``zeros`` and
    ``scales`` are row lo's and row hi's (a0, a2 use row lo; a1, a3 row hi)."""
    word &= 0xFFFFFFFF
    magic = 0x43004300 if bf16 else 0x64006400
    regs = []
    for i in range(4):
        row = i & 1
        if bf16:
            lo, hi = _halves(((word >> (4 * i)) & 0x000F000F) | magic, torch.bfloat16)
            vals = (lo - 128.0 - zeros[row], hi - 128.0 - zeros[row])
        else:
            shifted = word >> (8 * (i >> 1))
            mask = 0x00F000F0 if i & 1 else 0x000F000F
            lo, hi = _halves((shifted & mask) | magic, torch.float16)
            if i & 1:  # 1024 + 16 n, scaled by 1/16 in an exact fma
                vals = (lo / 16 - 64.0 - zeros[row], hi / 16 - 64.0 - zeros[row])
            else:
                vals = (lo - 1024.0 - zeros[row], hi - 1024.0 - zeros[row])
        regs.append((vals[0] * scales[row], vals[1] * scales[row]))
    return regs


def thread_fragments(tiles: torch.Tensor, K: int, N: int, block: int, kt: int, tid: int,
                     zero: torch.Tensor, scale: torch.Tensor, bf16: bool = False) -> list[list[tuple[float, float]]]:
    """What thread ``tid`` holds for tile (``block``, ``kt``): [4 k16 steps][a0..a3] of (low,
    high) values, decoded by :func:`decode_word` from the repacked words with the zero points
    and scales ([G, N] tensors, ``group_size``-free: the caller passes the rows of the groups
    of k offsets 0 and 32 as [2, N]). The tests compare it with the dense weight at the
    positions PTX's A-fragment table names."""
    words = tiles.reshape(N // layout.BN, K // layout.TILE_K, layout.THREADS, layout.WORDS)[block, kt, tid].to(torch.int64) & 0xFFFFFFFF
    lo, _, _ = layout.thread_rows(tid)
    n_lo = block * layout.BN + lo
    out = []
    for j in range(layout.WORDS):
        r = j >> 1  # the scale row of k offsets 0 (steps 0, 1) and 32 (steps 2, 3)
        z = (float(zero[r, n_lo]), float(zero[r, n_lo + 8]))
        s = (float(scale[r, n_lo]), float(scale[r, n_lo + 8]))
        out.append(decode_word(int(words[j]), z, s, bf16))
    return out
