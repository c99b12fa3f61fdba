"""Which path of the cpu backend serves which batch size (docs/DESIGN.md §12).

``gemv``: every weight dequantized once in registers and multiplied into up to four rows at a
time (decode); ``gemm``: blocks of 128 rows dequantized into an L1-sized buffer that a
register-blocked micro-kernel multiplies into every row (prefill and batches). The threshold
is measured on the 2-core AVX-512 machine (NOTES/perf-cpu.md, "Dispatch").
"""

from __future__ import annotations

from gptq_core.policy import DispatchPolicy

#: Rows above which ``gemm`` serves: the register GEMV streams the weights once per 4 rows and
#: still wins up to 16 rows (measured: NOTES/perf-cpu.md "Dispatch").
GEMM_ABOVE_M = 16

GEMV = "cpu:gemv-registers"
GEMM = "cpu:gemm-l1-blocks"
INT4 = "cpu:torch-int4"


def kernel_policy(gemm_above: int) -> DispatchPolicy:
    return DispatchPolicy.from_thresholds((gemm_above, GEMV), (None, GEMM)) if gemm_above > 0 \
        else DispatchPolicy.single(GEMM)


def fallback_policy(reason: str) -> DispatchPolicy:
    """torch's int4 kernel at every M; the path name carries why the C++ kernels are absent."""
    return DispatchPolicy.single(f"{INT4} (C++ kernels not built: {reason})")
