"""Python entry of the Hopper GEMM: the prepared weight and ``hopper_gemm(x, prepared) -> y``.

First version (NOTES/hopper-wgmma.md): 4-bit weights, fp16 and bf16 activations, group sizes
-1 and multiples of 32, symmetric or asymmetric zero points, act-order (the activation columns
permuted per call with ``index_select``, the weight rows sorted once here, as marlin does:
docs/DESIGN.md §2). The split-K workspace is allocated per call, so a call is not yet
CUDA-graph-clean in the product's sense (a graph still captures it: the caching allocator
serves the allocation); the product needs it in the prepared weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gptq_core.errors import NotSupportedError
from gptq_core.format import PackedWeight, act_order_permutation

from . import build, layout

#: token tiles (wgmma N) the extension instantiates
TOKEN_TILES = (16, 32, 64, 128, 256)
ACT_DTYPES = (torch.float16, torch.bfloat16)
MAX_SPLITS = 16
MIN_SPLIT_TILES = 8  #: at least 512 k (8 tiles of 64) per split: the pipeline's prologue is paid per split


@dataclass(frozen=True, eq=False)
class HopperPrepared:
    """One layer in the Hopper layout, on its device."""

    tiles: torch.Tensor  #: int32 [K * N / 8], layout.py's order
    scales: torch.Tensor  #: [G, N] in the activation dtype
    zeros: torch.Tensor | None  #: [G, N] in the activation dtype; None: symmetric (zero 8)
    perm: torch.Tensor | None  #: act-order: activation column order (int64 [K]); None: identity
    in_features: int
    out_features: int
    group_size: int  #: in k; a per-column layer (-1) has group_size == in_features
    dtype: torch.dtype


def prepare(packed: PackedWeight, device: torch.device | str, dtype: torch.dtype = torch.float16) -> HopperPrepared:
    """Repack a GPTQ layer for the kernel (once, at bind; torch on ``device``).

    Raises NotSupportedError naming what this first version does not serve."""
    K, N = packed.in_features, packed.out_features
    if packed.bits != 4:
        raise NotSupportedError(f"the Hopper kernel serves 4-bit weights, not {packed.bits}-bit; "
                                "the marlin kernels serve 8-bit")
    if dtype not in ACT_DTYPES:
        raise NotSupportedError(f"the Hopper kernel runs float16 or bfloat16 activations, not {dtype}")
    layout.check_shape(K, N)
    group = K if packed.group_size == -1 else packed.group_size
    if group % 32:
        raise NotSupportedError(f"the Hopper kernel needs group_size -1 or a multiple of 32, got {packed.group_size}")
    w = packed.to(device)
    q = w.unpack_qweight()
    perm = act_order_permutation(w.g_idx, K, packed.group_size, "the Hopper kernel")
    if perm is not None:
        q = q[perm]
    z = w.zeros()
    zeros = None if bool((z == 8).all()) else z.to(dtype).contiguous()
    return HopperPrepared(
        tiles=layout.repack(q), scales=w.scales.to(dtype).contiguous(), zeros=zeros, perm=perm,
        in_features=K, out_features=N, group_size=group, dtype=dtype,
    )


def token_tile(m: int) -> int:
    """The wgmma N for M rows: the smallest tile that holds them, 256 beyond (tiled over M)."""
    return next((t for t in TOKEN_TILES if m <= t), TOKEN_TILES[-1])


def stage_tiles(bm: int) -> int:
    """64-k weight tiles per pipeline stage of token tile ``bm`` (csrc/stage.h's stage_tiles):
    2 (128-k stages, round 3) for BM <= 64, 1 for BM 128 / 256."""
    return 2 if bm <= 64 else 1


def k_stages(k: int, bm: int) -> int:
    """Pipeline stages over K (the last one may hold a single 64-k tile: K % 128 == 64)."""
    return math.ceil((k // layout.TILE_K) / stage_tiles(bm))


def split_count(k: int, bm: int, splits: int) -> int:
    """The split count the kernel launches for a requested one: splits own whole stages, every
    split non-empty (launch_one in csrc/kernel.cuh rejects any other count)."""
    st = k_stages(k, bm)
    per = math.ceil(st / max(1, min(splits, st)))
    return math.ceil(st / per)


def plan_splits(m: int, n: int, k: int, bm: int, sms: int, blocks_per_sm: int = 1) -> int:
    """Split K when the (column, token) tiles leave block slots idle: minimise waves x k tiles
    per block, charging the fp32 partials' extra traffic (s x M x N x 8 bytes against the
    weight's K x N / 2). A wave is ``sms x blocks_per_sm`` blocks: at small M one block's
    ring cannot keep an SM's share of the memory system busy, the 2-3 co-resident blocks do
    (NOTES/hopper-wgmma.md, round 2). Splits own whole pipeline stages (128 k at BM <= 64,
    round 3) and at least MIN_SPLIT_TILES x 64 k. Deterministic: the reduction sums splits in
    order. The result is a count the kernel launches as is (:func:`split_count`)."""
    sms = sms * max(1, blocks_per_sm)
    tiles = (n // layout.BN) * math.ceil(m / bm)
    sub = stage_tiles(bm)
    st = k_stages(k, bm)
    min_stages = math.ceil(MIN_SPLIT_TILES / sub)
    best, best_cost = 1, math.inf
    for s in range(1, MAX_SPLITS + 1):
        per = math.ceil(st / s)
        if s > 1 and per < min_stages:
            break
        used = math.ceil(st / per)
        cost = math.ceil(tiles * used / sms) * per * sub
        if used > 1:
            cost *= 1 + 16 * used * m / k
        if cost < best_cost - 1e-9:
            best, best_cost = used, cost
    return best


_OCCUPANCY: dict[tuple[int, int, bool, bool], int] = {}


def blocks_per_sm(device: torch.device, bm: int, dtype: torch.dtype, zp: bool) -> int:
    """Blocks of the token tile's kernel that fit on one SM: the CUDA runtime's occupancy query
    (measured from the compiled kernel, not a copy of its shared-memory sizing), cached."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, bm, dtype == torch.bfloat16, zp)
    if key not in _OCCUPANCY:
        mod = build.module()
        if mod is None:
            build.load()
            mod = build.module()
        with torch.cuda.device(index):
            _OCCUPANCY[key] = max(1, int(mod.blocks_per_sm(bm, key[2], zp)))
    return _OCCUPANCY[key]


def planned_splits(m: int, prepared: HopperPrepared, device: torch.device) -> int:
    """The split count hopper_gemm uses for M rows on ``device`` (also printed by the GPU check)."""
    p = prepared
    bm = token_tile(m)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    occ = blocks_per_sm(device, bm, p.dtype, p.zeros is not None)
    return plan_splits(m, p.out_features, p.in_features, bm, sms, occ)


def hopper_gemm(x: torch.Tensor, prepared: HopperPrepared, out: torch.Tensor | None = None,
                splits: int | None = None) -> torch.Tensor:
    """y = x @ W for x [..., K]; ``out`` (optional, [M, N]) receives y; ``splits`` overrides
    the split-K plan (A/Bs)."""
    p = prepared
    mod = build.module()
    if mod is None:
        build.load()
        mod = build.module()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.in_features)
    if x2.dtype != p.dtype:
        raise NotSupportedError(f"x is {x2.dtype}, the layer was prepared for {p.dtype}")
    if p.perm is not None:
        x2 = x2.index_select(1, p.perm)
    x2 = x2.contiguous()
    m = x2.shape[0]
    y = out if out is not None else torch.empty(m, p.out_features, dtype=p.dtype, device=x.device)
    if m == 0:
        return y.view(*lead, p.out_features)
    bm = token_tile(m)
    if splits is None:
        splits = planned_splits(m, p, x.device)
    splits = split_count(p.in_features, bm, splits)  # whole stages, every split non-empty
    ws = torch.empty(splits, m, p.out_features, dtype=torch.float32, device=x.device) if splits > 1 else None
    stream = torch.cuda.current_stream(x.device).cuda_stream
    mod.gemm(x2, p.tiles, p.scales, p.zeros, y, ws, p.group_size, bm, splits, stream)
    return y.view(*lead, p.out_features)
