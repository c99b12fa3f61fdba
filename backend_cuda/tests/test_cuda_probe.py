"""Declared capabilities, the probe's reasons, the build's error handling and the ops' fake
implementations (CPU only)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gptq_core import DeviceInfo, LayerSpec, Registry, plan
from gptq_core.registry import get_registry
from gptq_backend_cuda import build, plugin
from gptq_backend_cuda.build import BuildError

H200 = DeviceInfo(type="cuda", index=0, kind="cuda", name="NVIDIA H200", compute_capability=(9, 0))
T4 = DeviceInfo(type="cuda", index=0, kind="cuda", name="Tesla T4", compute_capability=(7, 5))
V100 = DeviceInfo(type="cuda", index=0, kind="cuda", name="Tesla V100", compute_capability=(7, 0))
NO_CUDA_TORCH = torch.version.cuda is None


def cuda():
    return get_registry().get("cuda")


def test_registered_through_the_entry_point_between_marlin_and_triton():
    b = cuda()
    assert b.info.distribution == "gptq-backend-cuda"
    assert b.info.priority_for(H200) == 60
    assert get_registry().get("triton").info.priority_for(H200) < 60 < get_registry().get("marlin").info.priority_for(H200)
    assert b.info.capabilities.bits == (2, 3, 4, 8)
    assert b.info.capabilities.training is False and b.info.capabilities.compile is True


def test_cpu_and_old_gpus_are_not_served():
    assert cuda().reasons(DeviceInfo.of("cpu")) == ["runs on cuda devices, this is cpu"]
    assert cuda().reasons(V100) == ["requires compute capability >= 7.5, this GPU has 7.0"]


def test_backends_list_shows_cuda_unavailable_on_cpu_with_the_reason():
    from gptq_core.cli.backends import backend_rows

    row = next(r for r in backend_rows(DeviceInfo.of("cpu")) if r["name"] == "cuda")
    assert row["status"] == "unavailable"
    assert row["reasons"] == ["runs on cuda devices, this is cpu"]
    assert row["bits"] == [2, 3, 4, 8]


def test_backends_list_command_names_cuda():
    proc = subprocess.run([sys.executable, "-c", "import sys; from gptq_core.cli import main; sys.exit(main())",
                           "backends", "list"], capture_output=True, text=True, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.split()[:1] == ["cuda"]), None)
    assert proc.returncode == 0 and line is not None, proc.stdout + proc.stderr
    assert "gptq-backend-cuda" in line and "unavailable" in line and "runs on cuda devices, this is cpu" in line


@pytest.mark.parametrize(
    "spec,reason",
    [
        (LayerSpec(4, 20, 256, 64), "group size 20 is not a multiple of 16"),
        (LayerSpec(5, 128, 256, 64), "5-bit is not supported"),
        (LayerSpec(4, 128, 256, 64, act_dtype=torch.float32), "activation dtype float32"),
        (LayerSpec(4, 128, 256, 64, mode="training"), "no backward pass"),
    ],
)
def test_layers_the_kernels_cannot_serve_are_rejected_with_the_reason(spec, reason):
    reasons = cuda().reasons(H200, spec)
    assert any(reason in r for r in reasons), reasons


def test_awkward_shapes_and_every_bit_width_are_declared():
    for bits in (2, 3, 4, 8):
        for spec in (LayerSpec(bits, 48, 172, 32, sym=False, desc_act=True), LayerSpec(bits, -1, 256, 72)):
            assert not any("not supported" in r or "divisible" in r for r in cuda().reasons(H200, spec))


def test_arch_decisions():
    toolkit_13 = build.parse_arch_list("compute_75\ncompute_80\ncompute_86\ncompute_89\ncompute_90\ncompute_100")
    toolkit_12 = build.parse_arch_list("compute_50 compute_60 compute_70 compute_75 compute_80 compute_90")
    assert build.arch_problem((9, 0), torch.float16, toolkit_13) is None
    assert build.arch_problem((7, 5), torch.float16, toolkit_13) is None
    assert "bfloat16 activations need compute capability 8.0" in build.arch_problem((7, 5), torch.bfloat16, toolkit_13)
    assert "does not target compute capability 12.0" in build.arch_problem((12, 0), torch.float16, toolkit_12)
    # 6.0 and 7.0: listed by CUDA 12's nvcc, but the kernels need mma.sync m16n8k8 (sm_75).
    assert "need 7.5" in build.arch_problem((7, 0), torch.float16, toolkit_12)
    assert "need 7.5" in build.arch_problem((6, 0), None, None)


def test_this_machines_nvcc_is_asked_which_architectures_it_targets():
    archs = build.nvcc_archs()
    if build.nvcc_path() is None:
        assert archs is None
    else:
        assert archs and (9, 0) in archs and min(archs) >= (5, 0)


@pytest.mark.skipif(not NO_CUDA_TORCH, reason="checks the message of a CPU-only torch build")
def test_probe_reports_why_the_extension_cannot_be_built():
    reasons = plugin.gptq_probe(device=H200, spec=LayerSpec(4, 128, 256, 64))
    assert len(reasons) == 1 and reasons[0].startswith("extension not built:")
    assert "has no CUDA support" in reasons[0]
    with pytest.raises(BuildError, match="no CUDA support"):
        build.load()


@pytest.mark.skipif(not NO_CUDA_TORCH, reason="needs a torch build without CUDA")
def test_selector_falls_back_when_cuda_cannot_build():
    from gptq_backends.torch_ref import plugin as torch_plugin

    reg = Registry()
    reg.register(torch_plugin, name="torch", distribution="gptq-backends")
    reg.register(plugin, name="cuda", distribution="gptq-backend-cuda")
    chosen = plan(LayerSpec(3, 128, 256, 64), T4, registry=reg)
    assert [b.name for b in chosen.ranked] == ["torch"]
    assert chosen.rejected["cuda"][0].startswith("extension not built:")


@pytest.mark.skipif(not NO_CUDA_TORCH, reason="checks the message of a CPU-only torch build")
def test_build_command_fails_with_the_reason():
    proc = subprocess.run([sys.executable, "-m", "gptq_backend_cuda.build", "--arch", "7.5;9.0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "no CUDA support" in proc.stderr


def test_arch_parsing_flags_and_cache_key(monkeypatch, tmp_path):
    assert build.parse_archs("9.0;7.5,86") == [(7, 5), (8, 6), (9, 0)]
    assert build.arch_flags([(7, 5)]) == ["-gencode=arch=compute_75,code=sm_75"]
    with pytest.raises(BuildError, match="like 7.5"):
        build.parse_archs("turing")
    assert build.build_dir([(9, 0)], tmp_path / "ext") == tmp_path / "ext"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = build.build_dir([(7, 5), (9, 0)])
    assert folder.parent == tmp_path / "gptq-backend-cuda"
    assert "sm75_sm90" in folder.name and build.source_hash() in folder.name


def test_sources_ship_with_the_package():
    names = {p.name for p in build.sources()}
    assert {"cuda_b2.cu", "cuda_b3.cu", "cuda_b4.cu", "cuda_b8.cu", "cuda_ops.cpp"} <= names


def test_fake_implementations_give_shapes_without_a_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gptq_backend_cuda import ops

    with FakeTensorMode():
        x = torch.empty(5, 128, dtype=torch.bfloat16)
        qweight = torch.empty(4, 2, 32, 4, dtype=torch.int32)
        scales = torch.empty(1, 64, dtype=torch.float16)
        partials, counters = torch.empty(16), torch.empty(4, dtype=torch.int32)
        y = ops.gemm(x, qweight, None, scales, None, None, None, partials, counters, 4, -1, 64, 0, 2)
        w = ops.dequantize(qweight, None, scales, None, None, 4, -1, 128, 64, torch.bfloat16)
    assert y.shape == (5, 64) and y.dtype == torch.bfloat16
    assert w.shape == (64, 128) and w.dtype == torch.bfloat16


def test_the_op_traces_under_make_fx():
    from gptq_backend_cuda import ops

    def f(x, qweight, scales, partials, counters):
        return ops.gemm(x, qweight, None, scales, None, None, None, partials, counters, 4, 128, 64, 0, 2) * 2

    gm = torch.fx.experimental.proxy_tensor.make_fx(f, tracing_mode="fake")(
        torch.empty(3, 128, dtype=torch.float16), torch.empty(4, 2, 32, 4, dtype=torch.int32),
        torch.empty(1, 64, dtype=torch.float16), torch.empty(16), torch.empty(4, dtype=torch.int32))
    assert any("gptq_cuda.gemm" in str(n.target) for n in gm.graph.nodes)
