"""Which path serves a layer at which batch size, and how its K is split, decided once at bind.

docs/DESIGN.md §12: the decision is data on the prepared weight: a
:class:`~gptq_core.policy.DispatchPolicy` that ``gptq backends explain`` shows, and a tuple of
:class:`Launch` records (rows up to, kernel kind, units per split) that ``gptq_qmatmul`` walks;
the C++ op receives the kind and the split and only checks that they can serve the call.

The dequantize thresholds are measured on the H200 (below); the split plan and blocks per SM are
still reasoned from the kernel's design and say so (NOTES/perf-h200.md, "cuda and exllama").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from gptq_core.policy import DispatchPolicy

from . import layout

#: The op's ``kind`` argument by path name, in csrc/cuda_kernels.h's order (``KernelKind``; a
#: test compares the two).
KINDS: dict[str, int] = {
    "cuda:mma-m8": 0,       # decode kernel, one m16n8k16 per step for up to 8 rows
    "cuda:mma-m16": 1,      # two per step for up to 16 rows; more rows run as 16-row slices
    "dequant+cublas": 2,    # dequantize into a scratch weight per call, then cuBLAS
}
#: Rows one launch of each kernel kind serves per slice (csrc/cuda_kernels.h ``kRowsPerSlice``).
ROWS = {"cuda:mma-m8": 8, "cuda:mma-m16": 16}

#: Rows above which each call dequantizes the layer and calls cuBLAS, by bit width. Measured on
#: the H200 (benchmarks/results/h200-cuda-exllama-conformance-kernels-4bit-3bit.txt and
#: h200-kernels-2bit-8bit-act-order-and-quantize-7b.txt, 8192x28672 and 4096x4096 at M = 1, 8, 16,
#: 64): the 16-row slices cost about k x the M=16 time, so M=64 took 343/421/424/1765 us at
#: 2/3/4/8 bits where dequantize + cuBLAS costs about fp16's 117 us plus one pass over the weight
#: (~250 us); M=16 still won (87/104/104/132 us). The break-even lies near 32 rows (16 for 8-bit,
#: whose slices stream twice the bytes); the 4096x4096 layer agrees (M=16 at fp16 + dequant).
DEQUANT_THRESHOLDS: dict[int, int] = {2: 32, 3: 32, 4: 32, 8: 16}

#: Threads per block and columns per block (csrc/cuda_kernels.h kThreads, kCtaN).
WARPS = 4
CTA_N = WARPS * layout.STRIP_N
#: Blocks per SM the split is planned for, by compute capability (default 8): 8 blocks are 32
#: resident warps, each lane with 4 loads of 16 bytes in flight: 64 KB per SM, about twice what
#: an H200's 36 GB/s per SM x ~800 cycles of latency needs. GPUs with a quarter of that bandwidth
#: per SM (T4: 8 GB/s, RTX 30xx/40xx: 8-12) fill it with 4 and get twice the shared memory per
#: block for the activations (fewer splits).
BLOCKS_PER_SM: dict[tuple[int, int], int] = {(7, 5): 4, (8, 6): 4, (8, 9): 4, (12, 0): 4}
DEFAULT_BLOCKS_PER_SM = 8
#: ... and at most what the registers of the symmetric 8-row kernels with unit-aligned groups
#: allow (sm_90, nvcc 13.0; the compile test prints them and checks this table: 2-bit 65-66,
#: 3-bit 86-88, 4-bit 64, 8-bit 63-64 registers x 128 threads of a 64K-register SM).
REGISTER_BLOCKS: dict[int, int] = {2: 7, 3: 5, 4: 8, 8: 7}
#: Shared memory per SM by compute capability (CUDA programming guide, "Compute capabilities"),
#: less the 1 KB per block the runtime reserves: the activations' copy must fit the planned
#: blocks per SM. Unknown newer GPUs get the smallest figure of their major version's family.
SMEM_PER_SM: dict[tuple[int, int], int] = {
    (7, 5): 64 << 10, (8, 0): 164 << 10, (8, 6): 100 << 10, (8, 7): 164 << 10,
    (8, 9): 100 << 10, (9, 0): 228 << 10, (10, 0): 228 << 10, (12, 0): 100 << 10,
}
#: The most dynamic shared memory a block takes without raising its limit (every GPU >= 7.5).
SMEM_DEFAULT_LIMIT = 48 << 10
#: A split covers at least this many units per warp: fewer and the 4-deep load pipeline of
#: the kernel never fills.
MIN_UNITS_PER_SPLIT = 4
#: A plan is accepted once its last wave of blocks is this full (blocks / whole waves).
WAVE_FILL = 0.85


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

    def blocks_per_sm(self, bits: int) -> int:
        """Resident blocks the split is planned for (the smaller of bandwidth's and registers')."""
        return min(BLOCKS_PER_SM.get(self.compute_capability, DEFAULT_BLOCKS_PER_SM), REGISTER_BLOCKS[bits])

    def smem_per_block(self, bits: int) -> int:
        """Shared memory one block may take for the activations' copy."""
        cc = self.compute_capability
        known = SMEM_PER_SM.get(cc)
        if known is None:
            family = [v for (major, _), v in SMEM_PER_SM.items() if major == cc[0]]
            known = min(family) if family else min(SMEM_PER_SM.values())
        return min(known // self.blocks_per_sm(bits) - 1024, SMEM_DEFAULT_LIMIT)


REFERENCE_GPU = GpuFacts(sm_count=132, compute_capability=(9, 0))


@dataclass(frozen=True)
class Launch:
    """One route as the op takes it: rows up to ``upto_m`` run kernel ``kind`` with K cut into
    splits of ``units_per_split`` units (0 for dequantize + cuBLAS)."""

    upto_m: int
    kind: int
    units_per_split: int


def x_row_stride(units_per_split: int, bits: int) -> int:
    """Halves per activation row in shared memory (csrc/gemv.cuh ``x_row_stride``): the split's
    channels rounded up to 64, plus 16, so the 8 rows a warp reads land in different banks."""
    k = units_per_split * layout.unit_k(bits)
    return -(-k // 64) * 64 + 16


def x_smem_bytes(rows: int, units_per_split: int, bits: int) -> int:
    return rows * x_row_stride(units_per_split, bits) * 2


def blocks(size_n: int) -> int:
    return -(-size_n // CTA_N)


def split_units(bits: int, size_k: int, size_n: int, rows: int, gpu: GpuFacts) -> int:
    """Units of K per split for a kernel serving ``rows`` rows per slice.

    The activations' shared-memory copy bounds a split from above; filling every SM bounds the
    count of splits from below: the fewest splits whose blocks fill their last wave to
    :data:`WAVE_FILL`, else the best filled, each split at least :data:`MIN_UNITS_PER_SPLIT`
    units where K allows it. A deterministic function of the layer and the GPU.
    """
    units = layout.padded(size_k, size_n, bits)[0] // layout.unit_k(bits)
    cap = units
    while cap > 1 and x_smem_bytes(rows, cap, bits) > gpu.smem_per_block(bits):
        cap -= 1
    fewest = -(-units // cap)
    slots = gpu.sm_count * gpu.blocks_per_sm(bits)
    n_blocks = blocks(size_n)
    most = max(fewest, units // MIN_UNITS_PER_SPLIT)
    best, best_fill = -(-units // fewest), -1.0
    for s in range(fewest, most + 1):
        per = -(-units // s)
        s_real = -(-units // per)
        total = n_blocks * s_real
        fill = total / (-(-total // slots) * slots)
        if fill >= WAVE_FILL and total >= slots:
            return per
        if fill > best_fill + 1e-9:
            best, best_fill = per, fill
    return best


def layer_policy(bits: int, size_k: int, size_n: int, gpu: GpuFacts,
                 dequant_rows: int) -> tuple[DispatchPolicy, tuple[Launch, ...]]:
    """The decode kernels up to ``dequant_rows`` rows (8-row kernel to 8, 16-row kernel in
    16-row slices above), dequantize + cuBLAS beyond."""
    steps: list[tuple[int | None, str]] = []
    launches: list[Launch] = []
    if dequant_rows > 0:
        for path, upto in (("cuda:mma-m8", 8), ("cuda:mma-m16", None)):
            bound = dequant_rows if upto is None else min(upto, dequant_rows)
            per = split_units(bits, size_k, size_n, min(ROWS[path], bound), gpu)
            steps.append((bound, path))
            launches.append(Launch(bound, KINDS[path], per))
            if bound >= dequant_rows:
                break
    steps.append((None, "dequant+cublas"))
    launches.append(Launch(sys.maxsize, KINDS["dequant+cublas"], 0))
    return DispatchPolicy.from_thresholds(*steps), tuple(launches)


def dequant_threshold(bits: int) -> int:
    return DEQUANT_THRESHOLDS[bits]


def splits_of(launch: Launch, bits: int, size_k: int) -> int:
    """How many splits a launch's ``units_per_split`` makes of this K."""
    units = -(-size_k // layout.unit_k(bits))
    return -(-units // launch.units_per_split) if launch.units_per_split else 0
