"""Hook implementations of the ``cuda`` backend (entry point ``gptq.backends: cuda``)."""

from __future__ import annotations

from gptq_core import BackendInfo, Capabilities, hookimpl

from . import __version__, build, layout
from .ops import gemm
from .options import CudaOptions
from .prepare import ACT_DTYPES, CudaPrepared, prepare

CAPABILITIES = Capabilities(
    device_kinds=frozenset({"cuda"}),
    bits=layout.LAYOUT_BITS,
    group_sizes=None,  # -1 or any multiple of 16: the probe names any other (prepare.check_group_size)
    sym=True,
    asym=True,  # runtime zero points
    desc_act=True,  # g_idx sorted at load, activation columns gathered while staged
    act_dtypes=ACT_DTYPES,
    min_compute_capability=build.MIN_ARCH,
    k_multiple=1,  # K and N are padded at load to whole units and strips
    n_multiple=1,
    training=False,
    compile=True,  # no allocation outlives a call, no host sync: CUDA graphs capture it
)

#: Rank among the backends on NVIDIA GPUs (gptq_core.backend: marlin 100, exllama 80, cuda 60,
#: triton 40, torch 0). BackendInfo.priority is per device kind only; the ranking this backend
#: wants per compute capability and bit width is docs/DESIGN.md §4's, in the README.
PRIORITY = {"cuda": 60}


@hookimpl
def gptq_backend_info() -> BackendInfo:
    return BackendInfo(
        name="cuda",
        version=__version__,
        distribution="gptq-backend-cuda",
        priority=PRIORITY,
        description=(
            "CUDA C++ 2/3/4/8-bit x fp16/bf16 decode kernels (weights as the mma A operand, "
            "magic-number dequantization in registers, deterministic split-K over all SMs); "
            "dequantize + cuBLAS for large batches; compute capability 7.5 and newer"
        ),
        capabilities=CAPABILITIES,
        options=CudaOptions,
    )


@hookimpl
def gptq_probe(device, spec) -> list[str]:
    """What the declared data cannot say: the layer's group size (a multiple of 16), bf16 on a
    GPU without bf16 mma, a GPU the user's nvcc does not target, the toolchain, and a build that
    already failed. The build itself happens when a layer is packed, with that load's options."""
    reasons = []
    if spec is not None and spec.group_size != -1 and spec.group_size % layout.STEP_K:
        reasons.append(f"group size {spec.group_size} is not a multiple of {layout.STEP_K}")
    problems = build.toolchain_problems() or ([build.failure()] if build.failure() else [])
    if problems:
        reasons.append(f"extension not built: {'; '.join(problems)}")
    elif device.compute_capability is not None:
        problem = build.arch_problem(device.compute_capability,
                                     None if spec is None else spec.act_dtype, build.nvcc_archs())
        if problem:
            reasons.append(problem)
    return reasons


@hookimpl
def gptq_pack(weight, device, spec, options: CudaOptions) -> CudaPrepared:
    build.load(archs=options.archs, folder=options.build_dir)
    return prepare(weight, device.torch_device, spec.act_dtype, options)


@hookimpl
def gptq_qmatmul(x, prepared, bias):
    p = prepared
    m = x.shape[0]
    for launch in p.launches:  # two or three routes, decided at bind
        if m <= launch.upto_m:
            break
    return gemm(x, p.qweight, p.qhigh, p.scales, p.zeros, p.perm, bias, p.partials, p.counters,
                p.bits, p.group_size, p.size_n, launch.kind, launch.units_per_split)
