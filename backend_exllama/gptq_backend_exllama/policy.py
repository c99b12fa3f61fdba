"""Which path serves a layer at which batch size, decided once when the layer is bound.

docs/DESIGN.md §12: the decision is data on the prepared weight (a
:class:`~gptq_core.policy.DispatchPolicy` for ``gptq backends explain`` and a tuple of
``(upto_m, kind)`` ints that ``gptq_qmatmul`` walks); the C++ op receives the kind.

The fp16 threshold is measured on the H200 (benchmarks/results/h200-cuda-exllama-conformance-
kernels-4bit-3bit.txt, 8192x28672, fp16 over cuBLAS): the kernel took 35.9 / 129.0 / 255.3 us at
M = 1 / 8 / 16 and dequantize + cuBLAS 268.4 us at M = 64 (about 250 us at any M up to there),
so the two meet at M = 16; the instruction-count reasoning below had put it near 48. bf16 is
reasoned (never timed).

* The kernel issues about 1.4 + 0.63 M instructions per weight for fp16 (SASS of
  ``gemm_kernel``: 11 per 8 weights to decode, 3 SHF + 4 LOP3 + 4 HADD2, the same count as the
  earlier LOP3 + HFMA2 decode whose rounded zero term left ``q == zero`` slightly nonzero; one
  HFMA2 per two weights and row; one FFMA fold by the column factor per 32 rows; 18 per group
  segment and column quad to derive the pivot and that factor, 0.035 per weight at group size
  128) and about 2.5 + M for bf16 (fp32 FFMA per weight and row). The dequantize kernel decodes
  with 15 per 8 weights (one HMUL2 per pair more); it is bandwidth-bound.
* Dequantize + cuBLAS moves about 4.5 bytes per weight (read 0.5, write 2, read 2 again).
* At ~4.3 TB/s and ~0.93 T warp-instructions/s (132 SMs x 4 schedulers x 1.76 GHz) these meet
  near M = 48 (fp16) and M = 28 (bf16); ExLlama v2 switches at 50 rows on older GPUs
  (docs/DESIGN.md §8). The tables keep a margin below that.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from gptq_core.policy import DispatchPolicy

#: The gemm op's ``kind`` argument by path name (csrc/exllama.h KernelKind; a test compares them).
KINDS: dict[str, int] = {
    "exllama:gemm": 0,       # the split-K CUDA-core kernel
    "dequant+cublas": 1,     # dequantize into a scratch weight per call, then cuBLAS
}

#: Rows above which each call dequantizes + cuBLAS, by activation dtype (reasoned, see above).
DEQUANT_THRESHOLDS: dict[torch.dtype, int] = {torch.float16: 16, torch.bfloat16: 16}

ROWS_PER_CHUNK = 8   # activation rows per block (csrc/exllama.h kRowsPerChunk)
BLOCK_N = 512        # columns per block (kBlockN)


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


def dequant_threshold(act_dtype: torch.dtype) -> int:
    return DEQUANT_THRESHOLDS[act_dtype]


def layer_policy(dequant_rows: int) -> DispatchPolicy:
    """The kernel up to ``dequant_rows`` rows, dequantize + cuBLAS above."""
    return DispatchPolicy.from_thresholds(
        *((u, p) for u, p in ((dequant_rows, "exllama:gemm"), (None, "dequant+cublas")) if u is None or u > 0))


def kind_table(policy: DispatchPolicy) -> tuple[tuple[int, int], ...]:
    """The policy as ``gptq_qmatmul`` walks it: ((upto_m, kind), ...), the last bound maxsize."""
    return tuple((sys.maxsize if r.upto_m is None else r.upto_m, KINDS[r.path]) for r in policy.routes)


def kernel_rows(policy: DispatchPolicy) -> int:
    """The largest M the kernel serves under ``policy`` (what the workspace is sized for)."""
    return max((r.upto_m for r in policy.routes if r.path == "exllama:gemm" and r.upto_m), default=0)
