"""The CUDA sources compile with nvcc for sm_75, 80, 86, 89 and 90 without register spills,
and the hot kernels' SASS decodes two weights per LOP3 + HADD2 (no GPU needed).

The torch binding (exllama_ops.cpp) needs a CUDA build of torch's headers and is compiled
only on a GPU machine; every .cu file here is plain CUDA and builds anywhere nvcc is.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gptq_backend_exllama import build
from gptq_core.sass import TORCH_NVCC_DEFINES, cuobjdump, kernels, opcode

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA toolkit is not installed")
ARCHS = ("75", "80", "86", "89", "90")
#: gemm_kernel<DT, ROWS, STREAM> as mangled by nvcc.
GEMM = re.compile(r"gemm_kernelILi(\d)ELi(\d)ELb(\d)E")


def _compile(path: Path, out_dir: Path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, *gencode, "-O3", "-std=c++17", *TORCH_NVCC_DEFINES, "--resource-usage",
           "-c", str(path), "-o", str(out_dir / (path.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return path.name, proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every .cu file compiled once for every listed architecture: (object folder, results)."""
    out = tmp_path_factory.mktemp("exllama_objs")
    cu_files = [p for p in build.sources() if p.suffix == ".cu"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda p: _compile(p, out), cu_files))
    return out, results


def _entries(log: str) -> list[tuple[str, str, str, int]]:
    """(arch, mangled name, ptxas properties, registers) of every kernel in a ptxas log."""
    found = []
    arch = "?"
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", log):
        m = re.search(r"for 'sm_(\d+)'", block)
        arch = m.group(1) if m else arch
        k = re.search(r"Compiling entry function '(\w+)'", block)
        regs = re.search(r"Used (\d+) registers", block)
        if k and regs:
            found.append((arch, k.group(1), block, int(regs.group(1))))
    return found


def test_sources_compile_for_every_arch_without_spills(built):
    _, results = built
    for name, code, log in results:
        assert code == 0, f"{name} failed to compile:\n{log[-3000:]}"
        assert "warning" not in log.lower(), f"{name}:\n{log[-3000:]}"
    kernels = [e for _, _, log in results for e in _entries(log)]
    # Per dtype and arch: 8 streaming row counts + the re-reading 8-row kernel + dequantize.
    assert len(kernels) == 2 * len(ARCHS) * 10, [k[:2] for k in kernels]
    assert {k[0] for k in kernels} == set(ARCHS)
    for arch, kernel, info, regs in kernels:
        assert re.search(r"0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads", info), \
            f"sm_{arch}: {kernel} uses local memory:\n{info}"
        # __launch_bounds__(128, 4): four blocks of 128 threads per SM need <= 128 registers.
        assert regs <= 128, f"sm_{arch}: {kernel} uses {regs} registers"
        if GEMM.search(kernel) and GEMM.search(kernel).group(2) == "1":
            assert regs <= 96, f"sm_{arch}: the M=1 kernel {kernel} uses {regs} registers"


def _op(text: str) -> str:
    """The opcode, with the fp16 forms told apart: HADD2.F32 (an fp16 -> fp32 conversion) from
    HADD2, and HFMA2 by 1 (ptxas's spelling of an add on the other pipe, HFMA2.MMA a, 1, 1, b)
    from a real HFMA2."""
    op = opcode(text)
    full = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
    if op == "HADD2" and ".F32" in full:
        return "HADD2.F32"
    if op == "HFMA2" and re.search(r", 1, 1, ", text):
        return "HADD2"
    return op


def _opcounts(obj: Path, arch: str) -> dict[tuple[int, int, bool], collections.Counter]:
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found: the SASS checks need it")
    sass = subprocess.run([tool, "-sass", "-arch", f"sm_{arch}", str(obj)], capture_output=True,
                          text=True, timeout=300).stdout
    out = {}
    for name, ins in kernels(sass).items():
        m = GEMM.search(name)
        if m:
            out[(int(m.group(1)), int(m.group(2)), m.group(3) == "1")] = collections.Counter(_op(t) for _, t in ins)
    return out


@pytest.mark.parametrize("arch", ["75", "90"])
def test_fp16_kernels_decode_two_weights_per_lop3_and_hadd2(built, arch):
    """Each fp16 gemm kernel holds two step bodies (32 and 8 rows: 20 words x 4 pairs = 80
    pairs). One LOP3 per pair (plus bookkeeping, < 200: the C++ form of the mask-and-or gave two
    each) and one HADD2 per pair to decode (d = x - X0, exact: csrc/qdq4.cuh), one HFMA2 per
    pair and row for the dot product, no HMUL2 per pair (the scale is applied once per column
    and step, by the FFMA that folds the half2 sums into fp32); no local memory traffic."""
    obj_dir, _ = built
    kernels = _opcounts(obj_dir / "exllama_f16.o", arch)
    assert len(kernels) == 9
    for (dt, rows, stream), ops in kernels.items():
        assert dt == 0
        where = f"sm_{arch} rows={rows}: {dict(ops)}"
        assert "LDL" not in ops and "STL" not in ops, f"{where}: local memory"
        assert ops["HMUL2"] <= 2, f"{where}: HMUL2 in the hot loop"  # unfold_f16's M, per group
        if rows >= 2:
            assert ops["LOP3"] < 200, where
            assert 80 <= ops["HADD2"] <= 88, where
            assert 80 * rows <= ops["HFMA2"] <= 80 * rows + 24, where
            assert ops["FFMA"] >= 8 * rows, where  # the fold: two step bodies x 4 columns
        else:
            assert ops["HADD2"] <= ops["HFMA2"] <= ops["HADD2"] + 8, where  # one decode per dot
        assert ops["LDS"] >= 10 * rows, "activations are read 16 bytes at a time"


def test_streaming_kernels_use_evict_first_loads(built):
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found")
    obj_dir, _ = built
    sass = subprocess.run([tool, "-sass", "-arch", "sm_90", str(obj_dir / "exllama_f16.o")],
                          capture_output=True, text=True, timeout=300).stdout
    bodies = {b.split()[0]: b for b in re.split(r"\n\s*Function : ", sass)[1:]}
    for name, body in bodies.items():
        m = GEMM.search(name)
        if m and m.group(3) == "1":
            assert "LDG.E.EF.128" in body, f"{name}: weights are not streamed"
        # docs/DESIGN.md §8: no cache-policy descriptor in an odd register pair (no createpolicy).
        assert not re.search(r"desc\[UR\d*[13579]\]", body), f"{name}: odd descriptor register"
