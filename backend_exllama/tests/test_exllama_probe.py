"""Declared capabilities, the probe's reasons, the policy, the options and the build's error
handling (CPU only)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from gptq_core import DeviceInfo, LayerSpec, Registry, plan
from gptq_core.options import OptionsError
from gptq_core.registry import get_registry
from gptq_backend_exllama import build, plugin, policy, workspace
from gptq_backend_exllama.build import CSRC, BuildError
from gptq_backend_exllama.options import ExllamaOptions

FAKE_H200 = DeviceInfo(type="cuda", index=0, kind="cuda", name="NVIDIA H200", compute_capability=(9, 0))
FAKE_T4 = DeviceInfo(type="cuda", index=0, kind="cuda", name="Tesla T4", compute_capability=(7, 5))
NO_CUDA_TORCH = torch.version.cuda is None
CUDA13 = ((7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (12, 0))
CUDA12 = ((5, 0), (6, 0), (6, 1), (7, 0), (7, 5), (8, 0), (9, 0))


def exllama():
    return get_registry().get("exllama")


def test_registered_through_the_entry_point_between_marlin_and_triton():
    b = exllama()
    assert b.info.distribution == "gptq-backend-exllama"
    assert b.info.priority_for(FAKE_T4) == 80
    assert get_registry().get("marlin").info.priority_for(FAKE_H200) > 80
    assert b.info.capabilities.compile and not b.info.capabilities.training


def test_backends_list_shows_exllama_unavailable_on_cpu():
    from gptq_core.cli.backends import backend_rows

    row = next(r for r in backend_rows(DeviceInfo.of("cpu")) if r["name"] == "exllama")
    assert row["status"] == "unavailable"
    assert row["reasons"] == ["runs on cuda devices, this is cpu"]
    assert row["bits"] == [4]


@pytest.mark.parametrize("spec,reason", [
    (LayerSpec(3, 128, 256, 64), "3-bit is not supported"),
    (LayerSpec(8, 128, 256, 64), "8-bit is not supported"),
    (LayerSpec(4, 12, 256, 64), "group size 12 is not supported"),
    (LayerSpec(4, 128, 256, 70), "N=70 is not divisible by 4"),
    (LayerSpec(4, 128, 256, 64, act_dtype=torch.float32), "activation dtype float32"),
    (LayerSpec(4, 128, 256, 64, mode="training"), "no backward pass"),
])
def test_layers_it_cannot_serve_are_rejected_with_the_reason(spec, reason):
    reasons = exllama().reasons(FAKE_T4, spec)
    assert any(reason in r for r in reasons), reasons


def test_awkward_k_and_act_order_are_accepted_by_the_declaration():
    caps = plugin.CAPABILITIES
    assert caps.layer_reasons(LayerSpec(4, 48, 172, 32, desc_act=True, sym=False)) == []


def test_the_toolkit_decides_old_gpus():
    assert build.arch_problem((7, 5), CUDA13) is None
    msg = build.arch_problem((6, 1), CUDA13)
    assert "builds for compute capability >= 7.5 only" in msg and "CUDA 12" in msg
    assert build.arch_problem((6, 1), CUDA12) is None
    assert "need compute capability >= 6.0" in build.arch_problem((5, 2), CUDA12)
    assert build.arch_flags([(6, 1)], CUDA12) == ["-gencode=arch=compute_61,code=sm_61"]
    # Newer than the toolkit: PTX of the newest listed architecture below it.
    assert build.arch_flags([(9, 5)], CUDA12) == ["-gencode=arch=compute_90,code=compute_90"]


def test_toolkit_archs_come_from_nvcc():
    archs = build.toolkit_archs()
    if build.nvcc_path() is None:
        assert archs == ()
    else:
        assert (9, 0) in archs and all(a >= (5, 0) for a in archs)


@pytest.mark.skipif(not NO_CUDA_TORCH, reason="checks the message of a CPU-only torch build")
def test_probe_and_build_report_a_cpu_only_torch():
    reasons = plugin.gptq_probe(device=FAKE_T4, spec=LayerSpec(4, 128, 256, 64))
    assert len(reasons) == 1 and reasons[0].startswith("extension not built:")
    assert "has no CUDA support" in reasons[0]
    with pytest.raises(BuildError, match="no CUDA support"):
        build.load()
    proc = subprocess.run([sys.executable, "-m", "gptq_backend_exllama.build", "--arch", "7.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no CUDA support" in proc.stderr


@pytest.mark.skipif(not NO_CUDA_TORCH, reason="needs a torch build without CUDA")
def test_selector_falls_back_when_exllama_cannot_build():
    from gptq_backends.torch_ref import plugin as torch_plugin

    reg = Registry()
    reg.register(torch_plugin, name="torch", distribution="gptq-backends")
    reg.register(plugin, name="exllama", distribution="gptq-backend-exllama")
    chosen = plan(LayerSpec(4, 128, 256, 64), FAKE_T4, registry=reg)
    assert [b.name for b in chosen.ranked] == ["torch"]
    assert chosen.rejected["exllama"][0].startswith("extension not built:")


def test_kinds_match_the_header():
    header = (CSRC / "exllama.h").read_text()
    enum = dict(re.findall(r"k(Gemm|DequantCublas) = (\d)", header))
    assert policy.KINDS == {"exllama:gemm": int(enum["Gemm"]), "dequant+cublas": int(enum["DequantCublas"])}
    assert f"kRowsPerChunk = {policy.ROWS_PER_CHUNK};" in header
    assert f"kBlockN = kThreads * 4;" in header and "kThreads = 128;" in header
    assert policy.BLOCK_N == 128 * 4


@pytest.mark.parametrize("threshold,expected", [
    (32, "M<=32: exllama:gemm; M>32: dequant+cublas"),
    (0, "any M: dequant+cublas"),
])
def test_policy_routes(threshold, expected):
    p = policy.layer_policy(threshold)
    assert p.describe() == expected
    assert policy.kind_table(p)[-1] == (sys.maxsize, 1)
    assert policy.kernel_rows(p) == threshold


def test_default_thresholds_and_the_option():
    from gptq_core.testing import random_packed
    from gptq_backend_exllama.prepare import prepare

    packed = random_packed(4, 128, in_features=256, out_features=64)
    p16 = prepare(packed, torch.device("cpu"), torch.float16)
    assert p16.policy.paths((1, 16, 64)) == {1: "exllama:gemm", 16: "exllama:gemm", 64: "dequant+cublas"}
    pbf = prepare(packed, torch.device("cpu"), torch.bfloat16, ExllamaOptions(dequant_threshold=4))
    assert pbf.policy.path_for(4) == "exllama:gemm" and pbf.policy.path_for(5) == "dequant+cublas"
    floats, counters = workspace.needs(64, 32)
    assert p16.acc.numel() >= floats >= 32 * 64 and p16.counters.numel() >= counters


def test_options_are_typed_and_checked():
    assert ExllamaOptions.parse({"dequant_threshold": "16"}, "exllama").dequant_threshold == 16
    with pytest.raises(OptionsError, match="0..256"):
        ExllamaOptions.parse({"dequant_threshold": 999}, "exllama")
    with pytest.raises(OptionsError, match="like 7.5"):
        ExllamaOptions.parse({"archs": "turing"}, "exllama")
    with pytest.raises(OptionsError, match="has no option"):
        ExllamaOptions.parse({"dense_cache_mb": 1}, "exllama")
    assert all(row["env"] is None for row in ExllamaOptions.fields_table())


def test_fake_implementations_give_shapes_without_a_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gptq_backend_exllama import ops

    with FakeTensorMode():
        a = torch.empty(5, 172, dtype=torch.float16)
        q = torch.empty(22, 8, 4, dtype=torch.int32)
        sz = torch.empty(4, 8, 8, dtype=torch.float16)
        acc, counters = torch.empty(64, dtype=torch.float32), torch.empty(4, dtype=torch.int32)
        out = ops.gemm(a, q, sz, None, None, acc, counters, 48, 32, 0)
        w = ops.dequantize(q, sz.float(), 48, 32)
    assert out.shape == (5, 32) and out.dtype == torch.float16
    assert w.shape == (176, 32) and w.dtype == torch.bfloat16
