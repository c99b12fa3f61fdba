"""A bit-level Python model of what the CUDA kernel does with the prepared tensors.

Written from the kernel's loop structure (csrc/stage.cuh, pipeline.cuh, epilogue.cuh), not from
layout.py's table, so that the two can check each other on a CPU:

* :func:`decode_warp_tile` is ``compute_stage``'s dequantization: the exponent trick on the
  bits of each 32-bit word, the group-row choice, then each register placed where the PTX
  ISA's m16n8k16 B-fragment layout says that lane's values live.
* :func:`simulate_gemm` is ``gemm_kernel``'s control flow: the striped partition of
  (n-tile, k-tile) iterations over workers, per-worker partial tiles parked in slots 0/1, the
  counter, and the last contributor's sum in worker order.
"""

from __future__ import annotations

import struct

import torch

TILE_K, WARP_N, WARPS = 64, 32, 8
TILE_N = WARP_N * WARPS


def _from_bits(bits16: int, dtype: torch.dtype) -> float:
    """A 16-bit pattern read as fp16 or bf16."""
    if dtype == torch.float16:
        return struct.unpack("<e", bits16.to_bytes(2, "little"))[0]
    return struct.unpack("<f", (bits16 << 16).to_bytes(4, "little"))[0]


def _halves(word: int, dtype: torch.dtype) -> tuple[float, float]:
    """The two 16-bit halves of a 32-bit register (low, high)."""
    return _from_bits(word & 0xFFFF, dtype), _from_bits((word >> 16) & 0xFFFF, dtype)


def _round(x: float, dtype: torch.dtype) -> float:
    """Round to nearest even in fp16 / bf16 (x must be exact in float32, as here)."""
    if dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<e", x))[0]
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return _from_bits(u & 0xFFFF, dtype)


def _dequant_pair(raw: int, off: float, sc: float, dtype: torch.dtype, fma16: bool = False):
    """(half pair - off) * sc as the kernel's __hsub2/__hfma2 then __hmul2 compute it."""
    lo, hi = _halves(raw, dtype)
    out = []
    for v in (lo, hi):
        d = v * 0.0625 + off if fma16 else v - off  # exact: small integers
        out.append(_round(_round(d, dtype) * sc, dtype))
    return out


def decode_word(q: int, bits: int, dtype: torch.dtype, scale: float, zero: float):
    """One word -> list of registers, each a (low, high) value pair, in b0, b1[, b0, b1] order."""
    q &= 0xFFFFFFFF
    s = _round(scale, dtype)
    if bits == 4 and dtype == torch.float16:
        magic = 0x64006400
        q8 = q >> 8
        return [
            _dequant_pair((q & 0x000F000F) | magic, 1024 + zero, s, dtype),
            _dequant_pair((q & 0x00F000F0) | magic, -(64 + zero), s, dtype, fma16=True),
            _dequant_pair((q8 & 0x000F000F) | magic, 1024 + zero, s, dtype),
            _dequant_pair((q8 & 0x00F000F0) | magic, -(64 + zero), s, dtype, fma16=True),
        ]
    if bits == 4:
        magic = 0x43004300
        return [_dequant_pair(((q >> (4 * i)) & 0x000F000F) | magic, 128 + zero, s, dtype)
                for i in range(4)]
    byte = [(q >> (8 * i)) & 0xFF for i in range(4)]
    if dtype == torch.float16:
        # __byte_perm(q, 0x64646464, 0x4240) and 0x4341
        r0 = byte[0] | 0x6400 | ((byte[2] | 0x6400) << 16)
        r1 = byte[1] | 0x6400 | ((byte[3] | 0x6400) << 16)
        return [_dequant_pair(r0, 1024 + zero, s, dtype), _dequant_pair(r1, 1024 + zero, s, dtype)]
    f = [(b - zero) * s for b in byte]  # fp32 path, exact products
    return [(_round(f[0], dtype), _round(f[2], dtype)), (_round(f[1], dtype), _round(f[3], dtype))]


def decode_warp_tile(words: list[int], bits: int, dtype: torch.dtype, group_rows: list[list[float]],
                     zero_rows: list[list[float]] | None, two_group_rows: bool) -> torch.Tensor:
    """A warp tile's int32 words (chunk, lane, word order) -> its [64, 32] weight values.

    ``group_rows[r][p]`` is the scale of permuted column ``p`` (0..31) of the warp tile in the
    stage's group row ``r``; ``zero_rows`` likewise (None: symmetric).
    """
    chunks = 2 if bits == 4 else 4
    steps_per_chunk = 4 // chunks
    out = torch.full((TILE_K, WARP_N), float("nan"), dtype=torch.float64)
    for c in range(chunks):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for j in range(4):
                word = words[(c * 32 + lane) * 4 + j]
                # grp[0] is group row 0, grp[1] is row 1 only with two group rows per stage.
                row = (c if bits == 4 else c >> 1)
                row = row if two_group_rows else 0
                scale = group_rows[row][g * 4 + j]
                zero = zero_rows[row][g * 4 + j] if zero_rows is not None else 2 ** (bits - 1)
                regs = decode_word(word, bits, dtype, scale, zero)
                for h in range(steps_per_chunk):
                    step = c * steps_per_chunk + h
                    b0, b1 = regs[2 * h], regs[2 * h + 1]
                    n = 8 * j + g  # B fragment: column groupID
                    k = 16 * step
                    out[k + 2 * t, n], out[k + 2 * t + 1, n] = b0
                    out[k + 2 * t + 8, n], out[k + 2 * t + 9, n] = b1
    return out


