"""Whether this process can run HIP kernels at all: a ROCm build of torch and an AMD GPU
(its gfx architecture), else the reason."""

from __future__ import annotations

import torch

from gptq_core import DeviceInfo

#: Architectures the kernels are built for: CDNA Instinct (MI100, MI200, MI300, MI350) and
#: Radeon RDNA2/RDNA3/RDNA4. The compile tests cover gfx908, gfx90a, gfx940 and gfx1030, the
#: ones Debian's hipcc 5.2 knows (README, CI).
SUPPORTED_ARCHS = ("gfx908", "gfx90a", "gfx942", "gfx950", "gfx1030", "gfx1100", "gfx1101", "gfx1201")


def torch_problem() -> str | None:
    """Why this torch cannot drive AMD GPUs (None: it is a ROCm build)."""
    if torch.version.hip is None:
        return (f"this torch build ({torch.__version__}) has no HIP support; install a ROCm "
                "build of torch (https://pytorch.org/get-started/locally/, ROCm)")
    return None


def gfx_arch(index: int) -> str:
    """"gfx942" from torch's gcnArchName ("gfx942:sramecc+:xnack-")."""
    return torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]


def arch_problem(arch: str) -> str | None:
    """Why the kernels are not built for ``arch`` (None: they are)."""
    if arch not in SUPPORTED_ARCHS:
        return f"{arch} is not among the architectures built for ({', '.join(SUPPORTED_ARCHS)})"
    return None


def device_problems(device: DeviceInfo) -> list[str]:
    """Why ``device`` is not a usable AMD GPU (empty: it is one)."""
    problem = torch_problem()
    if problem:
        return [problem]
    if device.kind != "rocm" or not device.is_hip or device.index is None:
        return [f"{device.describe()} is not an AMD GPU (torch.version.hip {torch.version.hip})"]
    problem = arch_problem(gfx_arch(device.index))
    return [problem] if problem else []
