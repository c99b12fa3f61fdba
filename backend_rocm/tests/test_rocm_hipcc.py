"""The hipified sources against Debian's hipcc (``apt-get install -y hipcc``): the portable
units compile for gfx90a, and the others fail only at the sites ``portability`` names."""

from __future__ import annotations

import pytest

from gptq_backend_rocm import hip_build, portability

pytestmark = pytest.mark.skipif(
    hip_build.hipcc_path() is None,
    reason="hipcc not found: apt-get install -y hipcc (Debian 12: HIP 5.2, gfx targets up to gfx940)")

#: Targets Debian 12's hipcc 5.2 (clang 15 + rocm-device-libs 5.2) builds for: gfx942 is
#: unknown to it and gfx1100 has no device library there.
DEBIAN_ARCHS = ("gfx908", "gfx90a", "gfx940")


@pytest.fixture(scope="module")
def hipified(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hip")
    return {dist: hip_build.hipify_into(dist, folder) for dist in portability.SOURCES}


def test_hipify_writes_hip_units_in_the_build_folder(hipified, tmp_path):
    assert set(hipified["exllama"]) >= {"exllama_f16.cu", "exllama_dispatch.cu"}
    text = hipified["exllama"]["exllama_dispatch.cu"].read_text()
    assert "hipError_t" in text and "cudaError_t" not in text


@pytest.mark.parametrize("arch", DEBIAN_ARCHS)
def test_portable_unit_compiles(hipified, tmp_path, arch):
    done = hip_build.compile_unit(hipified["exllama"]["exllama_dispatch.cu"], arch, tmp_path / "d.o")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "d.o").stat().st_size > 0


def test_kernel_units_fail_only_at_the_named_sites(hipified, tmp_path):
    blockers = portability.unit_blockers("exllama")["exllama_f16.cu"]
    done = hip_build.compile_unit(hipified["exllama"]["exllama_f16.cu"], "gfx90a", tmp_path / "k.o",
                                  syntax_only=True)
    assert done.returncode != 0
    errors = hip_build.error_lines(done.stderr)
    named = {(s.file, s.what.split()[-1]) for s in blockers}
    assert errors, done.stderr[-2000:]
    # hipify inserts one include line at the top of gemm.cuh, so compare by the code on the line.
    for file, line in errors:
        hip_file = next(p for p in hipified["exllama"]["exllama_f16.cu"].parent.iterdir()
                        if p.name == file)
        code = hip_file.read_text().splitlines()[line - 1]
        assert any(what in code or ("asm" in code and "PTX" in str(s)) for f, what in named
                   for s in blockers if s.file.split(".")[0] in file), (file, line, code)
