"""Which path serves a layer at which batch size, decided once when the layer is bound.

docs/DESIGN.md §12: the decision is data on the prepared weight (a
:class:`~gptq_core.policy.DispatchPolicy` that ``gptq backends explain`` shows, and a tuple of
``(upto_m, kind)`` ints that ``gptq_qmatmul`` walks); the C++ op receives the kernel kind and
only checks that it can serve the call. Numbers whose comment names no GPU were measured on an
H100 (NOTES/perf-marlin.md, the sections named); those naming the H200 come from the NOTES file
they name.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from gptq_core.policy import DispatchPolicy

from .hopper import layout as hopper_layout

#: The gemm op's ``kind`` argument by path name, in csrc/kernels.h's order (``KernelKind``; a test
#: compares the two). "dense-cublas" never reaches the op: the layer's dense copy goes to cuBLAS.
KINDS: dict[str, int] = {
    "marlin:narrow": 0,      # cp.async, 64-row k stages
    "marlin:wide": 1,        # cp.async, 128-row stages (4-bit, K % 128 == 0)
    "marlin:wide4": 2,       # cp.async, 256-row double-buffered stages (4-bit, K % 256 == 0)
    "marlin:wide-swap": 3,   # 128-row stages, weights as the mma's A operand (M <= 8)
    "marlin:wide4-swap": 4,  # 256-row stages, swapped (M <= 8)
    "marlin:tma": 5,         # bulk copies (8-bit, compute capability >= 9.0, M <= 32)
    "dequant+cublas": 6,     # dequantize into a scratch weight per call, then cuBLAS
    "dense-cublas": -1,      # the dense copy kept at load (dense_cache_mb), cuBLAS
    "marlin:hopper": -2,     # the layer's sm_90a wgmma copy (hopper_cache_mb, hopper/ops.py)
}
DENSE_KIND = KINDS["dense-cublas"]
HOPPER_KIND = KINDS["marlin:hopper"]  # like DENSE_KIND, served in Python before the C++ op

#: Kernel routes by weight family: (rows up to, path), the last one open-ended.
#: "Wide stages", "256-row stages on large layers", "The swapped mma at M <= 8", "Opt-in
#: variants measured" (8-bit bulk copies: 1.01-1.035x in one slice, M <= 32).
KERNEL_ROUTES: dict[str, tuple[tuple[int | None, str], ...]] = {
    "4bit-wide4": ((8, "marlin:wide4-swap"), (32, "marlin:wide4"), (None, "marlin:wide")),
    "4bit-wide": ((8, "marlin:wide-swap"), (None, "marlin:wide")),
    "4bit-narrow": ((None, "marlin:narrow"),),
    "8bit-tma": ((32, "marlin:tma"), (None, "marlin:narrow")),
    "8bit": ((None, "marlin:narrow"),),
}

#: Rows above which each call dequantizes the layer and calls cuBLAS, by layer size K * N
#: (limit inclusive, None: larger). The mma.sync kernel cannot match Hopper's cuBLAS once the
#: work is compute-bound. H200 (NOTES/perf-h200.md, "Prefill on the H200"): dequantizing costs
#: 15-153 us (4096x4096 .. 8192x28672, ~3.8 TB/s), so at M = 256 dequantize + cuBLAS beats the
#: 4-bit wide kernel on every Llama layer (8192x28672 ~339 against 358.5 us, 4096x22016 ~127
#: against 148.5, 11008x4096 ~78 against 79.2) and at M = 192 the kernel wins or ties (8192x28672
#: 272.4 against ~297, 4096x14336 78.2 against ~79). The H100, with less bandwidth, broke even at
#: 256 on layers above 4096x4096 ("Wide stages"); the H200 is the reference GPU (DESIGN.md §9).
DEQUANT_THRESHOLDS: tuple[tuple[int | None, int], ...] = ((None, 192),)
#: The same for 8-bit weights (64-row kernels of at most 2 row blocks: slower per row). H200,
#: us kernel / dequantize + cuBLAS (NOTES/perf-h200.md, "8-bit prefill cut"): at M = 192 the
#: kernel loses on every Llama layer (4096x4096 38.8 / ~31, 11008x4096 84.2 / 78.6, 4096x22016
#: 165.0 / 131.0, 8192x28672 451.5 / 342.7); at M = 128 it ties 4096x4096 (28.8 against ~28,
#: its dequantize ~13 plus cuBLAS 14.9) and beats the larger layers by the same estimate.
DEQUANT_THRESHOLDS_8BIT: tuple[tuple[int | None, int], ...] = ((None, 128),)
#: With a dense copy, rows above which it goes straight to cuBLAS (about fp16's time): the
#: kernel against fp16 in one run was 13.7/16.7 us at M=16 and 17.9/14.1 at 32 (4096x4096),
#: 32.4/42.6 at 64 and 52.8/43.2 at 96 (4096x14336), 99.4/161.0 at 64 and 181.3/161.0 at 96
#: (8192x28672) ("Results", table "With the dense cache").
DENSE_THRESHOLDS: tuple[tuple[int | None, int], ...] = ((1 << 24, 16), (1 << 26, 64), (None, 64))

#: 256-row stages pay only with at least this many of them per block slot (two blocks per SM):
#: 8192x28672 (3584 per 264 slots) 1.05-1.10x, 4096x14336 (896) 1.00-1.10x over 128-row
#: stages; 4096x11008 (688) 0.86-0.96x, 4096x4096 (256) 0.77-0.91x.
WIDE4_STAGES_PER_SLOT = 3
#: The rows a layer's Hopper copy (when it has one) serves: above HOPPER_THRESHOLDS, up to
#: HOPPER_MAX_ROWS, both by layer size K * N (limit inclusive, None: larger). H200, 4-bit g128
#: (NOTES/hopper-wgmma.md, "The Hopper route", "Token tiles above 128 rows" and "Decode rows
#: 8-64"), us marlin kernel / Hopper: the copy wins from M = 16 where marlin runs its 128-row
#: stages (11008x4096 19.9 / 16.7, 4096x4096 11.1 / 9.2, 14336x4096 22.8 / 19.9) and loses at
#: M = 8 to the swapped kernels (4096x12288 14.7 / 16.6); where marlin's 256-row stages serve
#: M <= 32 on the largest layers it wins later (4096x22016 M = 16 28.2 / 28.2, 24 33.9 / 32.1;
#: 4096x28672 M = 32 41.8 / 41.9, 48 53.8 / 45.9; 8192x28672 M = 32 64.0 / 72.9, 48 94.5 / 88.0).
#: Upper bound: 8192x28672 M = 256 363.7 / 236.1; 4096x4096 M = 160 28.5 / 22.1 but 192 29.4 / 43.2.
#: Above 256 rows (three 128-row token tiles), us dequantize + cuBLAS / Hopper: the copy still
#: wins up to 384 on layers above 64M weights (4096x22016 M = 320 150.6 / 126.4, 384 155.5 / 126.4;
#: 8192x28672 377.2 / 359.9, 402.9 / 357.4) and ties at 512 (189.0 / 184.8, 472.0 / 473.0); on
#: smaller ones it loses from 320 (4096x12288 86.5 / 103.9, 11008x4096 76.6 / 84.1).
HOPPER_THRESHOLDS: tuple[tuple[int | None, int], ...] = ((1 << 26, 8), (100 << 20, 16), (None, 32))
HOPPER_MAX_ROWS: tuple[tuple[int | None, int], ...] = ((1 << 24, 160), (1 << 26, 256), (None, 384))
BLOCKS_PER_SM = 2  # every kernel at up to 2 row blocks runs two blocks per SM (launch bounds)
TILE_N = 256       # output columns per block tile (csrc/marlin.h kTileN)


@dataclass(frozen=True)
class GpuFacts:
    """What the policy needs to know of the GPU, read once per layer at bind."""

    sm_count: int
    compute_capability: tuple[int, int]

    @classmethod
    def of(cls, device: torch.device) -> GpuFacts:
        """The CUDA device's facts; any other device (a CPU-side preparation, as in the tests)
        plans for the reference GPU, the H200 of docs/DESIGN.md §9."""
        if device.type != "cuda":
            return REFERENCE_GPU
        props = torch.cuda.get_device_properties(device)
        return cls(sm_count=props.multi_processor_count, compute_capability=(props.major, props.minor))


REFERENCE_GPU = GpuFacts(sm_count=132, compute_capability=(9, 0))


def by_size(table: tuple[tuple[int | None, int], ...], size: int) -> int:
    """The rows of the first entry whose size limit holds ``size`` (limits are inclusive)."""
    return next(rows for limit, rows in table if limit is None or size <= limit)


def dequant_threshold(size: int, bits: int) -> int:
    return by_size(DEQUANT_THRESHOLDS_8BIT if bits == 8 else DEQUANT_THRESHOLDS, size)


def dense_threshold(size: int) -> int:
    return by_size(DENSE_THRESHOLDS, size)


def hopper_rows(size: int, low: int | None = None, high: int | None = None,
                caps: tuple[int | None, ...] = ()) -> tuple[int, int]:
    """The rows (low, high] a Hopper copy of a layer of ``size`` = K * N serves: the measured
    tables unless ``low`` / ``high`` are given, ``high`` capped by every given entry of ``caps``
    (a chosen dequant_threshold, the dense copy's threshold: what the user asked for first)."""
    low = by_size(HOPPER_THRESHOLDS, size) if low is None else low
    high = by_size(HOPPER_MAX_ROWS, size) if high is None else high
    return low, min([high, *(c for c in caps if c is not None)])


def kernel_family(bits: int, K: int, N: int, gpu: GpuFacts) -> str:
    """The row of :data:`KERNEL_ROUTES` for a K x N layer of ``bits``-bit weights."""
    if bits == 8:
        return "8bit-tma" if gpu.compute_capability >= (9, 0) else "8bit"
    if K % 128:
        return "4bit-narrow"
    n_tiles = -(-N // TILE_N)
    large = n_tiles * (K // 256) >= WIDE4_STAGES_PER_SLOT * BLOCKS_PER_SM * gpu.sm_count
    return "4bit-wide4" if K % 256 == 0 and large else "4bit-wide"


def hopper_serves(bits: int, K: int, N: int, gpu: GpuFacts) -> bool:
    """Whether the sm_90a wgmma kernel can serve the layer: 4-bit, compute capability 9.0
    exactly (wgmma is an sm_90a instruction), and its tiles (hopper/layout.py) fit K x N."""
    return bits == 4 and gpu.compute_capability == (9, 0) and K % hopper_layout.TILE_K == 0 \
        and N % hopper_layout.BN == 0


def kernel_cut(dequant_rows: int, dense_rows: int | None) -> int:
    """The largest M the kernels serve: above it dequantize + cuBLAS or the dense copy do."""
    return dequant_rows if dense_rows is None else min(dequant_rows, dense_rows)


def layer_policy(bits: int, K: int, N: int, gpu: GpuFacts, dequant_rows: int,
                 dense_rows: int | None = None, hopper: tuple[int, int] | None = None) -> DispatchPolicy:
    """The kernel routes up to ``dequant_rows``, dequantize + cuBLAS above; with a dense copy
    (``dense_rows`` given) the copy serves every M above ``dense_rows``; with a Hopper copy
    (``hopper`` = (low, high), from :func:`hopper_rows`) that copy serves M in (low, high], the
    kernels the rows below it and those between it and ``dequant_rows``."""
    cut = kernel_cut(dequant_rows, dense_rows)
    steps: list[tuple[int | None, str]] = []
    for upto, path in KERNEL_ROUTES[kernel_family(bits, K, N, gpu)]:
        steps.append((cut if upto is None else min(upto, cut), path))
        if upto is None or upto >= cut:
            break
    if hopper is not None and hopper[0] < hopper[1]:
        low, high = hopper
        # the ranges below, the Hopper range, the ranges reaching above it; from_thresholds
        # drops those this empties (a bound not above the previous one)
        steps = ([(min(upto, low), path) for upto, path in steps] + [(high, "marlin:hopper")]
                 + [(upto, path) for upto, path in steps if upto > high])
    if dense_rows is None:
        steps.append((None, "dequant+cublas"))
    else:
        if dense_rows > dequant_rows:
            steps.append((dense_rows, "dequant+cublas"))
        steps.append((None, "dense-cublas"))
    return DispatchPolicy.from_thresholds(*((u, p) for u, p in steps if u is None or u > 0))


def kind_table(policy: DispatchPolicy) -> tuple[tuple[int, int], ...]:
    """The policy as ``gptq_qmatmul`` walks it: ((upto_m, kind), ...), the last bound maxsize."""
    return tuple((sys.maxsize if r.upto_m is None else r.upto_m, KINDS[r.path]) for r in policy.routes)


def kernel_rows(policy: DispatchPolicy) -> int:
    """The largest M an mma.sync kernel serves under ``policy`` (what the stream-K counters and
    slots are sized for; the Hopper route sizes its own need: hopper/ops.py)."""
    kernels = range(KINDS["dequant+cublas"])
    return max((r.upto_m for r in policy.routes if KINDS[r.path] in kernels and r.upto_m), default=0)
