"""A bit-level model of the decode kernel (csrc/dequant.cuh, csrc/gemv.cuh), in torch, on the CPU.

It reads the prepared layout the way one lane does: the same words, the same shift windows,
masks and magic numbers, the same fused multiply-adds in fp16/bf16 (each rounded once, and
checked to be exact), the same A-fragment coordinates, the same shared-memory slots for the
activations and the same group folds and split partition, so that a wrong index or constant in
the layout or the arithmetic shows up as a wrong answer against gptq_core's float64 reference.
The group-end test is modelled per step; the kernels for unit-aligned groups test once per unit,
where every group ends anyway, so both fold at the same steps.
"""

from __future__ import annotations

import torch

from gptq_backend_cuda import layout
from gptq_backend_cuda.prepare import CudaPrepared

MANTISSA = {torch.float16: 10, torch.bfloat16: 7}
MAGIC = {torch.float16: 1024.0, torch.bfloat16: 128.0}
MAGIC_BITS = {torch.float16: 0x6400, torch.bfloat16: 0x4300}


def _halves(bits32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint32 patterns (int64) -> [..., 2] float64: the low and the high 16-bit float."""
    lo = (bits32 & 0xFFFF).to(torch.int32)
    hi = ((bits32 >> 16) & 0xFFFF).to(torch.int32)
    pair = torch.stack([lo, hi], dim=-1)
    return ((pair + 2**15) % 2**16 - 2**15).to(torch.int16).view(dtype).to(torch.float64)


def _round(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).to(torch.float64)


def fma2(a: torch.Tensor, b: float, c, dtype: torch.dtype) -> torch.Tensor:
    """fma.rn.{f16,bf16}x2 on value pairs; every use in the kernel is exact, so this asserts it."""
    exact = a * b + c
    out = _round(exact, dtype)
    assert torch.equal(out, exact), "a dequantization step rounded"
    return out


def window(dtype: torch.dtype, width: int, i: int) -> tuple[int, int]:
    """(shift, position) of field i of ``width`` bits (csrc/dequant.cuh Window)."""
    per = MANTISSA[dtype] // width
    return (i // per) * per * width, (i % per) * width


def magic_field(w: torch.Tensor, dtype: torch.dtype, width: int, i: int) -> torch.Tensor:
    s, p = window(dtype, width, i)
    mask = ((1 << width) - 1) << p
    return _halves(((w >> s) & (mask * 0x10001)) | (MAGIC_BITS[dtype] * 0x10001), dtype)


def pair_value(wl: list[torch.Tensor], wh: list[torch.Tensor], bits: int, dtype: torch.dtype,
               p: int, zc: int) -> torch.Tensor:
    """q - zc of pair p of a lane's unit, [..., 2] float64, as csrc/dequant.cuh computes it."""
    M = MAGIC[dtype]
    if bits == 8:
        i, w = p % 2, wl[p // 2]
        b_lo, b_hi = (w >> (8 * i)) & 0xFF, (w >> (16 + 8 * i)) & 0xFF
        if dtype == torch.float16:  # PRMT under 0x64: 1024 + q
            m = _halves(b_lo | (0x64 << 8) | (b_hi << 16) | (0x64 << 24), dtype)
            return fma2(m, 1.0, -1024.0 - zc, dtype)
        f = torch.stack([b_lo, b_hi], dim=-1).to(torch.float32) + 8388608.0  # 0x4B0000qq
        v = (f - (8388608.0 + zc)).to(torch.float64)
        out = _round(v, dtype)
        assert torch.equal(out, v)
        return out
    if bits == 3:
        i, j = p % 8, p % 16
        pl, ph = window(dtype, 2, i)[1], window(dtype, 1, j)[1]
        t1 = fma2(magic_field(wh[p // 16], dtype, 1, j), 2.0 ** (2 - ph),
                  -M * 2.0 ** (2 - ph) - M * 2.0 ** -pl - zc, dtype)
        return fma2(magic_field(wl[p // 8], dtype, 2, i), 2.0 ** -pl, t1, dtype)
    P = 16 // bits
    i = p % P
    pos = window(dtype, bits, i)[1]
    return fma2(magic_field(wl[p // P], dtype, bits, i), 2.0 ** -pos, -M * 2.0 ** -pos - zc, dtype)


def dequant_steps(prep: CudaPrepared) -> torch.Tensor:
    """Every step's A operand as the lanes build it (before zero points and scales):
    float64 [strips, steps, 16 columns, 16 channels] holding q - zc."""
    bits, dtype = prep.bits, prep.act_dtype
    w = prep.qweight.to(torch.int64) & 0xFFFFFFFF           # [strips, units, 32, 4]
    wl = [w[..., i] for i in range(4)]
    wh = []
    if bits == 3:
        h = prep.qhigh.to(torch.int64) & 0xFFFFFFFF
        wh = [h[..., i] for i in range(2)]
    zc = 0 if prep.zeros is not None else 2 ** (bits - 1)
    strips, units = w.shape[:2]
    us = layout.unit_steps(bits)
    A = torch.zeros(strips, units, us, 16, 16, dtype=torch.float64)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    for s in range(us):
        for r in range(4):
            v = pair_value(wl, wh, bits, dtype, 4 * s + r, zc)  # [strips, units, 32, 2]
            n = g + 8 * (r & 1)
            for h in range(2):
                A[:, :, s, n, 2 * t + h + 8 * (r >> 1)] = v[..., h]
    return A.reshape(strips, units * us, 16, 16)


def stage_x(x: torch.Tensor, perm: torch.Tensor | None, k_begin: int, span: int) -> torch.Tensor:
    """The block's shared-memory copy [rows, span] (csrc/gemv.cuh stage_x): channel k_begin + i
    at slot (i & ~15) + x_slot(i & 15), gathered through perm, zero past K."""
    rows, K = x.shape
    xs = torch.zeros(rows, span, dtype=x.dtype)
    i = torch.arange(span)
    k = k_begin + i
    valid = k < K
    src = k.clamp(max=K - 1)
    if perm is not None:
        src = perm.long()[src]
    vals = torch.where(valid, x[:, src], torch.zeros((), dtype=x.dtype))
    xs[:, (i & ~15) + layout.x_slot(i & 15)] = vals
    return xs


def b_fragment(xs: torch.Tensor, local_step: int, rows: int, mt: int) -> torch.Tensor:
    """B [16 channels, 8 tile rows] of one step and row tile as the lanes read it: lane (g, t)
    reads the 4 slots 16 * step + 4t .. + 3 of row min(g + 8 mt, rows - 1) (csrc/gemv.cuh xrow):
    channels 2t, 2t+1 (b0), 2t+8, 2t+9 (b1)."""
    B = torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        row = min(g + 8 * mt, rows - 1)
        v = xs[row, 16 * local_step + 4 * t:16 * local_step + 4 * t + 4].to(torch.float64)
        B[2 * t, g], B[2 * t + 1, g], B[2 * t + 8, g], B[2 * t + 9, g] = v
    return B


def gemm(x: torch.Tensor, prep: CudaPrepared, units_per_split: int, rows_per_slice: int = 8,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] in x's dtype, computed the way the decode kernel computes it."""
    bits = prep.bits
    M, K = x.shape
    A = dequant_steps(prep)
    strips, steps = A.shape[:2]
    us = layout.unit_steps(bits)
    units = steps // us
    n_pad = strips * 16
    gsteps = 0 if prep.group_size == -1 else prep.group_size // 16
    g_pad = prep.scales.shape[0]
    scales = prep.scales.to(torch.float64)
    zeros = None if prep.zeros is None else prep.zeros.to(torch.float64)
    splits = -(-units // units_per_split)
    y = torch.zeros(M, prep.size_n, dtype=torch.float64)
    cols = torch.arange(n_pad)
    for m0 in range(0, M, rows_per_slice):
        rows = min(rows_per_slice, M - m0)
        parts = []
        for split in range(splits):
            u_begin = split * units_per_split
            n_units = max(0, min(units, u_begin + units_per_split) - u_begin)
            xs = stage_x(x[m0:m0 + rows], prep.perm, u_begin * layout.unit_k(bits), n_units * layout.unit_k(bits))
            total = torch.zeros(n_pad, rows_per_slice, dtype=torch.float64)
            acc = torch.zeros_like(total)
            step = u_begin * us
            group = step // gsteps if gsteps else 0
            bound = (group + 1) * gsteps if gsteps else None

            def fold(grp):
                nonlocal total, acc
                total = total + acc * scales[min(grp, g_pad - 1), cols].unsqueeze(1)
                acc = torch.zeros_like(acc)

            for ls in range(n_units * us):
                a = A[:, step + ls]  # [strips, 16, 16]
                if zeros is not None:  # sub2 of the column's zero point, exact
                    z = zeros[min(group, g_pad - 1)].view(strips, 16, 1)
                    a = a - z
                for mt in range(rows_per_slice // 8):
                    B = b_fragment(xs, ls, rows, mt)
                    acc[:, 8 * mt:8 * mt + 8] += (a @ B).reshape(n_pad, 8)
                if bound is not None and step + ls + 1 == bound:
                    fold(group)
                    group += 1
                    bound += gsteps
            fold(group)
            parts.append(total)
        s = torch.zeros_like(parts[0]) if not parts else parts[0].clone()
        for part in parts[1:]:  # split order
            s = s + part
        y[m0:m0 + rows] = s[:prep.size_n, :rows].T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)
