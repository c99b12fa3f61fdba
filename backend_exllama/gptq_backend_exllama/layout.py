"""The ExLlama-style layout: GPTQ ints shuffled once at load so two values decode with one mask.

Geometry (shared with ``csrc/exllama.h`` and ``csrc/qdq4.cuh``; change both or neither):

* Rows are in the *sorted* k order (act-order weights are permuted at load, :mod:`.prepare`)
  and padded with zeros to ``k_pad = ceil(K / 8) * 8``; a kernel thread owns one column quad
  (4 columns) and reads its 8 k rows x 4 columns with one 16-byte load.
* The words are an int32 tensor ``[k_pad / 8, N / 4, 4]``: for 8-row block ``r`` and quad ``c``,
  word ``j`` holds k rows ``8r + 4(j >> 1) + i`` (``i`` = 0..3) of the column pair
  ``4c + 2(j & 1) + e`` (``e`` = 0 low half, 1 high half).
* Inside a word, value ``(i, e)`` sits where a right rotation by ``FIELD_ROTATIONS[i]`` puts it
  at bits ``6 + 16e .. 9 + 16e``: one LOP3 ``(w & 0x03C003C0) | P`` then gives the half2
  ``(P (1 + q_lo / 16), P (1 + q_hi / 16))`` for a power of two ``P`` (bf16: the rotation is 3
  bits further and ``P`` = 1).
* Scales and zero points are folded per group and column quad (:func:`fold_scales`) so that
  ``q == zero`` decodes to exactly 0 (an infinite activation times it is NaN, as in the float64
  reference, docs/DESIGN.md §2 and §5). fp16 layers: ``S = 16 * scale`` and
  ``-X0 = -P (1 + zero / 16)`` with ``P`` the power of two of :func:`pivots`; the kernel decodes
  ``d = x - X0`` (exact) and scales the sums of ``d * a`` by ``M = S / P`` (csrc/qdq4.cuh).
  bf16 layers: ``S = 16 * scale`` and ``Z = -(16 + zero) * scale``, both exact in fp32, so that
  ``w = x * S + Z`` is one fma that is exactly 0 at ``x == X0``.

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
#: fp16 layers: |16 * scale| must stay below 2^15, so that the pivot P <= 2^14 (qdq4.cuh
#: unfold_f16 forms 2^-e from it) and X0 = 2P of the v1 zero 16 is finite.
FP16_FOLD_LIMIT = 2.0**15
PIVOT_MIN_EXPONENT = -14  # fp16's smallest normal: x = P (1 + q / 16) is never subnormal
MAX_ZERO = 16             # 4-bit zero points: 0..15 (v2), 1..16 (v1, stored + 1)


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


def pivots(S: torch.Tensor) -> torch.Tensor:
    """fp16 folded scales ``S`` (float64 holding fp16 values) -> the kernel's powers of two ``P``
    (float64): ``S``'s exponent, at least 2^-14 (zero and subnormal ``S`` included), so that
    ``M = S / P`` is ``S``'s significand (in [1, 2) where ``S`` is normal), exact in fp16."""
    _, exp = torch.frexp(S)                                  # S = f * 2^exp, |f| in [0.5, 1)
    e = torch.where(S == 0, torch.full_like(exp, PIVOT_MIN_EXPONENT), exp - 1)
    return torch.exp2(torch.clamp(e, min=PIVOT_MIN_EXPONENT).to(torch.float64))


def _checked_zeros(zeros: torch.Tensor) -> torch.Tensor:
    z = zeros.to(torch.float64)
    if z.numel() and (float(z.min()) < 0 or float(z.max()) > MAX_ZERO):
        raise FormatError(f"exllama folds 4-bit zero points in 0..{MAX_ZERO}, got "
                          f"{int(z.min())}..{int(z.max())}; the weight is not 4-bit")
    return z


def fold_scales(scales: torch.Tensor, zeros: torch.Tensor, act_dtype: torch.dtype) -> torch.Tensor:
    """Per group and column, the constants that make ``(q - zero) * scale`` with ``q == zero``
    exactly 0, laid out per column quad.

    float16 layers: float16 ``[G, N / 4, 8]`` = ``S0 S1 -X0_0 -X0_1 S2 S3 -X0_2 -X0_3`` (half2
    pairs of the kernel's two column pairs) with ``S = 16 * scale`` and
    ``-X0 = -P (1 + zero / 16)``, ``P = pivots(S)``. bfloat16 layers: float32 ``[G, N / 4, 8]`` =
    ``S0..S3 Z0..Z3`` with ``Z = -(16 + zero) * scale``.
    """
    G, N = scales.shape
    _check(1, N)
    s = scales.to(torch.float64)
    z = _checked_zeros(zeros)
    if act_dtype == torch.float16:
        S = round_to_fp16(16.0 * s)                          # exact for fp16 scales
        if bool((S.abs() >= FP16_FOLD_LIMIT).any()):
            raise NotSupportedError(
                "exllama folds 16 * scale into float16 below 2^15; this layer's largest scale "
                f"{float(s.abs().max()):.4g} reaches it; use another backend",
                ["scales too large for the float16 fold (|scale| >= 2048)"],
            )
        X0 = pivots(S) * (1.0 + z / 16.0)                    # <= 5 significant bits: exact
        S4, C4 = S.view(G, N // QUAD, 2, 2), (-X0).view(G, N // QUAD, 2, 2)
        out = torch.stack((S4, C4), dim=3)                  # [G, N/4, pair, S|-X0, 2]
        return out.reshape(G, N // QUAD, 8).to(torch.float16).contiguous()
    if act_dtype == torch.bfloat16:
        S = 16.0 * s
        Z = -(16.0 + z) * s
        exact = (S.to(torch.float32).to(torch.float64) == S) & (Z.to(torch.float32).to(torch.float64) == Z)
        if not bool(exact.all()):
            raise NotSupportedError(
                "exllama's bfloat16 fold needs 16 * scale and (16 + zero) * scale exact in float32 "
                "(float16 scales are); this layer's scales are not; use another backend",
                ["scales not exact in the float32 fold"],
            )
        out = torch.cat((S.view(G, N // QUAD, 4), Z.view(G, N // QUAD, 4)), dim=2)
        return out.to(torch.float32).contiguous()
    raise NotSupportedError(f"exllama computes in float16 or bfloat16, not {act_dtype}",
                            [f"activation dtype {act_dtype} is not supported"])


def unfold_scales(sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse view of :func:`fold_scales`: ``(S, C)`` float64 [G, N], where ``C`` is ``-X0``
    (float16 ``sz``) or ``Z`` (float32 ``sz``, bfloat16 layers)."""
    G, quads, _ = sz.shape
    t = sz.to(torch.float64)
    if sz.dtype == torch.float16:
        t = t.view(G, quads, 2, 2, 2)                       # [G, quad, pair, S|-X0, e]
        return t[:, :, :, 0].reshape(G, quads * 4), t[:, :, :, 1].reshape(G, quads * 4)
    return t[:, :, :4].reshape(G, quads * 4), t[:, :, 4:].reshape(G, quads * 4)
