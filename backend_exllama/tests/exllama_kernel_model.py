"""A bit-level Python model of what the CUDA kernel does with the prepared tensors.

Written from the kernel's code (csrc/qdq4.cuh, csrc/gemm.cuh), not from layout.py's packing,
so that the two check each other on a CPU:

* :func:`decode` is the kernel's dequantization: the rotation, the one mask-and-or, the bits
  read as an fp16 (bf16) pair, and the arithmetic that follows, rounded as the GPU rounds.
  fp16: the pivot P and column factor M derived from the folded scale's bits (``unfold_f16``:
  integer ops on the packed half2, one ``mul.rn.f16x2``), then ``add.rn.f16x2`` of ``-X0``;
  bf16: ``fmaf`` with the folded constants in fp32.
* :func:`dequantize` is ``dequant_kernel``: fp16 ``d * M`` rounded once; bf16 the fma rounded
  to bf16.
* :func:`simulate_gemm` is ``gemm_kernel``'s control flow: the k range of each split, staged
  activations read through the permutation (zeros past K), group segments, steps of 32 and 8
  rows with fp16 partial sums of ``d * a`` kept in half2 across a step and folded into fp32
  by one ``fmaf`` with the column's M after it, the splits' fp32 sums, the bias and the final
  rounding.
"""

from __future__ import annotations

import torch

from gptq_backend_exllama.layout import round_to_fp16

F16_MASK, F16_EXPONENT = 0x03C003C0, 0x7C007C00
BF16_MASK, BF16_ONE = 0x00780078, 0x3F803F80
ROT_F16 = (0, 4, 8, 28)     # qdq4.cuh pair_f16
ROT_BF16 = (3, 7, 11, 31)   # qdq4.cuh pair_bf16
STEP_K, STAGE_K, SPLIT_ALIGN = 8, 256, 32
U32 = 0xFFFFFFFF


def _rotr(w: torch.Tensor, r: int) -> torch.Tensor:
    w = w & U32
    return w if r == 0 else ((w >> r) | (w << (32 - r))) & U32


def _f16(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).to(torch.int16).view(torch.float16).to(torch.float64)


def _f16_bits(x: torch.Tensor) -> torch.Tensor:
    """float64 values that are fp16 values -> their 16 bits, int64."""
    return x.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF


def _f32(bits: torch.Tensor) -> torch.Tensor:
    return ((bits ^ 0x80000000) - 0x80000000).to(torch.int32).view(torch.float32).to(torch.float64)


def _pair(bits2: torch.Tensor) -> torch.Tensor:
    """A half2 register (int64 holding 32 bits) -> float64 [..., 2] (low, high)."""
    return torch.stack((_f16(bits2 & 0xFFFF), _f16(bits2 >> 16)), -1)


