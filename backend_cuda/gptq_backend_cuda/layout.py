"""The decode kernel's weight layout: GPTQ ints repacked once at load into mma fragments.

The kernel computes ``y^T = W^T x^T`` with ``mma.sync`` (m16n8k16, or two m16n8k8 on sm_75),
the weights as the A operand (16 output columns x 16 input channels: one *step*) and at most 8
activation rows as B, so one instruction covers every row of a decode batch. Each warp owns a
*strip* of 16 output columns and walks K in *units*: one 16-byte load per lane that holds the
lane's A fragments of ``unit_steps(bits)`` consecutive steps, 512 contiguous bytes per warp.

Lane ``L`` (``g = L // 4``, ``t = L % 4``) holds register ``r`` (0..3) of a step as two values
(``h`` = 0, 1): output column ``g + 8 * (r & 1)``, input channel ``2t + h + 8 * (r >> 1)`` of the
step (PTX's A-fragment layout). Within a unit the lane's pairs are numbered ``p = 4 * step + r``;
pair ``p`` lives in word ``p // P`` at field ``p % P`` of both 16-bit halves (``h`` selects the
half), ``P = 16 / b`` fields of ``b`` bits per half: one mask turns a field of both halves into an
fp16/bf16 pair by the magic-number trick, and no value straddles a word.

3-bit weights are two planes: the low two bits in the 2-bit layout (4 words per lane and unit of
8 steps) and the third bit in a plane of 1-bit fields (2 words per lane and unit: pair ``p`` at
field ``p % 16`` of word ``p // 16``): 3 bits per weight, 16- and 8-byte loads, no straddle.

Arrays: ``qweight`` int32 [strips, units, 32, 4], ``qhigh`` int32 [strips, units, 32, 2] (3-bit
only); K is zero-padded to whole units and N to whole strips.
"""

from __future__ import annotations

import torch

from gptq_core.errors import FormatError

STEP_K = 16      # input channels per mma step
STRIP_N = 16     # output columns per warp
LANES = 32
WORDS = 4        # int32 words per lane and unit (one 16-byte load)
HIGH_WORDS = 2   # 3-bit third-bit plane: words per lane and unit (one 8-byte load)
LAYOUT_BITS = (2, 3, 4, 8)


def low_bits(bits: int) -> int:
    """Bits per field of the main plane (3-bit: its low two bits)."""
    return 2 if bits == 3 else bits


def unit_steps(bits: int) -> int:
    """Steps (16 input channels each) one 16-byte load per lane holds: 4 words of 16 / b pairs,
    4 pairs a step (3-bit: those of its 2-bit plane)."""
    return 16 // low_bits(bits) * WORDS // 4


def unit_k(bits: int) -> int:
    """Input channels per unit: 128 (2- and 3-bit), 64 (4-bit), 32 (8-bit)."""
    return unit_steps(bits) * STEP_K


def fields_per_half(bits: int) -> int:
    return 16 // low_bits(bits)


