"""Python entry of the Hopper GEMM: the prepared weight, the ``gptq_marlin_hopper::gemm`` op
the marlin backend calls, and ``hopper_gemm(x, prepared) -> y`` for the GPU check.

4-bit weights, fp16 and bf16 activations, group sizes -1 and multiples of 32, symmetric or
asymmetric zero points, act-order (the activation columns permuted per call with
``index_select``, the weight rows sorted once here, as marlin does: docs/DESIGN.md §2)
(NOTES/hopper-wgmma.md). The op's split-K partials go to a workspace the caller owns (the
marlin backend passes its per-device slots, sized at bind by :func:`workspace_floats`), so a
call allocates nothing that outlives it and CUDA graphs capture it (docs/DESIGN.md §11).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from gptq_core.errors import NotSupportedError
from gptq_core.format import PackedWeight, act_order_permutation

from . import build, layout

#: token tiles (wgmma N) the extension instantiates
TOKEN_TILES = (16, 32, 64, 128)
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
    #: block slots of one wave per token tile (SMs x blocks per SM, TOKEN_TILES' order): the
    #: split plan's input, read from the GPU once at prepare; empty on the CPU
    waves: tuple[int, ...] = ()


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
    dev = torch.device(device)
    waves = wave_slots(dev, dtype, zeros is not None) if dev.type == "cuda" else ()
    return HopperPrepared(
        tiles=layout.repack(q), scales=w.scales.to(dtype).contiguous(), zeros=zeros, perm=perm,
        in_features=K, out_features=N, group_size=group, dtype=dtype, waves=waves,
    )


def wave_slots(device: torch.device, dtype: torch.dtype, zp: bool) -> tuple[int, ...]:
    """SMs x blocks per SM of each token tile's kernel on ``device`` (builds the extension)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return tuple(sms * blocks_per_sm(device, bm, dtype, zp) for bm in TOKEN_TILES)


def token_tile(m: int) -> int:
    """The wgmma N for M rows: the smallest tile that holds them, 128 beyond (M tiled over
    128-row tiles, which beat the deleted 256-row tile: NOTES/hopper-wgmma.md, "Token tiles
    above 128 rows")."""
    return next((t for t in TOKEN_TILES if m <= t), TOKEN_TILES[-1])


def stage_tiles(bm: int) -> int:
    """64-k weight tiles per pipeline stage of token tile ``bm`` (csrc/stage.h's stage_tiles):
    2 (128-k stages, round 3) for BM <= 64, 1 for BM 128."""
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


@functools.lru_cache(maxsize=8192)
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
    waves = p.waves or wave_slots(device, p.dtype, p.zeros is not None)
    return splits_for(m, p.in_features, p.out_features, waves)


def splits_for(m: int, k: int, n: int, waves: tuple[int, ...] | list[int]) -> int:
    """The split count the kernel launches for M rows of a K x N layer (plan_splits over one
    wave of the token tile's blocks, normalised to whole stages)."""
    bm = token_tile(m)
    return split_count(k, bm, plan_splits(m, n, k, bm, waves[TOKEN_TILES.index(bm)]))


def workspace_floats(k: int, n: int, waves: tuple[int, ...], rows_above: int, rows_upto: int) -> int:
    """fp32 elements of split-K partials the op needs for any M in (rows_above, rows_upto]."""
    return max((s * m * n for m in range(rows_above + 1, rows_upto + 1)
                if (s := splits_for(m, k, n, waves)) > 1), default=0)


def _module():
    mod = build.module()
    if mod is None:
        build.load()
        mod = build.module()
    return mod


def _launch(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            perm: torch.Tensor | None, y: torch.Tensor, ws: torch.Tensor | None, group_size: int, bm: int,
            splits: int) -> torch.Tensor:
    """y [M, N] = x [M, K] . W on the current stream, activation columns permuted first
    (act-order); ``ws`` (fp32, >= splits x M x N) holds the split-K partials when splits > 1.
    M >= 1: the callers return an empty y themselves."""
    if perm is not None:
        x = x.index_select(1, perm)
    _module().gemm(x.contiguous(), tiles, scales, zeros, y, ws if splits > 1 else None, group_size, bm, splits,
                   torch.cuda.current_stream(x.device).cuda_stream)
    return y


def gemm_direct(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                perm: torch.Tensor | None, bias: torch.Tensor | None, ws: torch.Tensor, group_size: int,
                size_n: int, waves: list[int]) -> torch.Tensor:
    """The op's implementation, called directly when eager (no dispatcher: docs/DESIGN.md §11):
    y [M, N] = x [M, K] . W (+ bias); ``ws`` holds the split-K partials (scratch)."""
    m, k = x.shape
    y = torch.empty(m, size_n, dtype=x.dtype, device=x.device)
    if m:
        _launch(x, tiles, scales, zeros, perm, y, ws, group_size, token_tile(m), splits_for(m, k, size_n, waves))
    return y if bias is None else y.add_(bias)


LIBRARY = "gptq_marlin_hopper"
_lib = torch.library.Library(LIBRARY, "DEF")
# ws: split-K scratch whose contents mean nothing between calls, declared unmutated on purpose
# like the marlin op's slots (ops.py there), so functionalization never copies it.
_lib.define("gemm(Tensor x, Tensor tiles, Tensor scales, Tensor? zeros, Tensor? perm, Tensor? bias, "
            "Tensor ws, int group_size, int size_n, int[] waves) -> Tensor")
_lib.impl("gemm", gemm_direct, "CUDA")


@torch.library.register_fake(f"{LIBRARY}::gemm")
def _gemm_fake(x, tiles, scales, zeros, perm, bias, ws, group_size, size_n, waves):
    return x.new_empty(x.shape[0], size_n)


gemm = torch.ops.gptq_marlin_hopper.gemm.default


def hopper_gemm(x: torch.Tensor, prepared: HopperPrepared, out: torch.Tensor | None = None,
                splits: int | None = None) -> torch.Tensor:
    """y = x @ W for x [..., K] with its own workspace (the GPU check); ``out`` (optional,
    [M, N]) receives y; ``splits`` overrides the split-K plan (A/Bs)."""
    p = prepared
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.in_features)
    if x2.dtype != p.dtype:
        raise NotSupportedError(f"x is {x2.dtype}, the layer was prepared for {p.dtype}")
    m = x2.shape[0]
    y = out if out is not None else torch.empty(m, p.out_features, dtype=p.dtype, device=x.device)
    if m:
        bm = token_tile(m)
        splits = split_count(p.in_features, bm, splits or planned_splits(m, p, x.device))
        ws = torch.empty(splits, m, p.out_features, dtype=torch.float32, device=x.device) if splits > 1 else None
        _launch(x2, p.tiles, p.scales, p.zeros, p.perm, y, ws, p.group_size, bm, splits)
    return y.view(*lead, p.out_features)
