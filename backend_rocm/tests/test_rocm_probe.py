"""Registration, the probe's reasons, the portability scan, the options and the JIT build's
staging (CPU only, real sources, the real torch hipify)."""

from __future__ import annotations

import os

import pytest
import torch

from gptq_backend_exllama import build as exllama_build
from gptq_backend_exllama import plugin as exllama_plugin
from gptq_core import DeviceInfo
from gptq_core.options import OptionsError
from gptq_core.registry import get_registry
from gptq_core.spec import LayerSpec
from gptq_core.testing import random_packed
from gptq_backend_rocm import build, plugin, portability, probe
from gptq_backend_rocm.options import RocmOptions

FAKE_MI300 = DeviceInfo(type="cuda", index=0, kind="rocm", name="AMD Instinct MI300X", is_hip=True)
CPU_TORCH = torch.version.hip is None


def test_registered_below_triton_on_rocm_with_exllamas_capabilities():
    rocm, triton = get_registry().get("rocm"), get_registry().get("triton")
    assert rocm.info.distribution == "gptq-backend-rocm"
    assert rocm.info.priority_for(FAKE_MI300) == 30 < triton.info.priority_for(FAKE_MI300)
    caps, exl = rocm.info.capabilities, exllama_plugin.CAPABILITIES
    assert caps.device_kinds == {"rocm"} and caps.bits == (4,) and caps.min_compute_capability is None
    assert (caps.group_sizes, caps.act_dtypes, caps.desc_act, caps.n_multiple) == \
        (exl.group_sizes, exl.act_dtypes, exl.desc_act, exl.n_multiple)
    # The call is exllama's own function, not a copy or a wrapper.
    assert rocm.qmatmul is exllama_plugin.gptq_qmatmul


def test_cpu_rejected_by_kind_and_cpu_torch_by_probe():
    rocm = get_registry().get("rocm")
    cpu = DeviceInfo(type="cpu", index=None, kind="cpu", name="cpu")
    assert rocm.reasons(cpu) == ["runs on rocm devices, this is cpu"]
    if CPU_TORCH:
        (reason,) = plugin.gptq_probe(FAKE_MI300, None)
        assert "has no HIP support" in reason and torch.__version__ in reason
        spec = LayerSpec(bits=4, group_size=128, in_features=256, out_features=64)
        assert rocm.reasons(FAKE_MI300, spec) == [reason]


def test_other_widths_are_rejected_by_the_declared_capabilities():
    rocm = get_registry().get("rocm")
    spec = LayerSpec(bits=3, group_size=128, in_features=256, out_features=64)
    assert any("3-bit" in r for r in rocm.reasons(FAKE_MI300, spec))


def test_scan_reports_exllama_portable_and_the_cuda_sites():
    assert portability.scan("exllama") == []
    assert all(v == [] for v in portability.unit_blockers("exllama").values())
    assert portability.reason("exllama") is None
    guarded = [str(s) for s in portability.guarded("exllama")]
    assert any(s.startswith("qdq4.cuh:") and "lop3.b32" in s for s in guarded)
    assert sum("__ldcs" in s or "__ldcg" in s or "__stcg" in s for s in guarded) == 3
    cuda = [str(s) for s in portability.scan("cuda")]
    assert sum("mma.sync" in s for s in cuda) == 4
    assert any("cuda_bf16.h" in s for s in cuda)
    assert all(v for k, v in portability.unit_blockers("cuda").items() if k.endswith(".cu"))
    # Every asm( of the sources (comments aside) is either guarded or reported.
    for dist in portability.SOURCES:
        code = [portability.strip_comments(p.read_text()) for p in portability.csrc(dist).iterdir()]
        text_asm = sum(t.count("asm(") + t.count("asm volatile(") for t in code)
        found = portability.scan(dist) + portability.guarded(dist)
        assert text_asm == sum("inline PTX" in str(s) for s in found)


SNIPPET = """\
#include "portable.cuh"
// asm("lop3.b32 in a comment");
__device__ uint32_t a(uint32_t x) {
#if GPTQ_HIP
  return x;
#else
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(x) : "r"(x), "r"(x), "r"(x));
  return x;
#endif
}
__device__ float4 b(const float4* p) {
#ifndef __HIP_PLATFORM_AMD__
  return __ldcg(p);
#else
  return *p;
#endif
}
__device__ float4 c(const float4* p) { return __ldcs(p); }
#if defined(__HIP_PLATFORM_AMD__) || defined(USE_ROCM)
#elif __CUDA_ARCH__ >= 900
__device__ void d(float* p) { asm("red.global.add.f32 [%0], 1.0;" :: "l"(p)); }
#endif
#if __CUDA_ARCH__ >= 800
__device__ void e(float* p) { asm("cp.async.wait_all;"); }
#endif
"""


