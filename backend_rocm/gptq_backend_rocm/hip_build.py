"""Hipify the cuda/exllama sources into a build folder and compile them with hipcc.

The sources are those the installed gptq-backend-cuda and gptq-backend-exllama ship
(``portability.csrc``); they are copied into the build folder and translated there by
``torch.utils.hipify`` (what PyTorch's ROCm builds use for extensions), never kept twice in
the repository (docs/DESIGN.md §1). Launches stay ``<<<...>>>`` (hip-clang compiles them):
hipify's ``hipLaunchKernelGGL`` rewrite misreads exllama's ``select_gemm<DT>(...)<<<...>>>``.
The JIT build (``build.py``) hands these same hipified files to torch's extension builder,
whose own hipify pass leaves files marked as hipify output alone; the compile tests here use
the macros that builder passes to hipcc (:func:`torch_hip_defines`), so they compile the code
the JIT build compiles.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import portability


def hipify_into(dist: str, folder: Path) -> dict[str, Path]:
    """Copy ``dist``'s csrc into ``folder/dist`` and hipify it there; returns each original
    translation unit's name -> its hipified file.

    The CUDA originals of every translated file are removed, so the folder holds exactly what
    is compiled: torch's extension builder hipifies every CUDA file in its include path again,
    without ``hip_clang_launch``, and would overwrite ``gemm_hip.cuh`` from ``gemm.cuh`` with
    the misread launches; files marked as hipify output, and files with nothing to translate,
    it leaves as they are."""
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
        if not res.hipified_path or path.parent != dest:
            continue
        if path.suffix in (".cu", ".cpp"):
            units[path.name] = Path(res.hipified_path)
        if Path(res.hipified_path) != path:
            path.unlink()
    return units


def hipcc_path() -> str | None:
    """hipcc on PATH (Debian: ``apt-get install -y hipcc``)."""
    return shutil.which("hipcc")


def _env() -> dict[str, str]:
    # hipcc picks the NVIDIA platform when nvcc is installed; these builds are for AMD.
    return {**os.environ, "HIP_PLATFORM": "amd"}


def _run_hipcc(cmd: list[str]) -> subprocess.CompletedProcess:
    """One hipcc call in a temporary folder of its own as TMPDIR, removed afterwards: hipcc's
    clang leaves an empty folder per unit there (``exllama_f16-<hash>``), which in /tmp would
    pile up with every build."""
    with tempfile.TemporaryDirectory(prefix="gptq-hipcc-") as tmp:
        return subprocess.run(cmd, capture_output=True, text=True, env={**_env(), "TMPDIR": tmp}, timeout=300)


@functools.lru_cache(maxsize=1)
def hipcc_version() -> str | None:
    """"HIP version: 5.2.21153-0" as hipcc reports it (None without hipcc)."""
    if hipcc_path() is None:
        return None
    out = subprocess.run([hipcc_path(), "--version"], capture_output=True, text=True, env=_env(),
                         timeout=60).stdout
    m = re.search(r"HIP version: (\S+)", out)
    return m.group(1) if m else None


@functools.lru_cache(maxsize=1)
def clang_major() -> int | None:
    """The major version of the clang that hipcc drives (15 for Debian 12's hipcc)."""
    if hipcc_path() is None:
        return None
    out = subprocess.run([hipcc_path(), "--version"], capture_output=True, text=True, env=_env(),
                         timeout=60).stdout
    m = re.search(r"clang version (\d+)", out)
    return int(m.group(1)) if m else None


def torch_hip_defines() -> list[str]:
    """The macros torch's extension builder passes to hipcc on a ROCm torch
    (``COMMON_HIP_FLAGS`` + ``COMMON_HIPCC_FLAGS``: ``__HIP_PLATFORM_AMD__``, ``USE_ROCM``, no
    implicit half operators or conversions), read from the installed torch."""
    from torch.utils import cpp_extension  # noqa: PLC0415 (slow import, first use only)

    flags = [*cpp_extension.COMMON_HIP_FLAGS, *cpp_extension.COMMON_HIPCC_FLAGS]
    return [f for f in flags if f.startswith("-D")]


def compile_unit(unit: Path, arch: str, out: Path, syntax_only: bool = False,
                 device_only: bool = True, extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Compile one hipified translation unit for ``arch`` with torch's ROCm macros.

    ``device_only`` (the default) writes the code object of ``arch`` itself (an ELF that
    ``code_object`` reads), since the host side of ``*_ops.cpp`` includes torch's ROCm headers,
    which a CPU torch does not ship; the kernel units (``exllama_*.cu``) include only HIP's
    runtime headers and also compile whole (``device_only=False``: a host object with the code
    object embedded)."""
    cmd = [hipcc_path() or "hipcc", "-std=c++17", "-O3", "-c", f"--offload-arch={arch}",
           "-fno-gpu-rdc", *torch_hip_defines(), *extra, "-I", str(unit.parent), str(unit),
           "-o", str(out)]
    if device_only:
        cmd[1:1] = ["--cuda-device-only", "--no-gpu-bundle-output"]
    else:
        cmd.insert(1, "-fPIC")
    if syntax_only:
        cmd.insert(1, "-fsyntax-only")
    return _run_hipcc(cmd)


def link_shared(objects: Sequence[Path], out: Path, arch: str) -> subprocess.CompletedProcess:
    """Link host objects (``device_only=False``) into a shared library against HIP's runtime,
    as torch's builder links an extension: every launch and runtime call must resolve. ``arch``
    is named so that hipcc does not ask ``rocm_agent_enumerator`` for the GPUs present."""
    cmd = [hipcc_path() or "hipcc", "-shared", "-fPIC", "-fno-gpu-rdc", f"--offload-arch={arch}",
           *map(str, objects), "-o", str(out), "-Wl,--no-undefined", "-lamdhip64"]
    return _run_hipcc(cmd)


def error_lines(stderr: str) -> set[tuple[str, int]]:
    """(file name, line) of every ``file:line:col: error:`` hipcc printed."""
    return {(Path(m.group(1)).name, int(m.group(2)))
            for m in re.finditer(r"^(\S+?):(\d+):\d+: (?:fatal )?error:", stderr, re.M)}
