"""Hook implementations of the ``cpu`` backend (entry point ``gptq.backends: cpu``).

Serves CPU layers ahead of the torch reference: the C++ kernels (csrc/, built on first use)
for every bit width, group size, sym/asym and act-order; where they cannot be built, torch's
own int4 CPU kernel for the 4-bit bfloat16 layers it takes, and the next backend for the rest.
"""

from __future__ import annotations

import torch

from gptq_core import BackendInfo, Capabilities, hookimpl
from gptq_core.errors import NotSupportedError, warn_once
from gptq_core.tracing import plain_eager

from . import build, ops
from .fallback import int4_reason, int4pack_mm, pack_int4
from .layout import CpuPrepared, repack
from .options import CpuOptions
from .policy import GEMM_ABOVE_M, fallback_policy, kernel_policy

#: Above the torch reference (0) and the example (-10) on the CPU (docs/DESIGN.md §4).
PRIORITY = 20

@hookimpl
def gptq_backend_info() -> BackendInfo:
    return BackendInfo(
        name="cpu",
        priority={"cpu": PRIORITY},
        description=(
            "C++ kernels (AVX-512 / AVX2 / plain, chosen at run time; built on first use) "
            "that dequantize in registers: a weight-streaming GEMV for decode and an L1-blocked "
            "GEMM above it; torch's int4 CPU kernel (4-bit, bf16) when no compiler is present"
        ),
        capabilities=Capabilities(
            device_kinds=frozenset({"cpu"}),
            bits=(2, 3, 4, 8),
            group_sizes=None,
            # torch.compile(fullgraph=True): one custom op with a fake implementation per path
            compile=True,
        ),
        options=CpuOptions,
    )


def _kernel_problem() -> str | None:
    """Why the C++ kernels cannot serve, known without building (toolchain, earlier failure)."""
    problems = build.toolchain_problems() or ([build.failure()] if build.failure() else [])
    return "; ".join(problems) if problems else None


@hookimpl
def gptq_probe(device, spec) -> list[str]:
    """Only what is cheap to know: the toolchain and a build that already failed. Without the
    C++ kernels, the 4-bit bfloat16 layers torch's int4 kernel takes are still served."""
    problem = _kernel_problem()
    if problem is None or spec is None:
        return []
    reason = int4_reason(spec.bits, spec.group_size, spec.in_features, spec.act_dtype)
    return [] if reason is None else [f"C++ kernels not built ({problem}) and torch's int4 "
                                      f"CPU kernel cannot serve it: {reason}"]


def _fallback(weight, problem: str, act_dtype: torch.dtype) -> CpuPrepared:
    warn_once(f"gptq cpu backend: C++ kernels not built ({problem}); 4-bit bfloat16 "
              "layers use torch's int4 CPU kernel, the rest the next backend", stacklevel=4)
    try:
        pack = pack_int4(weight, act_dtype)
    except NotSupportedError as exc:
        reason = f"C++ kernels not built ({problem}) and torch's int4 CPU kernel cannot serve it: {exc}"
        raise NotSupportedError(reason, [reason]) from None
    return CpuPrepared(layout=None, policy=fallback_policy(problem), bits=weight.bits,
                       gemm_above=0, fallback=pack)


@hookimpl
def gptq_pack(weight, device, spec, options: CpuOptions) -> CpuPrepared:
    try:
        build.load(options.build_dir)
    except build.BuildError as exc:
        return _fallback(weight, str(exc), spec.act_dtype)
    gemm_above = GEMM_ABOVE_M if options.gemm_threshold is None else options.gemm_threshold
    L = repack(weight)
    # The direct entry with the layout bound once: an eager decode step of a small model is
    # mostly per-call overhead (NOTES/perf-cpu.md "End to end"; docs/DESIGN.md §3).
    eager = build.module().EagerLayer(L.qdata, L.scales, L.zeros, L.segs, L.perm, L.vals_per_byte,
                                      L.sym_zero, L.in_features, L.out_features, gemm_above)
    return CpuPrepared(layout=L, policy=kernel_policy(gemm_above), bits=weight.bits,
                       gemm_above=gemm_above, eager_qmatmul=eager)


@hookimpl
def gptq_qmatmul(x, prepared, bias):
    L = prepared.layout
    if L is None:
        f = prepared.fallback
        return int4pack_mm(x, f.packed, f.scale_zeros, f.perm, bias, f.group_size,
                           f.scale_zeros.shape[1])
    kind = ops.KIND_GEMV if x.shape[0] <= prepared.gemm_above else ops.KIND_GEMM
    # The extension's direct entry eagerly (no dispatcher: docs/DESIGN.md §11), the custom op
    # when traced or recorded.
    run = build.module().qmatmul if plain_eager() else ops.qmatmul
    return run(x, L.qdata, L.scales, L.zeros, L.segs, L.perm, bias, L.vals_per_byte,
               L.sym_zero, L.out_features, kind)