def test_scan_tells_guarded_from_blocking_sites():
    blocking = [str(s) for s in portability.scan_text("k.cuh", SNIPPET)]
    guarded = [str(s) for s in portability.guarded_text("k.cuh", SNIPPET)]
    assert blocking == ["k.cuh:18 cache-hint intrinsic __ldcs", "k.cuh:24 inline PTX cp.async.wait_all"]
    assert guarded == ["k.cuh:7 inline PTX lop3.b32", "k.cuh:13 cache-hint intrinsic __ldcg",
                       "k.cuh:21 inline PTX red.global.add.f32"]


@pytest.mark.parametrize("expr,kind", [
    ("GPTQ_HIP", "hip"), ("!GPTQ_HIP", "nvidia"), ("defined(USE_ROCM)", "hip"),
    ("!defined(__HIP_PLATFORM_AMD__)", "nvidia"),
    ("!(defined(__HIP_PLATFORM_AMD__) || defined(USE_ROCM))", "nvidia"),
    ("!GPTQ_HIP || FOO", "either"), ("GPTQ_HIP && FOO", "either"), ("__CUDA_ARCH__ >= 900", "either"),
])
def test_guard_expressions(expr, kind):
    assert portability.regions(f"#if {expr}\nx\n#endif\n")[1] == kind


def test_reasons_name_file_and_line():
    (reason,) = plugin.kernel_problems()
    assert reason.startswith("the cuda kernels are not portable") and "common.cuh:5 cuda_bf16.h" in reason
    assert "GPTQ_HIP" in reason


def test_options_are_checked_once():
    assert RocmOptions.parse({"archs": "gfx942, gfx90a"}, "rocm").archs == "gfx942, gfx90a"
    with pytest.raises(OptionsError, match="gfx803 is not one the kernels are built for"):
        RocmOptions.parse({"archs": "gfx803"}, "rocm")
    with pytest.raises(OptionsError, match="rocm option dequant_threshold=999"):
        RocmOptions.parse({"dequant_threshold": "999"}, "rocm")
    assert RocmOptions(dequant_threshold=4).exllama().dequant_threshold == 4


def test_options_reach_exllamas_prepare():
    """The rocm plugin prepares with exllama's code: the threshold becomes the layer's policy."""
    from gptq_backend_exllama.prepare import prepare  # noqa: PLC0415

    w = random_packed(4, 64, in_features=128, out_features=32, seed=1)
    p = prepare(w, torch.device("cpu"), torch.float16, RocmOptions(dequant_threshold=4).exllama())
    assert p.policy.describe() == "M<=4: exllama:gemm; M>4: dequant+cublas"


@pytest.mark.skipif(not CPU_TORCH, reason="needs a torch without HIP")
def test_cpu_torch_build_and_pack_fail_with_the_reason():
    assert "install a ROCm build of torch" in probe.torch_problem()
    with pytest.raises(build.BuildError, match="has no HIP support"):
        build.load(archs="gfx90a")
    w = random_packed(4, 128, in_features=256, out_features=64)
    with pytest.raises(build.BuildError, match="has no HIP support"):
        plugin.gptq_pack(w, FAKE_MI300, LayerSpec.of(w), RocmOptions())
    assert "has no HIP support" in build.failure()


def test_staging_hipifies_exllama_outside_the_build_folder(tmp_path):
    folder = build.stage(tmp_path / "ext")
    try:
        assert folder == tmp_path / "ext" / "hipified" / "exllama"
        names = {p.name for p in build.EXTENSION.sources()}
        assert names == {"exllama_f16.hip", "exllama_bf16.hip", "exllama_dispatch.hip", "exllama_ops_hip.cpp"}
        assert build.EXTENSION.include_dirs()[0] == folder
        assert build.EXTENSION.source_hash() != exllama_build.source_hash()
        key = build.EXTENSION.build_dir(("hip6.4", "gfx90a"))
        assert key.name.endswith(build.EXTENSION.source_hash()) and "gfx90a" in key.name
        # torch's extension builder hipifies its sources again on a ROCm torch (this call, with
        # the build folder as project): files marked as hipify output are left as they are.
        from torch.utils.hipify import hipify_python  # noqa: PLC0415

        before = {p: p.read_bytes() for p in folder.iterdir()}
        out = tmp_path / "ext" / "build"
        out.mkdir()
        result = hipify_python.hipify(
            project_directory=str(out), output_directory=str(out),
            header_include_dirs=[str(d) for d in build.EXTENSION.include_dirs()],
            extra_files=[os.path.abspath(s) for s in build.EXTENSION.sources()],
            show_detailed=False, show_progress=False, is_pytorch_extension=True)
        assert all(result[os.path.abspath(s)].hipified_path is None for s in build.EXTENSION.sources())
        assert {p: p.read_bytes() for p in folder.iterdir()} == before and not any(out.iterdir())
    finally:
        build.EXTENSION.stage.folder = None
