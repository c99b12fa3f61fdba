"""The CUDA sources compile with nvcc for every supported GPU family, without local memory on
the decode kernels, with their register counts reported, and the hot loop's instruction mix is
what the design says (no GPU needed).

Budget (2 CPU cores, about 3 minutes): every .cu file for sm_90 (the judging GPU: SASS checks),
and one representative file each for sm_75, sm_80, sm_86 and sm_89 (every file builds on its
own, so one per family proves the family's instructions assemble). The torch binding
(cuda_ops.cpp) needs a CUDA build of torch's headers and is compiled only on a GPU machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gptq_backend_cuda import build, policy
from gptq_backend_cuda.policy import KINDS
from gptq_core.sass import TORCH_NVCC_DEFINES, cuobjdump, kernels

import cuda_sass

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA toolkit is not installed")
KERNEL_FILES = ("cuda_b2", "cuda_b3", "cuda_b4", "cuda_b8")
#: One file per other architecture: each bit width's dequantization meets an older GPU once.
OTHER_ARCHS = {"75": "cuda_b4", "80": "cuda_b3", "86": "cuda_b2", "89": "cuda_b8"}


def _compile(path: Path, arch: str, out_dir: Path) -> tuple[str, str, int, str]:
    obj = out_dir / f"{path.stem}_sm{arch}.o"
    cmd = [NVCC, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-O3", "-std=c++17", *TORCH_NVCC_DEFINES,
           "--resource-usage", "-c", str(path), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return path.stem, arch, proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every job compiled once for this module: (object folder, {(stem, arch): (code, log)})."""
    out = tmp_path_factory.mktemp("cuda_build")
    csrc = {p.stem: p for p in build.sources() if p.suffix == ".cu"}
    jobs = [(csrc[s], "90") for s in KERNEL_FILES] + [(csrc[s], a) for a, s in OTHER_ARCHS.items()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _compile(job[0], job[1], out), jobs))
    return out, {(stem, arch): (code, log) for stem, arch, code, log in results}


def _entries(log: str) -> list[tuple[str, str, int]]:
    """(mangled name, ptxas properties, registers) of every kernel in a ptxas log."""
    found = re.findall(r"Compiling entry function '(\w+)'(.*?)Used (\d+) registers", log, re.S)
    return [(k, info, int(regs)) for k, info, regs in found]


def test_sources_compile_for_every_family_without_warnings(built):
    _, results = built
    assert set(results) == {(s, "90") for s in KERNEL_FILES} | {(s, a) for a, s in OTHER_ARCHS.items()}
    for (stem, arch), (code, log) in results.items():
        assert code == 0, f"{stem} sm_{arch} failed to compile:\n{log[-3000:]}"
        assert "warning" not in log.lower(), f"{stem} sm_{arch}:\n{log[-3000:]}"


def test_decode_kernels_use_no_local_memory_and_report_their_registers(built, capsys):
    """Each bit-width file holds 16 decode kernels (fp16/bf16 x 8/16 rows x sym/asym x groups
    aligned to units or not) and 4 dense dequantization kernels, none with a stack frame or spills. Register counts are printed (-s)
    and bounded: the split is planned for 5-8 blocks of 128 threads per SM (<= 96 registers)."""
    _, results = built
    table = []
    for (stem, arch), (_, log) in sorted(results.items()):
        entries = _entries(log)
        gemv = [(k, info, regs) for k, info, regs in entries if cuda_sass.gemv_id(k)]
        dense = [e for e in entries if "dequant_kernel" in e[0]]
        assert len(gemv) == 16 and len(dense) == 4, f"{stem} sm_{arch}: {len(gemv)} decode, {len(dense)} dense"
        for kernel, info, regs in gemv + dense:
            assert re.search(r"\b0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads", info), \
                f"{stem} sm_{arch}: {kernel} uses local memory:{info}"
        for kernel, _, regs in gemv:
            bits, dt, mt, zeros, aligned = cuda_sass.gemv_id(kernel)
            table.append(f"sm_{arch} b{bits} {dt} m{8 * mt} {'asym' if zeros else 'sym '} "
                         f"{'unit-groups' if aligned else 'step-groups'}: {regs} registers")
            assert regs <= 102, f"{stem} sm_{arch}: {kernel} {regs} registers (launch bounds: 5 blocks)"
            if arch == "90" and mt == 1 and aligned and not zeros:
                # The split plan's blocks per SM (policy.REGISTER_BLOCKS) must fit these registers
                # (allocated per warp in units of 256: 8 registers a thread); asymmetric kernels
                # may take a few more (4-bit: 68, 7 blocks), the plan is for the common case.
                fits = 65536 // (4 * 32 * (-(-regs // 8) * 8))
                assert fits >= policy.REGISTER_BLOCKS[bits], \
                    f"{kernel}: {regs} registers allow {fits} blocks per SM, the plan assumes {policy.REGISTER_BLOCKS[bits]}"
    with capsys.disabled():
        print("\n" + "\n".join(table))


