"""From a GPTQ :class:`~gptq_core.format.PackedWeight` to the kernel's prepared form, in torch.

Runs once per layer at load, on the layer's device: act-order ``g_idx`` is sorted (weight rows
permuted to match, activations permuted at run time), ints are repacked into the tile layout
(:mod:`.layout`), scales and zero points converted to the activation dtype and permuted like
the columns of a tile. Symmetric layers whose zero points are all ``2**(bits-1)`` carry no
zero-point tensor (the kernel uses the constant).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from gptq_core.errors import NotSupportedError
from gptq_core.format import PackedWeight, default_g_idx

from . import layout

ACT_DTYPES = (torch.float16, torch.bfloat16)

#: Rows above which each call dequantizes the layer into a scratch weight and calls cuBLAS
#: (the mma.sync kernel cannot match Hopper's cuBLAS once the work is compute-bound), by layer
#: size K * N. Break-even points of the 4-bit wide kernels on an H100 (session 3,
#: `bench_marlin.py --wide-ab`; NOTES/perf-marlin.md): 4096x4096 kernel/dequant 28.6/31.0 us
#: at M=192, 34.7/33.2 at 256; 4096x14336 100.9/109.7 and 8192x28672 375.9/415.6 at 256.
#: GPTQ_MARLIN_DEQUANT_M overrides, -1 disables.
DEQUANT_THRESHOLDS: tuple[tuple[int | None, int], ...] = ((1 << 24, 192), (1 << 26, 256), (None, 256))
#: The same for 8-bit weights (64-row kernels of at most 2 row blocks: slower per row). H100,
#: session 3: 8192x28672 kernel 147.7 us at M=64, 541.0 at 256, dequantize + cuBLAS ~415 at
#: 256 (4-bit's); 4096x4096 kernel 22.8 at 64 (dequantize + cuBLAS ~26).
DEQUANT_THRESHOLDS_8BIT: tuple[tuple[int | None, int], ...] = ((1 << 24, 192), (None, 160))
#: With a dense cache (GPTQ_MARLIN_DENSE_CACHE_MB), rows above which the cached fp16/bf16 weight
#: goes straight to cuBLAS (about fp16's time), by K * N likewise: the kernel against fp16 in
#: the same run was 13.7/16.7 us at M=16 and 17.9/14.1 at 32 (4096x4096), 32.4/42.6 at 64 and
#: 52.8/43.2 at 96 (4096x14336), 99.4/161.0 at 64 and 181.3/161.0 at 96 (8192x28672).
#: GPTQ_MARLIN_DENSE_M overrides.
DENSE_THRESHOLDS: tuple[tuple[int | None, int], ...] = ((1 << 24, 16), (1 << 26, 64), (None, 64))
DEQUANT_THRESHOLD = DEQUANT_THRESHOLDS[-1][1]  # the largest layers'
DENSE_THRESHOLD = DENSE_THRESHOLDS[-1][1]

_dense_budget_used = 0


def _by_size(table, size: int) -> int:
    return next(rows for limit, rows in table if limit is None or size <= limit)


def dequant_threshold(size: int = 1 << 62, bits: int = 4) -> int:
    raw = os.environ.get("GPTQ_MARLIN_DEQUANT_M")
    table = DEQUANT_THRESHOLDS_8BIT if bits == 8 else DEQUANT_THRESHOLDS
    return _by_size(table, size) if raw in (None, "") else int(raw)


def dense_threshold(size: int = 1 << 62) -> int:
    raw = os.environ.get("GPTQ_MARLIN_DENSE_M")
    return _by_size(DENSE_THRESHOLDS, size) if raw in (None, "") else int(raw)


def dense_budget_bytes() -> int:
    """GPTQ_MARLIN_DENSE_CACHE_MB: memory (per process) that may hold dense copies of layers
    for large batches; 0 (the default) keeps only the quantized weights."""
    raw = os.environ.get("GPTQ_MARLIN_DENSE_CACHE_MB", "")
    return int(float(raw) * (1 << 20)) if raw else 0


def take_dense_budget(nbytes: int) -> bool:
    """Reserve ``nbytes`` of the dense-cache budget; False when it does not fit."""
    global _dense_budget_used
    if _dense_budget_used + nbytes > dense_budget_bytes():
        return False
    _dense_budget_used += nbytes
    return True


@dataclass(frozen=True, eq=False)
class MarlinPrepared:
    """The kernel's view of one layer (every tensor on the layer's device)."""

    tiles: torch.Tensor             # int32 tile layout
    scales: torch.Tensor            # [G, N] activation dtype, columns permuted
    zeros: torch.Tensor | None      # like scales (real zero points) or None: symmetric
    perm: torch.Tensor | None       # int64 [K]: activation column order (act-order) or None
    bits: int
    group_size: int
    size_k: int
    size_n: int
    dequant_threshold: int
    dense: torch.Tensor | None = None  # [N, K] activation dtype, original k order (cache)
    dense_threshold: int = DENSE_THRESHOLD


def act_order_permutation(g_idx: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor | None:
    """The stable sort of ``g_idx`` when it differs from ``k // group_size``, else None.

    Raises NotSupportedError when the sorted groups are not the contiguous, equal groups the
    kernel needs (GPTQ's act-order always produces those).
    """
    expected = default_g_idx(in_features, group_size, device=g_idx.device).long()
    g = g_idx.long()
    if torch.equal(g, expected):
        return None
    order = torch.argsort(g, stable=True)
    if not torch.equal(g[order], expected):
        counts = torch.bincount(g).tolist()
        raise NotSupportedError(
            f"marlin needs each group of g_idx to hold exactly group_size={group_size} input "
            f"channels (as GPTQ's act-order produces); this g_idx has group sizes "
            f"{counts[:8]}{'...' if len(counts) > 8 else ''}; use another backend",
            ["g_idx groups are not of equal size group_size"],
        )
    return order


def prepare(weight: PackedWeight, device: torch.device, act_dtype: torch.dtype) -> MarlinPrepared:
    """Repack ``weight`` for the kernel on ``device``; ``weight`` itself is not modified."""
    if act_dtype not in ACT_DTYPES:
        raise NotSupportedError(
            f"marlin computes in float16 or bfloat16, not {act_dtype}",
            [f"activation dtype {act_dtype} is not supported"],
        )
    w = weight.to(device)
    K, N, bits = w.in_features, w.out_features, w.bits
    q = w.unpack_qweight()
    perm = act_order_permutation(w.g_idx, K, w.group_size)
    if perm is not None:
        q = q[perm]
    zeros = w.zeros()
    sym_zero = 2 ** (bits - 1)
    has_zeros = not bool((zeros == sym_zero).all())
    prepared = MarlinPrepared(
        tiles=layout.repack(q, bits),
        scales=layout.permute_columns(w.scales.to(act_dtype)),
        zeros=layout.permute_columns(zeros.to(act_dtype)) if has_zeros else None,
        perm=perm,
        bits=bits,
        group_size=w.group_size,
        size_k=K,
        size_n=N,
        dequant_threshold=dequant_threshold(K * N, bits),
        dense_threshold=dense_threshold(K * N),
    )
    if device.type == "cuda" and take_dense_budget(K * N * 2):
        prepared = dataclasses.replace(prepared, dense=dense_weight(prepared))
    return prepared


def dense_weight(prepared: MarlinPrepared) -> torch.Tensor:
    """The layer as a dense [N, K] weight in the activation dtype and the original k order,
    made by the kernel's own dequantization (CUDA)."""
    from .ops import dequantize

    p = prepared
    w = dequantize(p.tiles, p.scales, p.zeros, p.bits, p.group_size, p.size_k, p.size_n)
    if p.perm is not None:
        out = torch.empty_like(w)
        out[:, p.perm] = w
        w = out
    return w


def reference_weight(prepared: MarlinPrepared) -> torch.Tensor:
    """The dense [K, N] float64 weight in the *original* k order, rebuilt from the prepared form.

    Pure torch (CPU tests): the inverse of :func:`prepare` up to the activation-dtype rounding
    of scales.
    """
    p = prepared
    q = layout.unrepack(p.tiles, p.bits, p.size_k, p.size_n).to(torch.float64)
    scales = layout.unpermute_columns(p.scales).to(torch.float64)
    if p.zeros is None:
        zeros = torch.full_like(scales, 2 ** (p.bits - 1))
    else:
        zeros = layout.unpermute_columns(p.zeros).to(torch.float64)
    g = default_g_idx(p.size_k, p.group_size, device=q.device).long()
    w = (q - zeros[g]) * scales[g]
    if p.perm is not None:
        out = torch.empty_like(w)
        out[p.perm] = w
        w = out
    return w
