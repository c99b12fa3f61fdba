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
from gptq_backend_marlin.policy import KINDS
from gptq_core.sass import TORCH_NVCC_DEFINES, cuobjdump, kernels, opcode

import sass_tools

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA toolkit is not installed")


def _compile(path, out_dir, *extra):
    cmd = [NVCC, "-arch=sm_90", "-O3", "-std=c++17", *TORCH_NVCC_DEFINES, *extra, "--resource-usage",
           "-c", str(path), "-o", str(out_dir / (path.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return path.name, proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every .cu file compiled once for the tests of this module: (object folder, results)."""
    out = tmp_path_factory.mktemp("marlin_sm90")
    cu_files = [p for p in build.sources() if p.suffix == ".cu"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda p: _compile(p, out), cu_files))
    return out, results


def _sass(obj) -> str:
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found: the SASS checks need it")
    return subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, timeout=300).stdout


def test_cuda_sources_compile_for_sm90_without_spills(built):
    tmp_path, results = built
    for name, code, log in results:
        assert code == 0, f"{name} failed to compile:\n{log[-3000:]}"
        assert "warning" not in log.lower(), f"{name}:\n{log[-3000:]}"
        spills = re.findall(r"(\d+) bytes spill stores", log)
        assert all(s == "0" for s in spills), f"{name} spills registers:\n{log[-3000:]}"
        assert spills or name == "marlin_dispatch.cu", f"{name} has no kernels:\n{log[-3000:]}"
        # Variants of at most 2 row blocks must keep two blocks (8 warps each) per SM: <= 128
        # registers (v3's finalizer raised them above that until __launch_bounds__ capped it).
        for kernel, regs in re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", log, re.S):
            gemm = sass_tools.gemm_id(kernel)
            if gemm and gemm[2] <= 2:
                assert int(regs) <= 128, f"{name}: {kernel} uses {regs} registers (> 128: one block per SM)"
    assert len(results) == 6  # dispatch, 4 gemm variants, the act-order gather
    # ptxas 13.0 once gave a cp.async cache-policy descriptor an odd uniform register pair
    # (desc[UR1]): an illegal instruction on the H100. Every descriptor must be even.
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found: compiled, but the SASS descriptor check was skipped")
    for obj in tmp_path.glob("*.o"):
        sass = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, timeout=300).stdout
        odd = [ln.strip() for ln in sass.splitlines()
               if (m := re.search(r"desc\[UR(\d+)\]", ln)) and int(m.group(1)) % 2]
        assert not odd, f"{obj.name}: odd uniform descriptor registers: {odd[:3]}"
        if obj.stem == "marlin_gather":
            # The gather's 8 columns x 4 rows of 2-byte loads must all be issued before the
            # first branch or store (one L2 round trip per thread, not 32).
            bodies = re.split(r"\n\s*Function : ", sass)[1:]
            assert len(bodies) == 2, f"expected the int32 and int64 gather kernels, got {len(bodies)}"
            for body in bodies:
                seg = body[body.find("LDG.E.U16"):]
                stop = min((i for i in (seg.find("BRA"), seg.find("STG")) if i >= 0), default=len(seg))
                assert seg[:stop].count("LDG.E.U16") >= 32, f"{body.split()[0]}: gathered loads not batched"


FOUR_BIT_FILES = ("marlin_f16_b4", "marlin_bf16_b4")
EIGHT_BIT_FILES = ("marlin_f16_b8", "marlin_bf16_b8")
KIND = {path.removeprefix("marlin:"): kind for path, kind in KINDS.items() if path.startswith("marlin:")}


def _entries(log: str, kind: int) -> list[tuple[str, str, int]]:
    """(mangled name, ptxas properties, registers) of the file's gemm kernels of one kind."""
    found = re.findall(r"Compiling entry function '(\w+)'(.*?)Used (\d+) registers", log, re.S)
    return [(k, info, int(regs)) for k, info, regs in found
            if (g := sass_tools.gemm_id(k)) is not None and g[4] == kind]


def _no_local_memory(stem: str, entries) -> None:
    for kernel, info, _ in entries:
        assert re.search(r"\b0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads", info), \
            f"{stem}: {kernel} uses local memory:{info}"


def _gemms(obj) -> dict[tuple, list]:
    """The file's gemm kernels' SASS by (bits, dtype, row blocks, zero points, kind)."""
    return {sass_tools.gemm_id(n): ins for n, ins in kernels(_sass(obj)).items()
            if sass_tools.gemm_id(n) is not None}


def test_only_the_reachable_kernels_are_built(built):
    """The instantiations are the rows of kernels.h at the row blocks each serves: per 4-bit
    file 8 narrow (64-row stages), 8 wide (128-row), 4 wide4 (256-row) and 4 swapped-mma (1-4 /
    1-4 / 1-2 / 1 row blocks x sym/asym); per 8-bit file 4 narrow and 4 bulk-copy (TMA) ones
    (1-2 row blocks x sym/asym): 64. No scale-fold and no 4-bit TMA kernels (measured slower,
    removed: NOTES/perf-marlin.md "Variants removed")."""
    _, results = built
    logs = {name.removesuffix(".cu"): log for name, _, log in results}
    expected = {4: {"narrow": 8, "wide": 8, "wide4": 4, "wide-swap": 2, "wide4-swap": 2},
                8: {"narrow": 4, "tma": 4}}
    total = 0
    for stem in FOUR_BIT_FILES + EIGHT_BIT_FILES:
        bits = 4 if stem in FOUR_BIT_FILES else 8
        counts = {name: len(_entries(logs[stem], kind)) for name, kind in KIND.items()}
        assert {k: v for k, v in counts.items() if v} == expected[bits], f"{stem}: {counts}"
        total += sum(counts.values())
    assert total == 64


# ------------------------------------------------------------------------------------------
# The bulk-copy (TMA) kernels: the default for 8-bit weights in one slice on compute
# capability >= 9.0 (NOTES/perf-marlin.md).


def test_tma_kernels_move_every_stage_by_bulk_copies_without_local_memory(built):
    """Every 8-bit file has its TMA kernels (1..2 row blocks x sym/asym), each without a stack
    frame; they copy only with bulk copies (UBLKCP, no per-thread LDGSTS), wait on an mbarrier
    phase (SYNCS.PHASECHK) instead of a cp.async group, and announce bytes with
    arrive.expect_tx. The weights' copy keeps the evict-first policy."""
    obj_dir, results = built
    logs = {name.removesuffix(".cu"): log for name, _, log in results}
    for stem in EIGHT_BIT_FILES:
        entries = _entries(logs[stem], KIND["tma"])
        assert len(entries) == 4, f"{stem}: {len(entries)} TMA kernels"
        _no_local_memory(stem, entries)
        for key, ins in _gemms(obj_dir / f"{stem}.o").items():
            if key[4] != KIND["tma"]:
                continue
            ops = [opcode(t) for _, t in ins]
            assert "LDGSTS" not in ops and "DEPBAR" not in ops, f"{stem}: {key} still uses cp.async"
            assert ops.count("UBLKCP") >= 3, f"{stem}: {key} has {ops.count('UBLKCP')} bulk copies"
            assert any("SYNCS.PHASECHK" in t for _, t in ins), f"{stem}: {key} never waits on an mbarrier"
            assert any("SYNCS.ARRIVE.TRANS64" in t for _, t in ins), f"{stem}: {key} never announces bytes"
            assert any("UBLKCP" in t and "desc[" in t for _, t in ins), \
                f"{stem}: {key}: no bulk copy carries the L2 cache policy"


def test_wide_kernels_pay_the_stage_overhead_once_per_128_rows(built):
    """The wide kernels (4-bit, 1-4 row blocks x sym/asym; the 256-row ones at 1-2) exist
    without local memory; one iteration of their main loop runs two 64-row tiles (twice the
    HMMAs of the narrow kernel's) and issues fewer instructions per 64 rows than the narrow one
    (measured: 250 against 292 at one row block, fp16 sym, nvcc 13.0; 352 against 390 at four,
    asym)."""
    obj_dir, results = built
    logs = {name.removesuffix(".cu"): log for name, _, log in results}
    for stem in FOUR_BIT_FILES:
        entries = _entries(logs[stem], KIND["wide"]) + _entries(logs[stem], KIND["wide4"])
        assert len(entries) == 8 + 4, f"{stem}: {len(entries)} wide kernels (128-row: 8, 256-row: 4)"
        _no_local_memory(stem, entries)
        ks = _gemms(obj_dir / f"{stem}.o")
        for key, ins in ks.items():
            if key[4] != KIND["wide"]:
                continue
            hot = sass_tools.hot_path(ins)
            base = sass_tools.hot_path(ks[(*key[:4], KIND["narrow"])])
            assert hot["HMMA"] == 2 * base["HMMA"], f"{stem}: {key}: {hot['HMMA']} HMMA per iteration"
            assert sum(hot.values()) / 2 < 0.95 * sum(base.values()), \
                f"{stem}: {key}: {sum(hot.values()) / 2:.0f} instructions per 64 rows, narrow {sum(base.values())}"


def test_swapped_mma_kernels_halve_the_mmas(built):
    """The swapped-mma kernels (weights as the A operand, M <= 8: 128- and 256-row stages x
    sym/asym, one row block, 4-bit only) exist without local memory, within 128 registers, and
    issue half the HMMAs of the same pipeline without the swap, and fewer instructions in all."""
    obj_dir, results = built
    logs = {name.removesuffix(".cu"): log for name, _, log in results}
    plain = {KIND["wide-swap"]: KIND["wide"], KIND["wide4-swap"]: KIND["wide4"]}
    for stem in FOUR_BIT_FILES:
        entries = _entries(logs[stem], KIND["wide-swap"]) + _entries(logs[stem], KIND["wide4-swap"])
        assert len(entries) == 4, f"{stem}: {len(entries)} swapped-mma kernels"
        _no_local_memory(stem, entries)
        assert all(regs <= 128 for _, _, regs in entries), f"{stem}: {entries}"
        ks = _gemms(obj_dir / f"{stem}.o")
        for key, ins in ks.items():
            if key[4] not in plain:
                continue
            hot = sass_tools.hot_path(ins)
            base = sass_tools.hot_path(ks[(*key[:4], plain[key[4]])])
            assert 2 * hot["HMMA"] == base["HMMA"], f"{stem}: {key}: {hot['HMMA']} HMMA vs {base['HMMA']}"
            assert sum(hot.values()) < sum(base.values()), f"{stem}: {key}: no fewer instructions"
