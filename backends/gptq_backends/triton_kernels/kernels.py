"""Triton kernels of the triton backend, over the pair-interleaved layout of :mod:`.layout`.

``qmm_kernel`` computes ``out = x @ dequant(W) (+ bias)`` as ``out^T = W^T x^T``: the weight
sub-tile [BN, S], dequantized in registers, is the MMA's A operand (on Hopper a register
operand of wgmma, 64 output columns per warpgroup), and the activations x^T [S, BM] are the B
operand: for decode (M = 1..16) this is the GEMV path, on tensor cores (an FMA version
measured 14 SASS instructions per weight with spills against 3.6 here, see
NOTES/perf-triton.md). ``tl.dot`` accumulates in fp32 (IEEE_DOT for fp32 activations, and for
bf16 under the interpreter, whose bf16 dot is broken). K can be split across
programs (SPLIT_K): each writes an fp32 partial, and the last program of a tile to finish (an
atomic ticket) sums the partials in a fixed order, adds the bias and writes the output, so a
split launch is still one launch and deterministic.

``dequant_kernel`` writes the dequantized weight [K, N] in original channel order, for the
"dequantize once + cuBLAS" path of large M.

Act-order: ``qmm_kernel`` reads x with its columns already in the weight's sorted order (the
launcher gathers them once with ``gather_cols_kernel``); gathering them per tile inside the
main loop, or once per program before it, measured slower on the H100 (NOTES/perf-triton.md,
"Variants removed"). ``dequant_kernel`` scatters the sorted rows back to their original channels.

Dequantization: ``(word >> b*j) & mask | 0x64006400`` is two fp16 ``1024 + q`` at once (the
"magic number"; never an integer-to-float conversion, slow on Hopper); subtracting
``1024 + zero`` is exact and only the scale multiply rounds, once, like the reference.
With ASM (2/4/8-bit fp16 on CUDA, see ``target.use_asm``) the shift's ``& mask | magic`` is one
inline-PTX LOP3 instead of two (H100 8192x28672 M=1: 70.5 -> 66.2 us, NOTES/perf-triton.md).
MODE: 0 fp16 all along; 1 bf16 (``0x4300`` is bf16 128, values < 128: bits <= 4); 2 the exact
fp16 ``q - zero`` times an fp32 scale (8-bit bf16, fp32 activations, bf16 when interpreted).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scale_dtype(v, MODE: tl.constexpr):
    """Cast to the float the scale multiply runs in (fp16, bf16 or fp32 by MODE)."""
    if MODE == 0:
        return v.to(tl.float16)
    elif MODE == 1:
        return v.to(tl.bfloat16)
    else:
        return v.to(tl.float32)


@triton.jit
def _group_params(sc_ptr, zr_ptr, g, offs_n, n_mask, N_PAD,
                  BITS: tl.constexpr, CONST_ZERO: tl.constexpr, MODE: tl.constexpr,
                  SCALE_F32: tl.constexpr):
    """Scale and (magic + zero) of group ``g`` for columns ``offs_n``, as [BN, 1] columns."""
    s = tl.load(sc_ptr + g * N_PAD + offs_n, mask=n_mask, other=0.0)
    if SCALE_F32:
        s = s.to(tl.float32)
    else:
        s = _scale_dtype(s, MODE)
    if MODE == 1:
        magic = 128.0
    else:
        magic = 1024.0
    if CONST_ZERO:
        zf = tl.full(offs_n.shape, magic + (1 << (BITS - 1)), tl.float32)
    else:
        zf = tl.load(zr_ptr + g * N_PAD + offs_n, mask=n_mask, other=0).to(tl.float32) + magic
    if MODE == 1:
        zz = zf.to(tl.bfloat16)
    else:
        zz = zf.to(tl.float16)
    return s[:, None], zz[:, None]


@triton.jit
def _load_tile(qw_ptr, qh_ptr, t, offs_r, offs_n, n_mask, N_PAD, BITS: tl.constexpr, S: tl.constexpr):
    """Planar tile t's [S/2, BN] int32 words (3-bit: two low-bit word rows and the third bits)."""
    cols = offs_n[None, :]
    if BITS == 3:
        low = (t * S + offs_r)[:, None] * N_PAD + cols
        words = tl.load(qw_ptr + low, mask=n_mask[None, :], other=0, eviction_policy="evict_first")
        words_b = tl.load(qw_ptr + low + (S // 2) * N_PAD, mask=n_mask[None, :], other=0,
                          eviction_policy="evict_first")
        high = tl.load(qh_ptr + (t * (S // 2) + offs_r)[:, None] * N_PAD + cols,
                       mask=n_mask[None, :], other=0, eviction_policy="evict_first")
    else:
        off = (t * (S // 2) + offs_r)[:, None] * N_PAD + cols
        words = tl.load(qw_ptr + off, mask=n_mask[None, :], other=0, eviction_policy="evict_first")
        words_b = words
        high = words
    return words, words_b, high


@triton.jit
def _lop3_and_or(a, mask: tl.constexpr, magic: tl.constexpr):
    """``(a & mask) | magic`` as one LOP3 (inline PTX; ptxas keeps one constant in a register).
    Written in Triton, ptxas emits two LOP3 (SASS has one immediate slot per LOP3)."""
    return tl.inline_asm_elementwise(
        "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
        [a, tl.full(a.shape, mask, tl.int32), tl.full(a.shape, magic, tl.int32)],
        dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _sub_tile(words, words_b, high, j: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr,
              ASM: tl.constexpr = False):
    """Sub-tile j of a loaded tile as magic floats, transposed: [BN, S].

    ``words`` (and for 3-bit ``words_b``, sub-tiles 8-15, and ``high``, the third bits) are
    [S/2, BN] int32 tiles of the layout in :mod:`.layout`.
    """
    if MODE == 1:
        magic2: tl.constexpr = 0x43004300
    else:
        magic2: tl.constexpr = 0x64006400
    if BITS == 3:
        if j < 8:
            src = words
        else:
            src = words_b
        r = ((src >> (2 * (j % 8))) & 0x00030003) | (((high >> j) & 0x00010001) << 2) | magic2
    elif ASM:
        r = _lop3_and_or(words >> (BITS * j), ((1 << BITS) - 1) * 0x00010001, magic2)
    else:
        r = ((words >> (BITS * j)) & (((1 << BITS) - 1) * 0x00010001)) | magic2
    if MODE == 1:
        lo = r.to(tl.int16).to(tl.bfloat16, bitcast=True)
        hi = (r >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        lo = r.to(tl.int16).to(tl.float16, bitcast=True)
        hi = (r >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    v = tl.join(lo, hi)              # [S/2, BN, 2]: channel 2r+h
    v = tl.permute(v, (1, 0, 2))     # [BN, S/2, 2]
    return tl.reshape(v, (v.shape[0], 2 * v.shape[1]))


@triton.jit
def _dot(w, xt, acc, IEEE_DOT: tl.constexpr):
    if IEEE_DOT:
        return tl.dot(w, xt, acc, input_precision="ieee")
    else:
        return tl.dot(w, xt, acc)


# Run-time (not constexpr) where it costs nothing measurable, so that fewer variants compile:
# M, K and TILES are not even specialized on divisibility; SPLIT_K only on being 1.
@triton.jit(do_not_specialize=["M", "K", "TILES", "HAS_BIAS"])
def qmm_kernel(
    x_ptr, qw_ptr, qh_ptr, sc_ptr, zr_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, N_PAD, TILES, stride_xm, stride_om, SPLIT_K, HAS_BIAS,
    BITS: tl.constexpr, S: tl.constexpr, GS: tl.constexpr,
    CONST_ZERO: tl.constexpr, MODE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE_DOT: tl.constexpr,
    ASM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    H: tl.constexpr = 16 if BITS == 3 else 16 // BITS
    BKP: tl.constexpr = H * S
    # Where the scale is applied. The MMA sees exact integers (q - zero) and the fp32 products
    # are scaled once per group ("post": BLOCK_M*BLOCK_N multiplies per group, cheaper than one
    # per weight while BLOCK_M is small next to the group), or once at the end for a single
    # group (-1). Otherwise ("pre", e.g. group 48 in tiles of 64, or large BLOCK_M) each
    # weight is scaled before the MMA.
    SPAN: tl.constexpr = BKP if (GS == -1 or GS >= BKP) else GS
    ALIGNED: tl.constexpr = (GS == -1) or (GS % BKP == 0) or (BKP % GS == 0)
    SCALE_END: tl.constexpr = GS == -1
    SCALE_POST: tl.constexpr = (not SCALE_END) and ALIGNED and (BLOCK_M * 4 <= SPAN)
    SPG: tl.constexpr = SPAN // S if SCALE_POST else 1  # sub-tiles per scale load
    XT: tl.constexpr = x_ptr.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, S // 2)
    offs_s = tl.arange(0, S)
    m_mask = offs_m < M
    n_mask = offs_n < N_PAD

    tiles_per_split = (TILES + SPLIT_K - 1) // SPLIT_K  # not tl.cdiv: see target.kernels
    t_begin = pid_k * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, TILES)

    acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    if SCALE_END:
        s, zz = _group_params(sc_ptr, zr_ptr, 0, offs_n, n_mask, N_PAD, BITS, CONST_ZERO, MODE, True)

    x_cols = x_ptr + offs_m[None, :] * stride_xm
    for t in range(t_begin, t_end):
        words, words_b, high = _load_tile(qw_ptr, qh_ptr, t, offs_r, offs_n, n_mask, N_PAD,
                                          BITS, S)
        for j in tl.static_range(H):
            k0 = t * BKP + j * S
            if not SCALE_END:
                if j % SPG == 0:
                    s, zz = _group_params(sc_ptr, zr_ptr, k0 // GS, offs_n, n_mask, N_PAD,
                                          BITS, CONST_ZERO, MODE, SCALE_POST)
                    if SCALE_POST:
                        acc_g = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
            v = _sub_tile(words, words_b, high, j, BITS, MODE, ASM)
            if SCALE_POST or SCALE_END:
                w = v - zz  # q - zero: exact
            elif MODE == 2:
                w = (v - zz).to(tl.float32) * s
            else:
                w = (v - zz) * s
            if IEEE_DOT:
                w = w.to(tl.float32)
            else:
                w = w.to(XT)
            offs_k = k0 + offs_s
            if EVEN_K:  # a mask along K would turn the 16-byte copies into 2-byte loads
                x_mask = m_mask[None, :]
            else:
                x_mask = m_mask[None, :] & (offs_k < K)[:, None]
            xt = tl.load(x_cols + offs_k[:, None], mask=x_mask, other=0.0)  # [S, BM]
            if IEEE_DOT:
                xt = xt.to(tl.float32)
            if SCALE_POST:
                acc_g = _dot(w, xt, acc_g, IEEE_DOT)
                if j % SPG == SPG - 1:
                    acc += acc_g * s
            else:
                acc = _dot(w, xt, acc, IEEE_DOT)
    if SCALE_END:
        acc = acc * s

    out_mask = m_mask[:, None] & (offs_n < N)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        res = tl.trans(acc)
        if HAS_BIAS != 0:
            res += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials: [SPLIT_K, grid_n*BLOCK_N, grid_m*BLOCK_M] fp32, in acc's own layout, no masks.
        rows_all = tl.num_programs(1) * BLOCK_N
        cols_all = tl.num_programs(0) * BLOCK_M
        p_off = offs_n[:, None] * cols_all + offs_m[None, :]
        tl.store(part_ptr + pid_k * rows_all * cols_all + p_off, acc)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(1) + pid_n
        ticket = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            total = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
            for kk in range(SPLIT_K):
                total += tl.load(part_ptr + kk * rows_all * cols_all + p_off, cache_modifier=".cg")
            res = tl.trans(total)
            if HAS_BIAS != 0:
                res += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def dequant_kernel(
    qw_ptr, qh_ptr, sc_ptr, zr_ptr, perm_ptr, out_ptr,
    K, N, N_PAD, stride_ok,
    BITS: tl.constexpr, S: tl.constexpr, GS: tl.constexpr,
    CONST_ZERO: tl.constexpr, ACT_ORDER: tl.constexpr, MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One planar tile x BLOCK_N columns of the dequantized weight, rows in original order."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    H: tl.constexpr = 16 if BITS == 3 else 16 // BITS
    BKP: tl.constexpr = H * S
    OT: tl.constexpr = out_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, S // 2)
    offs_s = tl.arange(0, S)
    n_mask = offs_n < N_PAD
    words, words_b, high = _load_tile(qw_ptr, qh_ptr, t, offs_r, offs_n, n_mask, N_PAD, BITS, S)
    for j in tl.static_range(H):
        k0 = t * BKP + j * S
        g = 0 if GS == -1 else k0 // GS
        s, zz = _group_params(sc_ptr, zr_ptr, g, offs_n, n_mask, N_PAD, BITS, CONST_ZERO, MODE,
                              False)
        v = _sub_tile(words, words_b, high, j, BITS, MODE)
        if MODE == 2:
            w = (v - zz).to(tl.float32) * s
        else:
            w = (v - zz) * s
        offs_k = k0 + offs_s
        if ACT_ORDER:
            rows = tl.load(perm_ptr + offs_k)
        else:
            rows = offs_k
        mask = (offs_k < K)[None, :] & (offs_n < N)[:, None]
        tl.store(out_ptr + rows[None, :] * stride_ok + offs_n[:, None], w.to(OT), mask=mask)


@triton.jit(do_not_specialize=["K"])
def gather_cols_kernel(x_ptr, perm_ptr, out_ptr, K, stride_xm, stride_om, BLOCK: tl.constexpr):
    """``out[m, k] = x[m, perm[k]]`` for k < K: x's columns in the act-order weight's sorted
    order (what ``x.index_select(1, perm[:K])`` computes), one program per row and BLOCK
    columns."""
    m = tl.program_id(0)  # rows on axis 0 (no 65535 limit), column blocks on axis 1
    pid_k = tl.program_id(1)
    offs = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    idx = tl.load(perm_ptr + offs, mask=mask, other=0)
    v = tl.load(x_ptr + m * stride_xm + idx, mask=mask, other=0.0)
    tl.store(out_ptr + m * stride_om + offs, v, mask=mask)