def rn16(x: torch.Tensor) -> torch.Tensor:
    """An fp16 operation's result: the exact float64 value rounded to nearest even, with
    fp16's overflow to +-inf (round_to_fp16 leaves out-of-range values alone)."""
    r = round_to_fp16(x)
    return torch.where(r.abs() > 65504.0, r * float("inf"), r)


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``fmaf(a, b, c)``: ``a * b + c`` rounded once to fp32 (float64 in, float64 out). ``a * b``
    must be exact in float64 (the callers' factors have at most 32 significant bits together);
    the sum is rounded to odd in float64 (TwoSum), which makes the final rounding to fp32 exact."""
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    s = torch.where((err != 0) & even & torch.isfinite(s), torch.nextafter(s, toward), s)
    return s.to(torch.float32).to(torch.float64)


def unfold_f16(sz_words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qdq4.cuh ``unfold_f16`` on the prepared fp16 constants viewed as 32-bit words
    ``[..., 4]`` = (S01, -X0 01, S23, -X0 23): (pivot words [..., 2], -X0 words [..., 2],
    M float64 [..., 4]), the integer steps done on the packed pair as the kernel does them."""
    s2 = sz_words[..., 0::2] & U32                           # S01, S23
    e = s2 & F16_EXPONENT
    pivot = e | (~(((e + F16_EXPONENT) & U32) >> 5) & 0x04000400)
    inv = (0x78007800 - pivot) & U32
    m = rn16(_pair(s2) * _pair(inv))                         # mul.rn.f16x2 (exact)
    return pivot, sz_words[..., 1::2] & U32, m.flatten(-2)


def _words(sz: torch.Tensor) -> torch.Tensor:
    """fp16 constants [G, quads, 8] -> the four 32-bit words of each quad, int64 [G, quads, 4]."""
    b = sz.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    return b[..., 0::2] | (b[..., 1::2] << 16)


def decode(words: torch.Tensor, sz: torch.Tensor, group_rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """int32 words [k_pad/8, N/4, 4] and folded constants -> what the gemm kernel multiplies the
    activations by, float64 [k_pad, N] in the sorted k order, and the per-group column factors
    the fp16 kernel scales its sums by (float64 [G, N]; None for bf16, whose values are the
    weights themselves)."""
    R, quads, _ = words.shape
    k_pad, N = R * STEP_K, quads * 4
    w = words.to(torch.int64) & U32
    g = torch.arange(R) * STEP_K // group_rows                 # group of each 8-row block
    out = torch.empty(R, 2, 4, quads, 2, 2, dtype=torch.float64)  # [r, hk, i, quad, p, e]
    bf16 = sz.dtype == torch.float32
    if bf16:
        t = sz.to(torch.float64)[g]                            # [R, quads, 8]
        m = None
    else:
        pivot, neg_x0, m = unfold_f16(_words(sz))
        pivot, neg_x0 = pivot[g], neg_x0[g]                    # [R, quads, 2]
    for j in range(4):
        hk, p = j >> 1, j & 1
        for i in range(4):
            if bf16:
                S = t[:, :, [2 * p, 2 * p + 1]]
                Z = t[:, :, [4 + 2 * p, 4 + 2 * p + 1]]
                x = (_rotr(w[:, :, j], ROT_BF16[i]) & BF16_MASK) | BF16_ONE
                pair = torch.stack((_f32((x & 0xFFFF) << 16), _f32(x & 0xFFFF0000)), -1)
                val = fma32(pair, S, Z)                                    # fmaf
            else:
                x = (_rotr(w[:, :, j], ROT_F16[i]) & F16_MASK) | pivot[:, :, p]   # LOP3
                val = rn16(_pair(x) + _pair(neg_x0[:, :, p]))                     # add.rn.f16x2
            out[:, hk, i, :, p, :] = val
    return out.reshape(k_pad, N), m if m is None else m.reshape(-1, N)


def _to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float64 holding fp32 values -> bf16 values, round to nearest even (NaN stays NaN)."""
    return x.to(torch.float32).to(torch.bfloat16).to(torch.float64)


def dequantize(words: torch.Tensor, sz: torch.Tensor, group_rows: int) -> torch.Tensor:
    """``dequant_kernel``: the dense weight it writes (float64 values of the activation dtype,
    [k_pad, N], sorted k order)."""
    vals, m = decode(words, sz, group_rows)
    if m is None:
        return _to_bf16(vals)
    g = torch.arange(vals.shape[0]) // group_rows
    return rn16(vals * m[g])                                               # mul.rn.f16x2


def splits_for(k_pad: int, splits: int) -> list[tuple[int, int]]:
    """The k ranges of ``splits`` splits as exllama_ops.cpp computes them."""
    units = -(-k_pad // SPLIT_ALIGN)
    splits = min(splits, units)
    k_split = -(-units // splits) * SPLIT_ALIGN
    if splits == 1 or k_split >= k_pad:
        k_split = k_pad
    return [(b, min(b + k_split, k_pad)) for b in range(0, k_pad, k_split)]


def simulate_gemm(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, perm: torch.Tensor | None,
                  group_rows: int, bias: torch.Tensor | None, splits: int) -> torch.Tensor:
    """``gemm_kernel`` over every chunk, column and split; returns float64 values of the output
    dtype (fp16 or bf16, rounded as the kernel stores them)."""
    M, K = x.shape
    W, col = decode(words, sz, group_rows)
    k_pad = W.shape[0]
    a = torch.zeros(M, k_pad, dtype=torch.float64)
    a[:, :K] = x.to(torch.float64)[:, perm.long()] if perm is not None else x.to(torch.float64)
    fp16 = sz.dtype == torch.float16
    total = torch.zeros(M, W.shape[1], dtype=torch.float64)
    for k_begin, k_end in splits_for(k_pad, splits):
        acc = torch.zeros(M, W.shape[1], dtype=torch.float64)
        for ks in range(k_begin, k_end, STAGE_K):
            ke = min(ks + STAGE_K, k_end)
            k = ks
            while k < ke:
                g = k // group_rows
                seg_end = min((g + 1) * group_rows, ke)
                while k < seg_end:
                    n = 4 * STEP_K if k + 4 * STEP_K <= seg_end else STEP_K
                    if fp16:  # half2 partial sums of d * a over the step, then one fmaf by M
                        h = torch.zeros_like(total)
                        for kk in range(k, k + n):
                            h = rn16(W[kk][None, :] * a[:, kk][:, None] + h)   # fma.rn.f16x2
                        acc = fma32(h, col[g][None, :], acc)
                    else:     # fp32 fma per weight and row
                        for kk in range(k, k + n):
                            acc = fma32(W[kk][None, :], a[:, kk][:, None], acc)
                    k += n
        total = (total + acc.to(torch.float64)).to(torch.float32).to(torch.float64)
    if bias is not None:
        total = (total + bias.to(torch.float64)).to(torch.float32).to(torch.float64)
    return total.to(x.dtype).to(torch.float64)
