"""A bit-level Python model of what the CUDA kernel does with the prepared tensors.

Written from the kernel's code (csrc/qdq4.cuh, csrc/gemm.cuh), not from layout.py's packing,
so that the two check each other on a CPU:

* :func:`decode` is the kernel's dequantization: the rotation, the one mask-and-or, the bits
  read as an fp16 (bf16) pair, and the fma with the folded constants, rounded as the GPU
  rounds (fp16: ``fma.rn.f16x2``; bf16: ``fmaf`` in fp32).
* :func:`simulate_gemm` is ``gemm_kernel``'s control flow: the k range of each split, staged
  activations read through the permutation (zeros past K), group segments, steps of 32 and 8
  rows with fp16 partial sums kept in half2 across a step and folded into fp32 after it, the
  splits' fp32 sums, the bias and the final rounding.
"""

from __future__ import annotations

import torch

from gptq_backend_exllama.layout import round_to_fp16

F16_MASK, F16_ONE = 0x03C003C0, 0x3C003C00
BF16_MASK, BF16_ONE = 0x00780078, 0x3F803F80
ROT_F16 = (0, 4, 8, 28)     # qdq4.cuh pair_f16
ROT_BF16 = (3, 7, 11, 31)   # qdq4.cuh pair_bf16
STEP_K, STAGE_K, SPLIT_ALIGN = 8, 256, 32


def _rotr(w: torch.Tensor, r: int) -> torch.Tensor:
    w = w & 0xFFFFFFFF
    return w if r == 0 else ((w >> r) | (w << (32 - r))) & 0xFFFFFFFF


def _f16(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).to(torch.int16).view(torch.float16).to(torch.float64)


def _f32(bits: torch.Tensor) -> torch.Tensor:
    return ((bits ^ 0x80000000) - 0x80000000).to(torch.int32).view(torch.float32).to(torch.float64)


def decode(words: torch.Tensor, sz: torch.Tensor, group_rows: int) -> torch.Tensor:
    """int32 words [k_pad/8, N/4, 4] and folded constants -> the weight the kernel computes,
    float64 [k_pad, N] in the sorted k order."""
    R, quads, _ = words.shape
    k_pad, N = R * STEP_K, quads * 4
    w = words.to(torch.int64) & 0xFFFFFFFF
    g = torch.arange(R) * STEP_K // group_rows                 # group of each 8-row block
    out = torch.empty(R, 2, 4, quads, 2, 2, dtype=torch.float64)  # [r, hk, i, quad, p, e]
    bf16 = sz.dtype == torch.float32
    t = sz.to(torch.float64)[g]                                # [R, quads, 8]
    for j in range(4):
        hk, p = j >> 1, j & 1
        if bf16:
            S = t[:, :, [2 * p, 2 * p + 1]]
            Z = t[:, :, [4 + 2 * p, 4 + 2 * p + 1]]
        else:
            S = t[:, :, [4 * p, 4 * p + 1]]
            Z = t[:, :, [4 * p + 2, 4 * p + 3]]
        for i in range(4):
            if bf16:
                x = (_rotr(w[:, :, j], ROT_BF16[i]) & BF16_MASK) | BF16_ONE
                pair = torch.stack((_f32((x & 0xFFFF) << 16), _f32(x & 0xFFFF0000)), -1)
                val = (pair * S + Z).to(torch.float32).to(torch.float64)   # fmaf: one rounding
            else:
                x = (_rotr(w[:, :, j], ROT_F16[i]) & F16_MASK) | F16_ONE
                pair = torch.stack((_f16(x & 0xFFFF), _f16(x >> 16)), -1)
                val = round_to_fp16(pair * S + Z)                          # fma.rn.f16x2
            out[:, hk, i, :, p, :] = val
    return out.reshape(k_pad, N)


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
    W = decode(words, sz, group_rows)
    k_pad = W.shape[0]
    a = torch.zeros(M, k_pad, dtype=torch.float64)
    a[:, :K] = x.to(torch.float64)[:, perm.long()] if perm is not None else x.to(torch.float64)
    fp16 = sz.dtype == torch.float16
    total = torch.zeros(M, W.shape[1], dtype=torch.float64)
    for k_begin, k_end in splits_for(k_pad, splits):
        acc = torch.zeros(M, W.shape[1], dtype=torch.float32)
        for ks in range(k_begin, k_end, STAGE_K):
            ke = min(ks + STAGE_K, k_end)
            k = ks
            while k < ke:
                g = k // group_rows
                seg_end = min((g + 1) * group_rows, ke)
                while k < seg_end:
                    n = 4 * STEP_K if k + 4 * STEP_K <= seg_end else STEP_K
                    if fp16:  # half2 partial sums over the step, then one fold into fp32
                        h = torch.zeros_like(total)
                        for kk in range(k, k + n):
                            h = round_to_fp16(W[kk][None, :] * a[:, kk][:, None] + h)
                        acc = acc + h.to(torch.float32)
                    else:     # fp32 fma per weight and row
                        for kk in range(k, k + n):
                            prod = W[kk][None, :] * a[:, kk][:, None]
                            acc = (prod + acc.to(torch.float64)).to(torch.float32)
                    k += n
        total = (total + acc.to(torch.float64)).to(torch.float32).to(torch.float64)
    if bias is not None:
        total = (total + bias.to(torch.float64)).to(torch.float32).to(torch.float64)
    return total.to(x.dtype).to(torch.float64)
