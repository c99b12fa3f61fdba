"""gptq-backend-exllama's kernels, hipified as the rocm backend's build does, against Debian's
hipcc (``apt-get install -y hipcc``): every unit compiles for every gfx target that toolchain
knows, the code objects hold every kernel without spills, the AMD code is the one portable.cuh
chose (packed fp16 FMAs, streaming loads, hardware float atomics), and the host side links
into a library that loads. No GPU is used: nothing here runs a kernel.
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from gptq_backend_rocm import code_object, hip_build

pytestmark = pytest.mark.skipif(
    hip_build.hipcc_path() is None,
    reason="hipcc not found: apt-get install -y hipcc (Debian 12: HIP 5.2, gfx targets up to gfx940)")

#: Targets Debian 12's hipcc 5.2 (clang 15 + rocm-device-libs 5.2) builds for: CDNA1, CDNA2,
#: CDNA3 (gfx940: gfx942 is unknown to clang 15) and RDNA2 (gfx1100 has no device library there).
DEBIAN_ARCHS = ("gfx908", "gfx90a", "gfx940", "gfx1030")
UNITS = ("exllama_f16.cu", "exllama_bf16.cu", "exllama_dispatch.cu")
#: The unit that is also compiled whole (host + device) and linked, for this target.
LINK_ARCH = "gfx90a"
#: How each target spells a nontemporal load's cache bits, and the L1 invalidate of an acquire
#: at device scope (LLVM's AMDGPU memory model).
NONTEMPORAL = {"gfx90a": "glc slc", "gfx940": " nt"}
ACQUIRE = {"gfx90a": "buffer_wbinvl1_vol", "gfx940": "buffer_inv"}
#: gemm_kernel<DT, ROWS, STREAM> as clang mangles it.
GEMM = re.compile(r"gemm_kernelILi(\d)ELi(\d)ELb(\d)E")


def _expected(dt: int) -> set[str]:
    """The kernels one dtype's unit instantiates: 8 streaming row counts, the re-reading 8-row
    kernel and the dequantize kernel (csrc/gemm.cuh gemm_fn, select_gemm, dequant_t)."""
    gemm = {f"_ZN12gptq_exllama11gemm_kernelILi{dt}ELi{r}ELb1EEEvNS_8GemmArgsE" for r in range(1, 9)}
    return gemm | {f"_ZN12gptq_exllama11gemm_kernelILi{dt}ELi8ELb0EEEvNS_8GemmArgsE",
                   f"_ZN12gptq_exllama14dequant_kernelILi{dt}EEEvNS_11DequantArgsE"}


@pytest.fixture(scope="module")
def hipified(tmp_path_factory):
    return hip_build.hipify_into("exllama", tmp_path_factory.mktemp("hip"))


@pytest.fixture(scope="module")
def built(hipified, tmp_path_factory):
    """Every unit compiled once per target (device code objects) and once whole for
    LINK_ARCH, two at a time: {(unit, arch or "host"): (hipcc's result, output)}."""
    out = tmp_path_factory.mktemp("objs")
    jobs = [(u, a) for u in UNITS for a in DEBIAN_ARCHS] + [(u, "host") for u in UNITS]

    def run(job):
        unit, arch = job
        path = out / f"{unit.split('.')[0]}.{arch}.o"
        done = hip_build.compile_unit(hipified[unit], LINK_ARCH if arch == "host" else arch, path,
                                      device_only=arch != "host")
        return job, (done, path)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, jobs))


def test_hipify_leaves_only_what_is_compiled(hipified):
    assert set(hipified) == {*UNITS, "exllama_ops.cpp"}
    folder = hipified["exllama_f16.cu"].parent
    assert not list(folder.glob("*.cu")) and not (folder / "gemm.cuh").exists()
    text = hipified["exllama_dispatch.cu"].read_text()
    assert "hipError_t" in text and "cudaError_t" not in text
    # hip_clang_launch: the launches stay <<<...>>> (hipLaunchKernelGGL misreads select_gemm's).
    assert "<<<grid, kThreads, 0, stream>>>" in (folder / "gemm_hip.cuh").read_text()


@pytest.mark.parametrize("arch", DEBIAN_ARCHS)
@pytest.mark.parametrize("unit", UNITS)
def test_unit_compiles(built, unit, arch):
    done, path = built[(unit, arch)]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning" not in done.stderr.lower(), done.stderr[-3000:]
    assert path.stat().st_size > 0


