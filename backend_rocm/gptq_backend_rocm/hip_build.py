"""Hipify the cuda/exllama sources into a build folder and compile them with hipcc.

The sources are those the installed gptq-backend-cuda and gptq-backend-exllama ship
(``portability.csrc``); they are copied into the build folder and translated there by
``torch.utils.hipify`` (what PyTorch's ROCm builds use for extensions), never kept twice in
the repository (docs/DESIGN.md §1). Launches stay ``<<<...>>>`` (hip-clang compiles them):
hipify's ``hipLaunchKernelGGL`` rewrite misreads exllama's ``select_gemm<DT>(...)<<<...>>>``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from . import portability


def hipify_into(dist: str, folder: Path) -> dict[str, Path]:
    """Copy ``dist``'s csrc into ``folder/dist`` and hipify it there; returns each original
    translation unit's name -> its hipified file."""
    from torch.utils.hipify import hipify_python  # noqa: PLC0415

    dest = Path(folder) / dist
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(portability.csrc(dist), dest)
    result = hipify_python.hipify(project_directory=str(dest), output_directory=str(dest),
                                  includes=["*"], show_progress=False, hip_clang_launch=True,
                                  is_pytorch_extension=True)
    units = {}
    for src, res in result.items():
        path = Path(src)
        if path.suffix in (".cu", ".cpp") and res.hipified_path:
            units[path.name] = Path(res.hipified_path)
    return units


def hipcc_path() -> str | None:
    """hipcc on PATH (Debian: ``apt-get install -y hipcc``)."""
    return shutil.which("hipcc")


def _env() -> dict[str, str]:
    # hipcc picks the NVIDIA platform when nvcc is installed; these builds are for AMD.
    return {**os.environ, "HIP_PLATFORM": "amd"}


@functools.lru_cache(maxsize=1)
def hipcc_version() -> str | None:
    """"HIP version: 5.2.21153-0" as hipcc reports it (None without hipcc)."""
    if hipcc_path() is None:
        return None
    out = subprocess.run([hipcc_path(), "--version"], capture_output=True, text=True, env=_env(),
                         timeout=60).stdout
    m = re.search(r"HIP version: (\S+)", out)
    return m.group(1) if m else None


def compile_unit(unit: Path, arch: str, out: Path, syntax_only: bool = False
                 ) -> subprocess.CompletedProcess:
    """Compile one hipified translation unit for ``arch`` (device code only: the host side
    includes torch's ROCm headers, which a CPU torch does not ship)."""
    cmd = [hipcc_path() or "hipcc", "-std=c++17", "-O3", "-c", f"--offload-arch={arch}",
           "--cuda-device-only", "-I", str(unit.parent), str(unit), "-o", str(out)]
    if syntax_only:
        cmd.insert(1, "-fsyntax-only")
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)


def error_lines(stderr: str) -> set[tuple[str, int]]:
    """(file name, line) of every ``file:line:col: error:`` hipcc printed."""
    return {(Path(m.group(1)).name, int(m.group(2)))
            for m in re.finditer(r"^(\S+?):(\d+):\d+: (?:fatal )?error:", stderr, re.M)}
