"""The Marlin tile layout: GPTQ ints repacked once so that each lane loads its mma fragment.

Geometry (shared with ``csrc/dequant.cuh`` and ``csrc/stage.cuh``; change both or neither):

* A *warp tile* covers 64 input channels (k) x 32 output columns (n). One warp of the kernel
  multiplies it with ``mma.sync.m16n8k16``: 4 k16 steps x 4 n8 subtiles = 16 B fragments.
* For the B operand (16 x 8, "col") lane ``l`` (``t = l % 4``, ``g = l // 4``) holds four values
  of column ``g``: k rows ``2t, 2t+1`` (register b0) and ``2t+8, 2t+9`` (register b1).
* A warp tile is ``CHUNKS`` chunks of 32 lanes x 16 bytes; lane ``l`` reads its 16 bytes of a
  chunk with one shared-memory load. Word ``j`` (0..3) of those 16 bytes holds subtile ``j``
  (columns ``8j .. 8j+7``). A 4-bit word holds the fragments of k16 steps ``2c`` and ``2c+1``
  of chunk ``c``; an 8-bit word holds the fragment of step ``c``.
* Inside a word the values are ordered so that dequantization step ``i`` turns bit fields
  ``i`` and ``i + VPW/2`` (VPW = values per word) into one half2 / bfloat162 register (low,
  high) by the exponent trick ``0x6400 | field``, and that register is exactly b0 or b1.
* Warp tiles are stored in the order the kernel streams them: n-tiles of 256 columns (8 warp
  tiles side by side), k-tiles of 64 down each n-tile, the 8 warp tiles of one (n-tile,
  k-tile) contiguous (8 KiB for 4-bit). The last n-tile may hold fewer than 8 warp tiles.

Scales (and zero points) are permuted within each 32-column block so that lane ``g`` finds
the four columns ``g, g+8, g+16, g+24`` of its subtiles in 8 consecutive bytes.

Everything here is plain torch and runs on any device; :func:`unrepack` is the exact inverse
of :func:`repack`, which the unit tests check on random weights.
"""

from __future__ import annotations

import functools

import torch

from gptq_core.errors import FormatError

TILE_K = 64
WARP_N = 32
WARPS = 8
TILE_N = WARP_N * WARPS
LAYOUT_BITS = (4, 8)


def warp_tile_bytes(bits: int) -> int:
    return TILE_K * WARP_N * bits // 8


def chunks(bits: int) -> int:
    return warp_tile_bytes(bits) // 512


def _check(bits: int, K: int, N: int) -> None:
    if bits not in LAYOUT_BITS:
        raise FormatError(f"the Marlin layout holds 4- or 8-bit weights, not {bits}-bit")
    if K % TILE_K or N % WARP_N:
        raise FormatError(
            f"the Marlin layout needs K % {TILE_K} == 0 and N % {WARP_N} == 0, got K={K} N={N}"
        )