def warp_tile_words(tiles: torch.Tensor, bits: int, K: int, N: int, nt: int, kt: int, wi: int) -> list[int]:
    """The words of warp tile (n-tile nt, k-tile kt, warp wi), addressed like the kernel's fetch."""
    per_tile = TILE_K * WARP_N * bits // 32
    k_tiles = K // TILE_K
    nb32 = N // WARP_N
    nw = min(WARPS, nb32 - nt * WARPS)
    start = (nt * k_tiles * WARPS + kt * nw + wi) * per_tile
    return [int(v) for v in tiles.reshape(-1)[start:start + per_tile]]


def decode_weight(prepared, dtype: torch.dtype) -> torch.Tensor:
    """The whole [K, N] weight (sorted k order) as the kernel sees it, float64 values."""
    p = prepared
    K, N, bits = p.size_k, p.size_n, p.bits
    W = torch.empty(K, N, dtype=torch.float64)
    shift = -1 if p.group_size == -1 else p.group_size.bit_length() - 1
    for nt in range(-(-N // TILE_N)):
        nw = min(WARPS, N // WARP_N - nt * WARPS)
        for kt in range(K // TILE_K):
            g0 = 0 if shift < 0 else (kt * TILE_K) >> shift
            rows = [g0, g0 + 1] if shift == 5 else [g0]
            for wi in range(nw):
                cols = slice((nt * WARPS + wi) * WARP_N, (nt * WARPS + wi + 1) * WARP_N)
                srows = [p.scales[r, cols].float().tolist() for r in rows]
                zrows = None if p.zeros is None else [p.zeros[r, cols].float().tolist() for r in rows]
                words = warp_tile_words(p.tiles, bits, K, N, nt, kt, wi)
                W[kt * TILE_K:(kt + 1) * TILE_K, cols] = decode_warp_tile(
                    words, bits, dtype, srows, zrows, shift == 5)
    return W


def simulate_gemm(x: torch.Tensor, W: torch.Tensor, workers: int,
                  order: list[int] | None = None) -> tuple[torch.Tensor, dict]:
    """``x @ W`` (float64) computed with the kernel's striped partition and slot reduction.

    ``order`` is the order in which workers run to completion (blocks finish in any order).
    Returns the result and bookkeeping (slot writes, finalizations) for assertions.
    """
    M, K = x.shape
    N = W.shape[1]
    k_tiles = K // TILE_K
    n_tiles = -(-(N // WARP_N) // WARPS)
    total = n_tiles * k_tiles
    assert 1 <= workers <= total
    out = torch.full((M, N), float("nan"), dtype=torch.float64)
    slots: dict[tuple[int, int], torch.Tensor] = {}
    counters = [0] * n_tiles
    stats = {"direct": 0, "partial": 0, "finalized": 0}

    def tile_product(nt: int, kt0: int, kt1: int) -> torch.Tensor:
        cols = slice(nt * TILE_N, min(N, (nt + 1) * TILE_N))
        rows = slice(kt0 * TILE_K, (kt1 + 1) * TILE_K)
        return x[:, rows] @ W[rows, cols]

    for worker in order or range(workers):  # the counter decides who finalizes
        it0, it1 = worker * total // workers, (worker + 1) * total // workers
        seg_first = 0
        for i in range(it1 - it0):
            it = it0 + i
            nt, kt = divmod(it, k_tiles)
            if kt != k_tiles - 1 and i != it1 - it0 - 1:
                continue
            kt_first = kt - (i - seg_first)
            acc = tile_product(nt, kt_first, kt)
            cols = slice(nt * TILE_N, min(N, (nt + 1) * TILE_N))
            if kt_first == 0 and kt == k_tiles - 1:
                out[:, cols] = acc
                stats["direct"] += 1
            else:
                key = (worker, 0 if seg_first == 0 else 1)
                assert key not in slots, f"slot {key} written twice"
                slots[key] = acc
                stats["partial"] += 1
                counters[nt] += kt - kt_first + 1
                if counters[nt] == k_tiles:
                    lo, hi = nt * k_tiles, nt * k_tiles + k_tiles - 1
                    w_lo = ((lo + 1) * workers + total - 1) // total - 1
                    w_hi = ((hi + 1) * workers + total - 1) // total - 1
                    # the first contributor used slot 1 if it started in an earlier tile,
                    # every later one starts inside this tile (slot 0)
                    total_acc = slots.pop((w_lo, 1 if w_lo * total // workers < lo else 0)).clone()
                    for w in range(w_lo + 1, w_hi + 1):
                        total_acc += slots.pop((w, 0))
                    out[:, cols] = total_acc
                    counters[nt] = 0
                    stats["finalized"] += 1
            seg_first = i + 1
    assert not slots, f"slots never reduced: {sorted(slots)}"
    assert not any(counters), counters
    return out, stats


def simulate_gemm_scalefold(x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, group_shift: int,
                            workers: int) -> torch.Tensor:
    """The scale-fold kernels' schedule (gemm_body with FOLD), stage by stage, in float64.

    ``U`` [K, N] holds the unscaled weights (n - zero), ``S`` [G, N] the scales; the product
    is ``x @ (U * S[k >> group_shift])`` (group_shift -1: one group). Per worker, like the
    kernel: ``part`` collects the unscaled sums of the stages since the last fold (the first
    stage after a fold overwrites it: FRESH); a fold (acc += S[group] * part) follows the last
    stage of each group inside a tile, and every tile end (k_tiles - 1 or the worker's last
    iteration) folds before the tile is stored or parked in a slot. Slot reduction as in
    :func:`simulate_gemm`, in worker order.
    """
    M, K = x.shape
    N = U.shape[1]
    k_tiles = K // TILE_K
    n_tiles = -(-(N // WARP_N) // WARPS)
    total = n_tiles * k_tiles
    fold_mask = 0x7FFFFFFF if group_shift < 0 else (1 << (group_shift - 6)) - 1
    out = torch.full((M, N), float("nan"), dtype=torch.float64)
    parts: dict[int, dict[tuple[int, int], torch.Tensor]] = {}

    def fold(acc, part, nt, kt):
        cols = slice(nt * TILE_N, min(N, (nt + 1) * TILE_N))
        g = 0 if group_shift < 0 else (kt * TILE_K) >> group_shift
        return acc + part * S[g, cols]

    for worker in range(workers):
        it0, it1 = worker * total // workers, (worker + 1) * total // workers
        n_iters = it1 - it0
        width = lambda nt: min(N, (nt + 1) * TILE_N) - nt * TILE_N  # noqa: E731
        nt0 = it0 // k_tiles if n_iters else 0
        acc = torch.zeros(M, width(nt0), dtype=torch.float64)
        part, fresh = None, True
        seg_first = 0
        for i in range(n_iters):
            nt, kt = divmod(it0 + i, k_tiles)
            cols = slice(nt * TILE_N, min(N, (nt + 1) * TILE_N))
            rows = slice(kt * TILE_K, (kt + 1) * TILE_K)
            stage = x[:, rows] @ U[rows, cols]
            part = stage if fresh else part + stage
            fresh = False
            tile_end = kt == k_tiles - 1 or i == n_iters - 1
            if ((kt + 1) & fold_mask) == 0 and not tile_end:
                acc, fresh = fold(acc, part, nt, kt), True
            if not tile_end:
                continue
            acc = fold(acc, part, nt, kt)
            part, fresh = torch.zeros_like(part), True
            kt_first = kt - (i - seg_first)
            if kt_first == 0 and kt == k_tiles - 1:
                out[:, cols] = acc
            else:
                parts.setdefault(nt, {})[(worker, 0 if seg_first == 0 else 1)] = acc
                # every contributor's iterations counted: the tile's sum is complete
                if sum(1 for _ in parts[nt]) and _covered(parts, nt, k_tiles, total, workers):
                    lo, hi = nt * k_tiles, nt * k_tiles + k_tiles - 1
                    w_lo = ((lo + 1) * workers + total - 1) // total - 1
                    w_hi = ((hi + 1) * workers + total - 1) // total - 1
                    s = parts[nt].pop((w_lo, 1 if w_lo * total // workers < lo else 0)).clone()
                    for w in range(w_lo + 1, w_hi + 1):
                        s += parts[nt].pop((w, 0))
                    out[:, cols] = s
            nxt = (it0 + i + 1) // k_tiles
            acc = torch.zeros(M, width(nxt) if nxt < n_tiles else 1, dtype=torch.float64)
            seg_first = i + 1
    return out


def _covered(parts, nt, k_tiles, total, workers) -> bool:
    """All contributors of tile nt have parked their slot (workers run in order here)."""
    lo, hi = nt * k_tiles, nt * k_tiles + k_tiles - 1
    w_lo = ((lo + 1) * workers + total - 1) // total - 1
    w_hi = ((hi + 1) * workers + total - 1) // total - 1
    return len(parts[nt]) == w_hi - w_lo + 1
