"""The CUDA sources compile for sm_90 with nvcc, without register spills (no GPU needed).

The torch binding (marlin_ops.cpp) needs a CUDA build of torch's headers and is compiled only
on a GPU machine; every .cu file here is plain CUDA and builds anywhere nvcc is.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from gptq_backend_marlin import build

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA toolkit is not installed")


def _compile(path, out_dir):
    cmd = [NVCC, "-arch=sm_90", "-O3", "-std=c++17", "--resource-usage", "-c", str(path),
           "-o", str(out_dir / (path.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return path.name, proc.returncode, proc.stdout + proc.stderr


def test_cuda_sources_compile_for_sm90_without_spills(tmp_path):
    cu_files = [p for p in build.sources() if p.suffix == ".cu"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda p: _compile(p, tmp_path), cu_files))
    for name, code, log in results:
        assert code == 0, f"{name} failed to compile:\n{log[-3000:]}"
        assert "warning" not in log.lower(), f"{name}:\n{log[-3000:]}"
        spills = re.findall(r"(\d+) bytes spill stores", log)
        assert all(s == "0" for s in spills), f"{name} spills registers:\n{log[-3000:]}"
        assert spills or name == "marlin_dispatch.cu", f"{name} has no kernels:\n{log[-3000:]}"
    assert len(results) == 5