@functools.lru_cache(maxsize=None)
def fragment_table(bits: int) -> torch.Tensor:
    """int64 [CHUNKS, 32 lanes, 4 words, VPW fields]: flat index ``k * 32 + n`` in a warp tile.

    Field ``p`` of a word goes to dequantization step ``i = p % (VPW/2)`` as its low
    (``p < VPW/2``) or high half; step ``i`` yields register b0 (even i) or b1 (odd i) of the
    fragment ``h = i // 2`` of the word.
    """
    vpw = 32 // bits
    half = vpw // 2
    n_chunks = chunks(bits)
    steps_per_chunk = 4 // n_chunks
    table = torch.empty(n_chunks, 32, 4, vpw, dtype=torch.int64)
    for c in range(n_chunks):
        for lane in range(32):
            t, g = lane % 4, lane // 4
            for j in range(4):
                for p in range(vpw):
                    i, e = p % half, p // half
                    h, v = i // 2, (i % 2) * 2 + e
                    k = 16 * (c * steps_per_chunk + h) + 2 * t + (v & 1) + 8 * (v >> 1)
                    n = 8 * j + g
                    table[c, lane, j, p] = k * WARP_N + n
    return table


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return (((words & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000).to(torch.int32)


def _tile_order(x: torch.Tensor, N: int) -> torch.Tensor:
    """[NB, KT, ...] per warp tile -> flat, in the kernel's (n-tile, k-tile, warp) order."""
    nb = N // WARP_N
    full = nb // WARPS
    parts = []
    if full:
        head = x[: full * WARPS].unflatten(0, (full, WARPS)).transpose(1, 2)
        parts.append(head.reshape(-1))
    if nb % WARPS:
        parts.append(x[full * WARPS:].transpose(0, 1).reshape(-1))
    return torch.cat(parts)


def _tile_order_inverse(flat: torch.Tensor, N: int, KT: int, per_tile: int) -> torch.Tensor:
    """Inverse of :func:`_tile_order`: flat -> [NB, KT, per_tile]."""
    nb = N // WARP_N
    full = nb // WARPS
    rest = nb % WARPS
    parts = []
    cut = full * KT * WARPS * per_tile
    if full:
        head = flat[:cut].view(full, KT, WARPS, per_tile).transpose(1, 2)
        parts.append(head.reshape(full * WARPS, KT, per_tile))
    if rest:
        parts.append(flat[cut:].view(KT, rest, per_tile).transpose(0, 1))
    return torch.cat(parts)


def repack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantized ints [K, N] (0 <= q < 2**bits) -> the kernel's tiles, int32 [K * N * bits / 32]."""
    K, N = q.shape
    _check(bits, K, N)
    vpw = 32 // bits
    table = fragment_table(bits).to(q.device)
    # [KT, 64, NB, 32] -> [NB, KT, 64 * 32]: one row per warp tile, k-major inside.
    tiles = q.to(torch.int64).view(K // TILE_K, TILE_K, N // WARP_N, WARP_N)
    tiles = tiles.permute(2, 0, 1, 3).reshape(N // WARP_N, K // TILE_K, TILE_K * WARP_N)
    fields = tiles[:, :, table.reshape(-1)].view(*tiles.shape[:2], -1, vpw)
    shifts = torch.arange(vpw, device=q.device, dtype=torch.int64) * bits
    words = (fields << shifts).sum(-1)
    return _to_int32(_tile_order(words, N))


def unrepack(tiles: torch.Tensor, bits: int, K: int, N: int) -> torch.Tensor:
    """Inverse of :func:`repack`: tiles -> quantized ints uint8 [K, N]."""
    _check(bits, K, N)
    vpw = 32 // bits
    per_tile = warp_tile_bytes(bits) // 4
    if tiles.numel() != K * N * bits // 32:
        raise FormatError(f"{tiles.numel()} words cannot hold a {K} x {N} {bits}-bit weight")
    words = _tile_order_inverse(tiles.reshape(-1).to(torch.int64) & 0xFFFFFFFF, N, K // TILE_K, per_tile)
    shifts = torch.arange(vpw, device=tiles.device, dtype=torch.int64) * bits
    fields = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    table = fragment_table(bits).to(tiles.device).reshape(-1)
    flat = torch.empty_like(fields.reshape(*words.shape[:2], -1))
    flat[:, :, table] = fields.reshape(*words.shape[:2], -1)
    q = flat.view(N // WARP_N, K // TILE_K, TILE_K, WARP_N).permute(1, 2, 0, 3)
    return q.reshape(K, N).to(torch.uint8)


def permute_columns(t: torch.Tensor) -> torch.Tensor:
    """Per-column tensor [G, N] -> the kernel's order: in each 32-block, position 4g+j = column 8j+g."""
    G, N = t.shape
    if N % WARP_N:
        raise FormatError(f"N={N} is not a multiple of {WARP_N}")
    return t.view(G, N // WARP_N, 4, 8).transpose(2, 3).reshape(G, N).contiguous()


def unpermute_columns(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`permute_columns`."""
    G, N = t.shape
    return t.view(G, N // WARP_N, 8, 4).transpose(2, 3).reshape(G, N).contiguous()