@pytest.mark.parametrize("arch", DEBIAN_ARCHS)
def test_code_objects_hold_every_kernel_without_spills(built, arch):
    for unit, dt in (("exllama_f16.cu", 0), ("exllama_bf16.cu", 1)):
        kernels = code_object.kernels(built[(unit, arch)][1])
        assert {k.name for k in kernels} == _expected(dt), unit
        for k in kernels:
            assert (k.vgpr_spills, k.sgpr_spills, k.scratch_bytes) == (0, 0, 0), (arch, k)
            # RDNA (gfx10+) compiles wave32 by default, CDNA wave64: no code here depends on it.
            assert k.wavefront == (32 if arch.startswith("gfx10") else 64)
            m = GEMM.search(k.name)
            assert k.max_workgroup == (128 if m else 256)
            if m:  # ROWS x 256 staged activations (half2 or fp32) + the split-K flag
                assert k.lds_bytes == int(m.group(2)) * 256 * 4 + 4
    assert code_object.kernels(built[("exllama_dispatch.cu", arch)][1]) == []


@pytest.mark.parametrize("arch", ["gfx90a", "gfx940"])
def test_fp16_kernels_decode_with_packed_fmas(built, arch):
    """The AMD branch of qdq4.cuh: two weights per v_pk_add_f16 to decode (the exact ``x - X0``;
    two step bodies of 40 words x 4 pairs: 80), one v_pk_fma_f16 per two weights and row for the
    dot product (80 x ROWS), as the HADD2s and HFMA2s on NVIDIA, and the group's two
    v_pk_mul_f16 of the scale split; the streaming kernels load their weights nontemporal (glc slc), the
    re-reading one does not; split-K adds with the hardware float atomic, not a CAS loop; and the
    last block's acquire (__threadfence) invalidates L1 before it reads the workspace."""
    co = built[("exllama_f16.cu", arch)][1]
    counts = code_object.instruction_counts(co, arch)
    gemms = {n: ops for n, ops in counts.items() if GEMM.search(n)}
    assert len(gemms) == 9
    for name, ops in gemms.items():
        _, rows, stream = (int(g) for g in GEMM.search(name).groups())
        assert ops["v_pk_add_f16"] == 80 and ops["v_pk_fma_f16"] == 80 * rows, (name, ops)
        assert ops["v_pk_mul_f16"] == 2, (name, ops["v_pk_mul_f16"])
        assert ops["global_atomic_add_f32"] == 4 * rows and ops["global_atomic_cmpswap"] == 0, name
        assert not any(op.startswith("scratch_") or op.startswith("buffer_store") for op in ops), name
        lines = code_object.instruction_lines(co, arch, name)
        streamed = [ln for ln in lines if ln.startswith("global_load_dwordx4") and ln.endswith(NONTEMPORAL[arch])]
        assert (len(streamed) >= 5) if stream else not streamed, (name, len(streamed))
        assert ACQUIRE[arch] in ops, name


def test_host_side_links_and_loads(built, tmp_path):
    """The kernel units compiled whole (launches, occupancy queries) link against HIP's runtime
    with no undefined symbol, and the library loads here: its occupancy query reaches the
    runtime, which answers with an error since there is no AMD GPU."""
    objects = []
    for unit in UNITS:
        done, path = built[(unit, "host")]
        assert done.returncode == 0, done.stderr[-3000:]
        objects.append(path)
    lib = tmp_path / "libgptq_exllama_hip.so"
    done = hip_build.link_shared(objects, lib, LINK_ARCH)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = (
        "import ctypes, sys\n"
        f"lib = ctypes.CDLL({str(lib)!r})\n"
        "n = ctypes.c_int(-1)\n"
        "rc = lib._ZN12gptq_exllama14gemm_occupancyEiibPi(0, 1, True, ctypes.byref(n))\n"
        "print(rc, n.value)\n")
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    rc, blocks = map(int, ran.stdout.split())
    assert rc != 0 and blocks == -1  # hipErrorNoDevice / hipErrorInvalidDevice: nothing ran


def test_a_build_leaves_nothing_in_the_temporary_folder(hipified, tmp_path, monkeypatch):
    """hipcc's clang leaves an empty folder per unit in TMPDIR; each call gets its own,
    removed afterwards, so builds do not pile up folders in /tmp."""
    import tempfile

    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    done = hip_build.compile_unit(hipified["exllama_dispatch.cu"], LINK_ARCH, tmp_path / "d.o")
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(scratch.iterdir()) == []
