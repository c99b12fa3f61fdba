"""Hook implementations of the ``rocm`` backend (entry point ``gptq.backends: rocm``).

It serves 4-bit layers on AMD GPUs with gptq-backend-exllama's kernels, hipified at build
time (``build.py``), and with exllama's own Python: the same capabilities (on "rocm"
devices), the same prepared layout (``prepare``), the same ops and the same ``gptq_qmatmul``.
2-, 3- and 8-bit layers need the cuda backend's kernels, whose mma.sync fragments have no HIP
form (``portability.scan("cuda")``): the triton backend's AMD path serves them.

Its rank on "rocm" (30) is below triton's (40): the exllama kernel was designed and counted
for NVIDIA (README: what its AMD code looks like), Triton lowers its dots to MFMA on CDNA,
and neither has been timed on AMD hardware; to be re-ranked by that measurement.
"""

from __future__ import annotations

import dataclasses
import functools

from gptq_backend_exllama import plugin as exllama_plugin
from gptq_backend_exllama.layout import STEP_K
from gptq_backend_exllama.prepare import ExllamaPrepared, prepare
from gptq_core import BackendInfo, hookimpl
from gptq_core.errors import GPTQError

from . import __version__, build, portability, probe
from .options import RocmOptions

#: What the exllama kernels serve, on AMD GPUs (no compute-capability floor: the gfx
#: architecture is the probe's).
CAPABILITIES = dataclasses.replace(exllama_plugin.CAPABILITIES, device_kinds=frozenset({"rocm"}),
                                   min_compute_capability=None)


class NotPortableError(GPTQError, RuntimeError):
    """The HIP kernels cannot be built; the message names the NVIDIA-only code."""


@functools.lru_cache(maxsize=None)
def source_problem(dist: str) -> str | None:
    """Why ``dist``'s shipped kernels cannot be hipified as they are (None: they can); the
    sources do not change while a process runs, so they are scanned once."""
    try:
        return portability.reason(dist)
    except FileNotFoundError as exc:
        return str(exc)


def kernel_problems() -> list[str]:
    """One reason per source distribution whose kernels cannot be hipified as written (the
    rocm backend builds exllama's; the cuda backend's are listed for `gptq backends list`)."""
    return [p for dist in portability.SOURCES if (p := source_problem(dist))]


@hookimpl
def gptq_backend_info() -> BackendInfo:
    return BackendInfo(
        name="rocm",
        version=__version__,
        distribution="gptq-backend-rocm",
        priority={"rocm": 30},  # below triton's 40 on rocm: see the module docstring
        description=("gptq-backend-exllama's 4-bit kernels hipified at build time for AMD GPUs "
                     "(2/3/8-bit: the triton backend)"),
        capabilities=CAPABILITIES,
        options=RocmOptions,
    )


@hookimpl
def gptq_probe(device, spec) -> list[str]:
    """A ROCm torch and a supported gfx architecture first; then what the declared data cannot
    say: a group size the 8-row steps cannot walk, whether exllama's sources are portable as
    shipped, the toolchain (hipcc, ninja) and a build that already failed."""
    problems = probe.device_problems(device)
    if problems:
        return problems
    reasons = []
    if spec is not None and spec.group_size != -1 and spec.group_size % STEP_K:
        reasons.append(f"group size {spec.group_size} is not a multiple of {STEP_K}")
    problem = source_problem("exllama")
    if problem:
        return reasons + [problem]
    missing = build.toolchain_problems()
    if missing:
        return reasons + [f"extension not built: {'; '.join(missing)}"]
    if build.failure():
        reasons.append(f"extension not built: {build.failure()}")
    return reasons


@hookimpl
def gptq_pack(weight, device, spec, options: RocmOptions) -> ExllamaPrepared:
    problem = source_problem("exllama")
    if problem:
        raise NotPortableError(problem)
    build.load(archs=options.archs, folder=options.build_dir)
    return prepare(weight, device.torch_device, spec.act_dtype, options.exllama())


#: exllama's own call (its policy walk and op), bound directly: no extra Python frame per call.
gptq_qmatmul = exllama_plugin.gptq_qmatmul
