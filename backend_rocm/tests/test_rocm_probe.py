"""Registration, the probe's reasons and the portability scan (CPU only, real sources)."""

from __future__ import annotations

import pytest
import torch

from gptq_core import DeviceInfo
from gptq_core.registry import get_registry
from gptq_backend_rocm import plugin, portability, probe

FAKE_MI300 = DeviceInfo(type="cuda", index=0, kind="rocm", name="AMD Instinct MI300X", is_hip=True)


def test_registered_below_triton_on_rocm():
    rocm, triton = get_registry().get("rocm"), get_registry().get("triton")
    assert rocm.info.distribution == "gptq-backend-rocm"
    assert rocm.info.priority_for(FAKE_MI300) == 30 < triton.info.priority_for(FAKE_MI300)


def test_cpu_rejected_by_kind_and_cpu_torch_by_probe():
    rocm = get_registry().get("rocm")
    cpu = DeviceInfo(type="cpu", index=None, kind="cpu", name="cpu")
    assert rocm.reasons(cpu) == ["runs on rocm devices, this is cpu"]
    if torch.version.hip is None:
        (reason,) = plugin.gptq_probe(FAKE_MI300, None)
        assert "has no HIP support" in reason and torch.__version__ in reason


def test_scan_finds_every_ptx_site_of_the_shipped_sources():
    exl = [str(s) for s in portability.scan("exllama")]
    assert any(s.startswith("qdq4.cuh:") and "lop3.b32" in s for s in exl)
    assert any("__ldcs" in s for s in exl)
    cuda = [str(s) for s in portability.scan("cuda")]
    assert sum("mma.sync" in s for s in cuda) == 4
    assert any("cuda_bf16.h" in s for s in cuda)
    # Every asm( of the sources is reported (comments aside).
    for dist in portability.SOURCES:
        text_asm = sum(line.count("asm(") + line.count("asm volatile(")
                       for p in portability.csrc(dist).iterdir()
                       for line in p.read_text().splitlines() if not line.lstrip().startswith("//"))
        assert text_asm == sum("inline PTX" in str(s) for s in portability.scan(dist))


def test_host_units_are_portable_kernel_units_are_not():
    units = portability.unit_blockers("exllama")
    assert units["exllama_dispatch.cu"] == [] and units["exllama_f16.cu"]
    assert all(v for k, v in portability.unit_blockers("cuda").items() if k.endswith(".cu"))


def test_reasons_name_file_and_line():
    reasons = plugin.kernel_problems()
    assert len(reasons) == 2 and all("__HIP_PLATFORM_AMD__" in r for r in reasons)
    assert "qdq4.cuh:26 inline PTX lop3.b32" in reasons[0]


def test_pack_fails_with_the_reason():
    with pytest.raises(plugin.NotPortableError, match="HIP"):
        plugin.gptq_pack(None, FAKE_MI300, None)


@pytest.mark.skipif(torch.version.hip is not None, reason="needs a torch without HIP")
def test_torch_problem_on_cpu_torch():
    assert "install a ROCm build of torch" in probe.torch_problem()
