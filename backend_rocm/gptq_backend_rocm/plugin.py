"""Hook implementations of the ``rocm`` backend (entry point ``gptq.backends: rocm``).

It serves nothing yet: every kernel it would build from the cuda and exllama sources holds
NVIDIA-only code (``portability``), which the probe names file by file, so on an AMD GPU the
triton backend's AMD path serves. Its rank on "rocm" is below triton's (40): the hipified
kernels were designed for NVIDIA (fp16x2 FMAs, mma.sync fragments of 32-lane warps) while
Triton lowers its dots to MFMA on CDNA; to be revisited with a measurement on AMD hardware.
"""

from __future__ import annotations

import torch

from gptq_core import BackendInfo, Capabilities, hookimpl
from gptq_core.errors import GPTQError

from . import __version__, portability, probe

CAPABILITIES = Capabilities(
    device_kinds=frozenset({"rocm"}),
    bits=(2, 3, 4, 8),
    act_dtypes=(torch.float16, torch.bfloat16),
    training=False,
    compile=False,
)


class NotPortableError(GPTQError, RuntimeError):
    """The HIP kernels cannot be built; the message names the NVIDIA-only code."""


def kernel_problems() -> list[str]:
    """One reason per source distribution whose kernels cannot be hipified as written."""
    out = []
    for dist in portability.SOURCES:
        try:
            problem = portability.reason(dist)
        except FileNotFoundError as exc:
            problem = str(exc)
        if problem:
            out.append(problem)
    return out


@hookimpl
def gptq_backend_info() -> BackendInfo:
    return BackendInfo(
        name="rocm",
        version=__version__,
        distribution="gptq-backend-rocm",
        priority={"rocm": 30},  # below triton's 40 on rocm: see the module docstring
        description="HIP builds of the cuda/exllama kernels, hipified at build time (AMD GPUs)",
        capabilities=CAPABILITIES,
    )


@hookimpl
def gptq_probe(device, spec) -> list[str]:
    """A ROCm torch and a known gfx architecture first, then whether the kernels port."""
    return probe.device_problems(device) or kernel_problems()


@hookimpl
def gptq_pack(weight, device, spec):
    raise NotPortableError("; ".join(probe.device_problems(device) or kernel_problems())
                           or "the HIP extension is not built yet")


@hookimpl
def gptq_qmatmul(x, prepared, bias):
    raise NotPortableError("the rocm backend prepared nothing: its kernels are not portable yet")