def _sass(obj: Path) -> dict[str, list[tuple[int, str]]]:
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found: the SASS checks need it (pip install triton carries one)")
    text = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, timeout=300).stdout
    return kernels(text)


#: Most instructions per step (8 weights a lane, 256 a warp) the sm_90 decode kernel's unrolled
#: main loop may issue (one row tile, symmetric), averaged over its 4 units with their loads and
#: loop bookkeeping, by (bits, dtype, groups end at unit ends). Measured with nvcc 13.0, fp16/bf16:
#: unit-aligned groups (g128, -1; the benchmark's case) 2-bit 12.6/12.8, 3-bit 21.8/22.4, 4-bit
#: 14.8/16.6, 8-bit 17.6/27.9; groups ending mid-unit (a test per step) 16.6/17.3, 25.8/26.5,
#: 17.9/19.7, 19.8/28.4. Ceilings are the earlier, larger figures of this kernel plus ~10%, so that
#: a change that adds work per weight fails here. Against the H200's issue rate (132 SMs x 4
#: schedulers x 1.98 GHz) the aligned fp16 figures are 11/19/13/15 us of issue for 8192x28672 at
#: M=1, against 14/21/28/56 us for its bytes at 4.3 TB/s (README, "What never ran").
STEP_CEILING = {
    (2, "f16", True): 15.0, (2, "bf16", True): 15.5, (3, "f16", True): 26.0, (3, "bf16", True): 27.0,
    (4, "f16", True): 18.0, (4, "bf16", True): 20.0, (8, "f16", True): 21.0, (8, "bf16", True): 32.5,
    (2, "f16", False): 23.5, (2, "bf16", False): 22.0, (3, "f16", False): 33.0, (3, "bf16", False): 32.5,
    (4, "f16", False): 27.0, (4, "bf16", False): 28.0, (8, "f16", False): 29.0, (8, "bf16", False): 39.0,
}


def test_sm90_decode_steps_are_lean(built, capsys):
    """In SASS for sm_90: the weights arrive by 16-byte loads that skip L1 (LDG.E.NA.128), the
    activations by 8-byte shared loads, one HMMA.16816 per step and row tile, no local memory,
    and the main loop stays under its instructions-per-step ceiling (printed with -s)."""
    obj_dir, _ = built
    lines = []
    for stem in KERNEL_FILES:
        for name, ins in _sass(obj_dir / f"{stem}_sm90.o").items():
            key = cuda_sass.gemv_id(name)
            if key is None:
                continue
            bits, dt, mt, zeros, aligned = key
            text = "\n".join(t for _, t in ins)
            assert "LDG.E.NA.128" in text, f"{name}: no 16-byte L1-bypassing weight loads"
            assert "LDS.64" in text, f"{name}: activations not read as 8-byte shared loads"
            assert "HMMA.16816.F32" in text, f"{name}: no m16n8k16 mma"
            assert not re.search(r"\b(LDL|STL)\b", text), f"{name}: local memory"
            mix, steps = cuda_sass.hot_step(ins, mt)
            per_step = sum(mix.values()) / steps
            lines.append(f"sm_90 b{bits} {dt} m{8 * mt} {'asym' if zeros else 'sym '} "
                         f"{'unit-groups' if aligned else 'step-groups'}: {per_step:.1f} instructions per step "
                         f"of 8 weights a lane over {steps} unrolled steps ({dict(mix.most_common(5))})")
            if mt == 1 and not zeros:
                ceiling = STEP_CEILING[(bits, dt, aligned)]
                assert per_step <= ceiling, f"{name}: {per_step:.1f} instructions per step (> {ceiling}): {mix}"
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_kernel_kinds_match_the_header():
    header = (build.CSRC / "cuda_kernels.h").read_text()
    names = re.findall(r"^\s+k(\w+) = (\d+),", header[header.index("enum KernelKind"):], re.M)
    assert [int(v) for _, v in names] == sorted(KINDS.values())
    assert dict(zip(["MmaM8", "MmaM16", "DequantCublas"], [0, 1, 2])) == {n: int(v) for n, v in names}
