"""The ExLlama-style layout: GPTQ ints shuffled once at load so two values decode with one mask.

Geometry (shared with ``csrc/exllama.h`` and ``csrc/qdq4.cuh``; change both or neither):

* Rows are in the *sorted* k order (act-order weights are permuted at load, :mod:`.prepare`)
  and padded with zeros to ``k_pad = ceil(K / 8) * 8``; a kernel thread owns one column quad
  (4 columns) and reads its 8 k rows x 4 columns with one 16-byte load.
* The words are an int32 tensor ``[k_pad / 8, N / 4, 4]``: for 8-row block ``r`` and quad ``c``,
  word ``j`` holds k rows ``8r + 4(j >> 1) + i`` (``i`` = 0..3) of the column pair
  ``4c + 2(j & 1) + e`` (``e`` = 0 low half, 1 high half).
* Inside a word, value ``(i, e)`` sits where a right rotation by ``FIELD_ROTATIONS[i]`` puts it
  at bits ``6 + 16e .. 9 + 16e``: one LOP3 ``(w & 0x03C003C0) | 0x3C003C00`` then gives the
  half2 ``(1 + q_lo / 16, 1 + q_hi / 16)`` (for bf16 the rotation is 3 bits further).
* Scales and zero points are folded per group and column quad (:func:`fold_scales`):
  ``S = 16 * scale`` and ``Z = -(16 + zero) * scale``, so that ``w = x * S + Z`` is one fma.

Everything here is plain torch and runs on any device; :func:`unshuffle` is the exact inverse
of :func:`shuffle`.
"""

from __future__ import annotations

import torch

from gptq_core.errors import FormatError, NotSupportedError

STEP_K = 8               # k rows per 16-byte load (csrc/exllama.h kStepK)
QUAD = 4                 # columns per thread
FIELD_ROTATIONS = (0, 4, 8, 28)  # right rotation that brings k row i of a word to bits 6-9 / 22-25
FIELD_BASE = 6           # the value's lowest bit after the rotation (low half; +16 for the high)
FP16_MAX = 65504.0


