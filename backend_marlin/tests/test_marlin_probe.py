"""Declared capabilities, the probe's reasons and the build's error handling (CPU only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gptq_core import DeviceInfo, LayerSpec, Registry, plan
from gptq_core.registry import get_registry
from gptq_backend_marlin import build, plugin
from gptq_backend_marlin.build import BuildError

FAKE_H100 = DeviceInfo(type="cuda", index=0, kind="cuda", name="NVIDIA H100 80GB HBM3",
                       compute_capability=(9, 0))
FAKE_T4 = DeviceInfo(type="cuda", index=0, kind="cuda", name="Tesla T4", compute_capability=(7, 5))
NO_CUDA_TORCH = torch.version.cuda is None


def marlin():
    return get_registry().get("marlin")


def test_registered_through_the_entry_point_with_its_priority():
    b = marlin()
    assert b.info.distribution == "gptq-backend-marlin"
    assert b.info.priority_for(FAKE_H100) == 100
    assert b.info.capabilities.training is True


def test_cpu_is_not_served():
    assert marlin().reasons(DeviceInfo.of("cpu")) == ["runs on cuda devices, this is cpu"]


def test_old_gpus_are_not_served():
    assert marlin().reasons(FAKE_T4) == ["requires compute capability >= 8.0, this GPU has 7.5"]


@pytest.mark.parametrize(
    "spec,reason",
    [
        (LayerSpec(4, 128, 172, 64), "K=172 is not divisible by 64"),
        (LayerSpec(4, 128, 256, 72), "N=72 is not divisible by 32"),
        (LayerSpec(3, 128, 256, 64), "3-bit is not supported"),
        (LayerSpec(4, 48, 256, 64), "group size 48 is not supported"),
        (LayerSpec(4, 128, 256, 64, act_dtype=torch.float32), "activation dtype float32"),
    ],
)
def test_layers_the_tiles_cannot_serve_are_rejected_with_the_reason(spec, reason):
    reasons = marlin().reasons(FAKE_H100, spec)
    assert any(reason in r for r in reasons), reasons


@pytest.mark.skipif(not NO_CUDA_TORCH, reason="checks the message of a CPU-only torch build")
def test_probe_reports_why_the_extension_cannot_be_built():
    reasons = plugin.gptq_probe(device=FAKE_H100, spec=LayerSpec(4, 128, 256, 64))
    assert len(reasons) == 1 and reasons[0].startswith("extension not built:")
    assert "has no CUDA support" in reasons[0]
    with pytest.raises(BuildError, match="no CUDA support"):
        build.load()


@pytest.mark.skipif(not NO_CUDA_TORCH, reason="needs a torch build without CUDA")
def test_selector_falls_back_when_marlin_cannot_build():
    from gptq_backends.torch_ref import plugin as torch_plugin

    reg = Registry()
    reg.register(torch_plugin, name="torch", distribution="gptq-backends")
    reg.register(plugin, name="marlin", distribution="gptq-backend-marlin")
    chosen = plan(LayerSpec(4, 128, 256, 64), FAKE_H100, registry=reg)
    assert [b.name for b in chosen.ranked] == ["torch"]
    assert chosen.rejected["marlin"][0].startswith("extension not built:")
    assert "rejected: marlin: extension not built" in chosen.explain()


def test_backends_list_shows_marlin_unavailable_on_cpu():
    from gptq_core.cli.backends import backend_rows

    row = next(r for r in backend_rows(DeviceInfo.of("cpu")) if r["name"] == "marlin")
    assert row["status"] == "unavailable"
    assert row["reasons"] == ["runs on cuda devices, this is cpu"]
    assert row["bits"] == [4, 8] and row["group_sizes"] == [-1, 32, 64, 128, 256]


def test_8bit_is_declared():
    assert not any("bit" in r for r in marlin().reasons(FAKE_H100, LayerSpec(8, 128, 256, 64)))


def test_arch_parsing_and_flags():
    assert build.parse_archs("9.0;8.0,86") == [(8, 0), (8, 6), (9, 0)]
    assert build.arch_flags([(9, 0)]) == ["-gencode=arch=compute_90,code=sm_90"]
    with pytest.raises(BuildError, match="like 8.0"):
        build.parse_archs("hopper")


def test_build_dir_option_and_cache_key(monkeypatch, tmp_path):
    assert build.build_dir([(9, 0)], tmp_path / "ext") == tmp_path / "ext"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = build.build_dir([(8, 0), (9, 0)])
    assert folder.parent == tmp_path / "gptq-backend-marlin"
    assert "sm80_sm90" in folder.name and build.source_hash() in folder.name


def test_sources_ship_with_the_package():
    names = {p.name for p in build.sources()}
    assert {"marlin_dispatch.cu", "marlin_f16_b4.cu", "marlin_bf16_b8.cu", "marlin_ops.cpp"} <= names


@pytest.mark.skipif(not NO_CUDA_TORCH, reason="checks the message of a CPU-only torch build")
def test_build_command_fails_with_the_reason():
    proc = subprocess.run([sys.executable, "-m", "gptq_backend_marlin.build", "--arch", "9.0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "no CUDA support" in proc.stderr


def test_fake_implementation_gives_shapes_without_a_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gptq_backend_marlin import ops

    with FakeTensorMode():
        a = torch.empty(5, 128, dtype=torch.float16)
        tiles = torch.empty(128 * 64 // 8, dtype=torch.int32)
        scales = torch.empty(1, 64, dtype=torch.float16)
        slots, counters = torch.empty(16, dtype=torch.float32), torch.empty(4, dtype=torch.int32)
        out = ops.gemm(a, tiles, scales, None, None, None, slots, counters, 4, 128, 64, 1)
        w = ops.dequantize(tiles, scales, None, 4, 128, 128, 64)
    assert out.shape == (5, 64) and out.dtype == torch.float16
    assert w.shape == (64, 128)


def test_gather_cols_is_registered_with_its_schema():
    from gptq_backend_marlin import ops

    schema = str(torch.ops.gptq_marlin.gather_cols.default._schema)
    assert schema == "gptq_marlin::gather_cols(Tensor x, Tensor perm) -> Tensor"
    assert any(p.name == "marlin_gather.cu" for p in build.sources())


@pytest.mark.parametrize(
    "x,perm,message",
    [
        (torch.empty(4, 64, dtype=torch.float32), torch.arange(64), "float16 or bfloat16"),
        (torch.empty(4, 64, dtype=torch.float16), torch.arange(63), "K=64"),
        (torch.empty(4, 64, dtype=torch.float16), torch.arange(64).float(), "int32 or int64"),
        (torch.empty(64, dtype=torch.float16), torch.arange(64), "2-D"),
        (torch.empty(4, 64, dtype=torch.float16), torch.arange(64, device="meta"), "same CUDA device"),
    ],
)
def test_gather_cols_checks_arguments_before_the_cuda_op(x, perm, message):
    """Bad arguments never reach the C++ op (whose own checks crashed the process on the H100)."""
    from gptq_backend_marlin import ops

    with pytest.raises(ValueError, match=message):
        ops.gather_cols(x, perm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("idx", [torch.int32, torch.int64])
def test_gather_cols_fake_implementation(dtype, idx):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gptq_backend_marlin import ops

    with FakeTensorMode():
        x = torch.empty(7, 100, dtype=dtype)
        out = ops.gather_cols(x, torch.empty(100, dtype=idx))
    assert out.shape == (7, 100) and out.dtype == dtype


@pytest.mark.parametrize(
    "x_shape,x_dtype,perm_shape,perm_dtype,message",
    [
        ((4, 64), torch.float32, (64,), torch.int64, "float16 or bfloat16"),
        ((4, 64), torch.float16, (63,), torch.int64, "K=64"),
        ((4, 64), torch.float16, (64,), torch.float32, "int32 or int64"),
        ((64,), torch.float16, (64,), torch.int64, "2-D"),
    ],
)
def test_gather_cols_fake_implementation_rejects_bad_arguments(x_shape, x_dtype, perm_shape, perm_dtype, message):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gptq_backend_marlin import ops

    with FakeTensorMode(), pytest.raises(Exception, match=message):
        ops.gather_cols(torch.empty(x_shape, dtype=x_dtype), torch.empty(perm_shape, dtype=perm_dtype))


def test_gather_cols_traces_under_torch_compile():
    from gptq_backend_marlin import ops

    def f(x, perm):
        return ops.gather_cols(x, perm) * 2

    gm = torch.fx.experimental.proxy_tensor.make_fx(f, tracing_mode="fake")(
        torch.empty(3, 96, dtype=torch.float16), torch.empty(96, dtype=torch.int32))
    assert any("gather_cols" in str(n.target) for n in gm.graph.nodes)