def padded(size_k: int, size_n: int, bits: int) -> tuple[int, int]:
    """(K, N) rounded up to whole units and strips."""
    uk = unit_k(bits)
    return -(-size_k // uk) * uk, -(-size_n // STRIP_N) * STRIP_N


def fragment_index(bits: int) -> tuple[torch.Tensor, ...]:
    """For every (lane, word, field, half) of one unit: (step, column in strip, channel in step).

    Each tensor has shape [32, WORDS, P, 2]; the inverse map of the layout, in the order the
    kernel decodes it.
    """
    P = fields_per_half(bits)
    lane = torch.arange(LANES).view(-1, 1, 1, 1)
    word = torch.arange(WORDS).view(1, -1, 1, 1)
    field = torch.arange(P).view(1, 1, -1, 1)
    half = torch.arange(2).view(1, 1, 1, -1)
    p = word * P + field
    step, r = p // 4, p % 4
    g, t = lane // 4, lane % 4
    col = g + 8 * (r & 1)
    chan = 2 * t + half + 8 * (r >> 1)
    shape = (LANES, WORDS, P, 2)
    return step.expand(shape), col.expand(shape), chan.expand(shape)


def high_fragment_index() -> tuple[torch.Tensor, ...]:
    """The same for the 3-bit third-bit plane: shape [32, HIGH_WORDS, 16, 2]."""
    lane = torch.arange(LANES).view(-1, 1, 1, 1)
    word = torch.arange(HIGH_WORDS).view(1, -1, 1, 1)
    field = torch.arange(16).view(1, 1, -1, 1)
    half = torch.arange(2).view(1, 1, 1, -1)
    p = word * 16 + field
    step, r = p // 4, p % 4
    g, t = lane // 4, lane % 4
    shape = (LANES, HIGH_WORDS, 16, 2)
    return (step.expand(shape), (g + 8 * (r & 1)).expand(shape),
            (2 * t + half + 8 * (r >> 1)).expand(shape))


def _wrap32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    return ((x + 2**31) % 2**32 - 2**31).to(torch.int32)


def _gather(q: torch.Tensor, bits: int, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """q [K_pad, N_pad] -> values [strips, units, *index shape] in the layout's order."""
    k_pad, n_pad = q.shape
    step, col, chan = (i.to(q.device) for i in index)
    units, strips = k_pad // unit_k(bits), n_pad // STRIP_N
    k = (torch.arange(units, device=q.device).view(1, -1, 1, 1, 1, 1) * unit_k(bits)
         + step * STEP_K + chan)
    n = torch.arange(strips, device=q.device).view(-1, 1, 1, 1, 1, 1) * STRIP_N + col
    return q[k, n]


def repack(q: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integers q [K, N] (0 <= q < 2**bits, rows in the kernel's k order) -> (qweight, qhigh).

    Zero-pads K and N (the kernel zero-fills the activations past K, so padded rows add 0).
    """
    if bits not in LAYOUT_BITS:
        raise FormatError(f"the cuda layout holds 2, 3, 4 or 8-bit weights, not {bits}-bit")
    K, N = q.shape
    k_pad, n_pad = padded(K, N, bits)
    full = torch.zeros(k_pad, n_pad, dtype=torch.int64, device=q.device)
    full[:K, :N] = q.to(torch.int64)
    lb, P = low_bits(bits), fields_per_half(bits)
    v = _gather(full, bits, fragment_index(bits)) & ((1 << lb) - 1)
    shift = (torch.arange(P, device=q.device).view(-1, 1) * lb
             + 16 * torch.arange(2, device=q.device).view(1, -1))
    words = (v << shift).sum(dim=(-1, -2))  # fields are disjoint: sum == or
    qweight = _wrap32(words).contiguous()
    if bits != 3:
        return qweight, None
    hv = (_gather(full, bits, high_fragment_index()) >> 2) & 1
    hshift = torch.arange(16, device=q.device).view(-1, 1) + 16 * torch.arange(2, device=q.device).view(1, -1)
    return qweight, _wrap32((hv << hshift).sum(dim=(-1, -2))).contiguous()


def _scatter(values: torch.Tensor, bits: int, index: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    strips, units = values.shape[:2]
    step, col, chan = (i.to(values.device) for i in index)
    k = torch.arange(units, device=values.device).view(1, -1, 1, 1, 1, 1) * unit_k(bits) + step * STEP_K + chan
    n = torch.arange(strips, device=values.device).view(-1, 1, 1, 1, 1, 1) * STRIP_N + col
    out[k, n] = values


def unrepack(qweight: torch.Tensor, qhigh: torch.Tensor | None, bits: int, size_k: int,
             size_n: int) -> torch.Tensor:
    """The exact inverse of :func:`repack`: int64 [size_k, size_n]."""
    k_pad, n_pad = padded(size_k, size_n, bits)
    lb, P = low_bits(bits), fields_per_half(bits)
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    shift = (torch.arange(P, device=w.device).view(-1, 1) * lb
             + 16 * torch.arange(2, device=w.device).view(1, -1))
    v = (w.unsqueeze(-1).unsqueeze(-1) >> shift) & ((1 << lb) - 1)
    out = torch.zeros(k_pad, n_pad, dtype=torch.int64, device=w.device)
    _scatter(v, bits, fragment_index(bits), out)
    if bits == 3:
        if qhigh is None:
            raise FormatError("3-bit weights need their third-bit plane (qhigh)")
        h = qhigh.to(torch.int64) & 0xFFFFFFFF
        hshift = torch.arange(16, device=h.device).view(-1, 1) + 16 * torch.arange(2, device=h.device).view(1, -1)
        hv = (h.unsqueeze(-1).unsqueeze(-1) >> hshift) & 1
        high = torch.zeros_like(out)
        _scatter(hv, bits, high_fragment_index(), high)
        out |= high << 2
    return out[:size_k, :size_n]


def x_slot(j: torch.Tensor | int):
    """Where channel ``j`` (0..15) of a step sits in the kernel's shared-memory copy of the
    activations: lane t's B fragments (channels 2t, 2t+1, 2t+8, 2t+9) become 4 adjacent values,
    one 8-byte load (csrc/gemv.cuh ``x_slot``)."""
    return 4 * ((j & 7) >> 1) + (j & 1) + 2 * (j >> 3)