def padded_k(K: int) -> int:
    return -(-K // STEP_K) * STEP_K


def field_bits() -> torch.Tensor:
    """int64 [4 (i), 2 (e), 4 (value bit)]: the word bit holding each bit of value (i, e)."""
    rot = torch.tensor(FIELD_ROTATIONS, dtype=torch.int64).view(4, 1, 1)
    e = torch.arange(2, dtype=torch.int64).view(1, 2, 1)
    b = torch.arange(4, dtype=torch.int64).view(1, 1, 4)
    return (FIELD_BASE + 16 * e + b + rot) % 32


def _check(K: int, N: int) -> None:
    if N % QUAD:
        raise FormatError(f"the exllama layout needs N % {QUAD} == 0, got N={N}")
    if K <= 0:
        raise FormatError(f"the exllama layout needs K > 0, got K={K}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return (((words & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000).to(torch.int32)


def shuffle(q: torch.Tensor) -> torch.Tensor:
    """Quantized 4-bit ints [K, N] (sorted k order) -> the kernel's words, int32 [k_pad / 8, N / 4, 4]."""
    K, N = q.shape
    _check(K, N)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise FormatError("shuffle takes 4-bit values in 0..15")
    kp = padded_k(K)
    v = torch.zeros(kp, N, dtype=torch.int64, device=q.device)
    v[:K] = q.to(torch.int64)
    # [r, hk, i, c, p, e] -> [r, c, hk, p, i, e]: word j = 2 hk + p, value (i, e).
    v = v.view(kp // STEP_K, 2, 4, N // QUAD, 2, 2).permute(0, 3, 1, 4, 2, 5)
    pos = field_bits().to(q.device)                       # [4, 2, 4]
    bit = torch.arange(4, device=q.device, dtype=torch.int64)
    parts = ((v.unsqueeze(-1) >> bit) & 1) << pos           # [..., i, e, b]
    words = parts.sum(dim=(-3, -2, -1))                     # bits are disjoint: sum == or
    return _to_int32(words.reshape(kp // STEP_K, N // QUAD, 4))


def unshuffle(words: torch.Tensor, K: int, N: int) -> torch.Tensor:
    """Inverse of :func:`shuffle`: words -> quantized ints uint8 [K, N] (padding dropped)."""
    _check(K, N)
    kp = padded_k(K)
    if words.numel() != kp // STEP_K * N:
        raise FormatError(f"{words.numel()} words cannot hold a {K} x {N} 4-bit weight")
    w = (words.reshape(kp // STEP_K, N // QUAD, 2, 2).to(torch.int64) & 0xFFFFFFFF)
    pos = field_bits().to(words.device)                     # [4, 2, 4]
    bits = (w[..., None, None, None] >> pos) & 1            # [r, c, hk, p, i, e, b]
    vals = (bits << torch.arange(4, device=words.device, dtype=torch.int64)).sum(-1)
    q = vals.permute(0, 2, 4, 1, 3, 5).reshape(kp, N)       # [r, hk, i, c, p, e]
    return q[:K].to(torch.uint8)


def round_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the nearest fp16 value (ties to even), still float64, by one rounding.

    (A float64 -> float16 cast may round twice, through float32.) Subnormals are handled;
    values beyond fp16's range are returned as they are, for the caller to reject.
    """
    mant, exp = torch.frexp(x)
    e = torch.clamp(exp.to(torch.float64) - 1, min=-14)     # exponent of the value, fp16's floor
    ulp = torch.exp2(e - 10)
    return torch.where(x == 0, x, torch.round(x / ulp) * ulp)


def fold_scales(scales: torch.Tensor, zeros: torch.Tensor, act_dtype: torch.dtype) -> torch.Tensor:
    """Per group and column: ``S = 16 * scale`` and ``Z = -(16 + zero) * scale``, laid out per quad.

    float16 layers: float16 ``[G, N / 4, 8]`` = ``S0 S1 Z0 Z1 S2 S3 Z2 Z3`` (half2 pairs of the
    kernel's two column pairs). bfloat16 layers: float32 ``[G, N / 4, 8]`` = ``S0..S3 Z0..Z3``.
    """
    G, N = scales.shape
    _check(1, N)
    s = scales.to(torch.float64)
    S = 16.0 * s
    Z = -(16.0 + zeros.to(torch.float64)) * s
    if act_dtype == torch.float16:
        S, Z = round_to_fp16(S), round_to_fp16(Z)
        if bool((S.abs() > FP16_MAX).any() | (Z.abs() > FP16_MAX).any()):
            raise NotSupportedError(
                "exllama folds 16 * scale and (16 + zero) * scale into float16; this layer's "
                f"largest scale {float(s.abs().max()):.4g} overflows it; use another backend",
                ["scales too large for the float16 fold (|scale| * 32 > 65504)"],
            )
        S4, Z4 = S.view(G, N // QUAD, 2, 2), Z.view(G, N // QUAD, 2, 2)
        out = torch.stack((S4, Z4), dim=3)                  # [G, N/4, pair, S|Z, 2]
        return out.reshape(G, N // QUAD, 8).to(torch.float16).contiguous()
    if act_dtype == torch.bfloat16:
        out = torch.cat((S.view(G, N // QUAD, 4), Z.view(G, N // QUAD, 4)), dim=2)
        return out.to(torch.float32).contiguous()
    raise NotSupportedError(f"exllama computes in float16 or bfloat16, not {act_dtype}",
                            [f"activation dtype {act_dtype} is not supported"])


def unfold_scales(sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse view of :func:`fold_scales`: (S, Z) float64 [G, N]."""
    G, quads, _ = sz.shape
    t = sz.to(torch.float64)
    if sz.dtype == torch.float16:
        t = t.view(G, quads, 2, 2, 2)                       # [G, quad, pair, S|Z, e]
        return t[:, :, :, 0].reshape(G, quads * 4), t[:, :, :, 1].reshape(G, quads * 4)
    return t[:, :, :4].reshape(G, quads * 4), t[:, :, 4:].reshape(G, quads * 4)
