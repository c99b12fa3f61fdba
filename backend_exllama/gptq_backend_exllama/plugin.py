"""Hook implementations of the ``exllama`` backend (entry point ``gptq.backends: exllama``)."""

from __future__ import annotations

from gptq_core import BackendInfo, Capabilities, hookimpl

from . import __version__, build
from .layout import QUAD, STEP_K
from .ops import gemm
from .options import ExllamaOptions
from .prepare import ACT_DTYPES, ExllamaPrepared, prepare

CAPABILITIES = Capabilities(
    device_kinds=frozenset({"cuda"}),
    bits=(4,),
    group_sizes=(-1, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024),  # multiples of 8
    sym=True,
    asym=True,  # zero points are folded per group and column, no cost
    desc_act=True,  # rows sorted at load, activation columns read through the permutation
    act_dtypes=ACT_DTYPES,
    min_compute_capability=build.MIN_ARCH,  # and what the toolkit builds: the probe asks nvcc
    k_multiple=1,  # K is padded to 8 rows at load
    n_multiple=QUAD,
    training=False,
    compile=True,  # no allocation outlives a call, no host sync: CUDA graphs capture it
)


@hookimpl
def gptq_backend_info() -> BackendInfo:
    return BackendInfo(
        name="exllama",
        version=__version__,
        distribution="gptq-backend-exllama",
        # Between marlin (100) and the cuda backend (60): first on GPUs marlin rejects
        # (compute capability < 8.0), docs/DESIGN.md §4.
        priority={"cuda": 80},
        description=(
            "ExLlama-style 4-bit kernel: rows sorted at load (act-order free), two nibbles per "
            "LOP3 + HADD2 (exact), split-K over all SMs; dequantize + cuBLAS for large batches"
        ),
        capabilities=CAPABILITIES,
        options=ExllamaOptions,
    )


@hookimpl
def gptq_probe(device, spec) -> list[str]:
    """What the declared data cannot say: a group size the 8-row steps cannot walk, whether the
    installed toolkit builds for this GPU (``nvcc --list-gpu-arch``), the toolchain, and a build
    that already failed. The build itself happens when a layer is packed."""
    reasons = []
    if spec is not None and spec.group_size != -1 and spec.group_size % STEP_K:
        reasons.append(f"group size {spec.group_size} is not a multiple of {STEP_K}")
    problems = build.toolchain_problems()
    if problems:
        return reasons + [f"extension not built: {'; '.join(problems)}"]
    if device.compute_capability is not None:
        problem = build.arch_problem(tuple(device.compute_capability), build.toolkit_archs())
        if problem:
            reasons.append(problem)
    if build.failure():
        reasons.append(f"extension not built: {build.failure()}")
    return reasons


@hookimpl
def gptq_pack(weight, device, spec, options: ExllamaOptions) -> ExllamaPrepared:
    build.load(archs=options.archs, folder=options.build_dir)
    return prepare(weight, device.torch_device, spec.act_dtype, options)


@hookimpl
def gptq_qmatmul(x, prepared, bias):
    p = prepared
    m = x.shape[0]
    for upto, kind in p.kinds:  # one or two (upto_m, kind) pairs, decided at bind
        if m <= upto:
            break
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return gemm(x, p.q, p.sz, p.perm, bias, p.acc, p.counters, p.group_rows, p.size_n, kind)
