"""Reading NVIDIA SASS in a CUDA backend's compile tests (docs/DESIGN.md §8: every kernel's
SASS is checked in CI): the nvcc macros of torch's JIT build, where ``cuobjdump`` is, and
``cuobjdump -sass`` text split into kernels and opcodes. One copy for marlin, cuda, exllama
and third-party backends."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

#: The macros torch.utils.cpp_extension passes to nvcc, so a test compiles the JIT build's code.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                      "--expt-relaxed-constexpr"]

_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def cuobjdump() -> str | None:
    """cuobjdump on PATH, else the copy Triton's wheel carries, else None."""
    found = shutil.which("cuobjdump")
    if found is None and importlib.util.find_spec("triton") is not None:
        bundled = Path(importlib.util.find_spec("triton").origin).parent / "backends/nvidia/bin/cuobjdump"
        found = str(bundled) if bundled.exists() else None
    return found


def kernels(sass: str) -> dict[str, list[tuple[int, str]]]:
    """cuobjdump -sass text -> {mangled name: [(address, instruction text)]}."""
    out = {}
    for body in re.split(r"\n\s*Function : ", sass)[1:]:
        out[body.split()[0]] = [(int(m.group(1), 16), m.group(2).strip())
                                for m in map(_INSTRUCTION.match, body.splitlines()[1:]) if m]
    return out


def opcode(text: str) -> str:
    """The opcode of one instruction's text, without its predicate and modifiers."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
