"""The Hopper tile layout: 4-bit GPTQ ints repacked so each thread's 16 bytes are its wgmma A
fragments (shared with ``csrc/kernel.cuh``; change both or neither).

The kernel computes Y^T = W^T . X^T: the weight is wgmma's A operand (64 output columns x k16
per warpgroup and instruction), taken from registers. Geometry:

* A block owns ``BN`` = 128 output columns (two warpgroups of 64) and streams 64-k tiles.
  One (column block, k tile) is 4 KiB: 256 threads x 16 bytes, in thread order, so the
  block's copy is one coalesced 16-byte access per thread. A pipeline stage is one tile, or
  two consecutive ones (8 KiB, contiguous) for the token tiles BM <= 64 (``ops.stage_tiles``;
  csrc/stage.h): the layout is the same for both.
* Thread ``tid``: warpgroup ``tid // 128``, warp ``(tid // 32) % 4``, lane ``l``
  (``g = l // 4``, ``t = l % 4``); its rows are ``lo = 64 * wg + 16 * warp + g`` and ``lo + 8``.
  Word ``j`` (0..3) of its 16 bytes is k16 step ``j`` of the tile: mma.m16n8k16's A fragment,
  registers a0 (row lo, k 2t, 2t+1), a1 (row lo+8, same k), a2 (row lo, k 2t+8, 2t+9),
  a3 (row lo+8, k 2t+8, 2t+9).
* Nibble ``i`` (0..3) of a word is register ``a_i``'s low half (the even k), nibble ``i + 4``
  its high half, so that ``(word >> 4i) & 0x000f000f | 0x6400_6400`` (or marlin's
  ``0x00f000f0`` variant) is the pair ``1024 + n`` in fp16 (``0x4300``: ``128 + n`` in bf16).
* Tiles are stored column block by column block, k tile by k tile inside each.

Scales and zero points stay in GPTQ's natural [G, N] order (in the activation dtype): a
block copies the 256 bytes of its columns for the group of k offsets 0 and 32 of each tile.

Plain torch, any device; :func:`unrepack` is the exact inverse of :func:`repack`. The
kernel's decoding is modelled bit for bit in backend_marlin/tests/hopper_kernel_model.py.
"""

from __future__ import annotations

import functools

import torch

from gptq_core.errors import FormatError

BN = 128  #: output columns per block
TILE_K = 64  #: k per weight tile (a pipeline stage is 1 or 2 tiles: ops.stage_tiles)
THREADS = 256
WORDS = 4  #: int32 words per thread per tile (one per k16 step)
TILE_WORDS = THREADS * WORDS  #: 1024 words = 4 KiB


def check_shape(K: int, N: int) -> None:
    """Raise FormatError unless the layer fits the layout's tiles."""
    if K % TILE_K or N % BN:
        raise FormatError(
            f"the Hopper layout needs K % {TILE_K} == 0 and N % {BN} == 0, got K={K} N={N}; "
            "the marlin kernels serve other shapes"
        )


def thread_rows(tid: int) -> tuple[int, int, int]:
    """(row lo within the 128-column block, g, t) of a thread."""
    wg, warp, lane = tid // 128, (tid // 32) % 4, tid % 32
    g, t = lane // 4, lane % 4
    return 64 * wg + 16 * warp + g, g, t


@functools.lru_cache(maxsize=None)
def fragment_table() -> torch.Tensor:
    """int64 [256 threads, 4 words, 8 nibbles]: flat index ``k * BN + n`` in a 64 x 128 tile."""
    table = torch.empty(THREADS, WORDS, 8, dtype=torch.int64)
    for tid in range(THREADS):
        lo, _, t = thread_rows(tid)
        for j in range(WORDS):
            for p in range(8):
                i, high = p % 4, p // 4  # register a_i, its high (odd k) half
                k = 16 * j + 2 * t + 8 * (i >> 1) + high
                n = lo + 8 * (i & 1)
                table[tid, j, p] = k * BN + n
    return table


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return (((words & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000).to(torch.int32)


def repack(q: torch.Tensor) -> torch.Tensor:
    """Quantized 4-bit ints [K, N] (0 <= q < 16) -> the kernel's tiles, int32 [K * N / 8]."""
    K, N = q.shape
    check_shape(K, N)
    table = fragment_table().to(q.device).reshape(-1)
    # [KT, 64, NB, 128] -> [NB, KT, 64 * 128]: one row per tile, k-major inside.
    tiles = q.to(torch.int64).view(K // TILE_K, TILE_K, N // BN, BN).permute(2, 0, 1, 3)
    tiles = tiles.reshape(N // BN, K // TILE_K, TILE_K * BN)
    fields = tiles[:, :, table].view(N // BN, K // TILE_K, TILE_WORDS, 8)
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * 4
    words = (fields << shifts).sum(-1)
    return _to_int32(words.reshape(-1))


def unrepack(tiles: torch.Tensor, K: int, N: int) -> torch.Tensor:
    """Inverse of :func:`repack`: tiles -> quantized ints uint8 [K, N]."""
    check_shape(K, N)
    if tiles.numel() * 8 != K * N:
        raise FormatError(f"{tiles.numel()} words cannot hold a {K} x {N} 4-bit weight")
    words = tiles.reshape(N // BN, K // TILE_K, TILE_WORDS).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, device=tiles.device, dtype=torch.int64) * 4
    fields = ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(N // BN, K // TILE_K, -1)
    flat = torch.empty_like(fields)
    flat[:, :, fragment_table().to(tiles.device).reshape(-1)] = fields
    q = flat.view(N // BN, K // TILE_K, TILE_K, BN).permute(1, 2, 0, 3)
    return q.reshape(K, N).to(torch.uint8)
