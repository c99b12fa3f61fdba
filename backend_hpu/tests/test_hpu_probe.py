"""The hpu backend as the registry, the selector and ``gptq backends list`` see it, and the probe's
reasons. No test here runs anything on Gaudi; the one that would needs a real HPU and is skipped
without one (no stand-in module is ever installed for habana_frameworks)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from gptq_core import DeviceInfo, LayerSpec, Registry, plan
from gptq_core.registry import get_registry
from gptq_core.testing import assert_matches_reference, random_activations, random_packed
from gptq_backend_hpu import device_ops, plugin

HPU = DeviceInfo.of("hpu")  # a device kind torch knows by name; no Gaudi is needed to describe it
NO_HABANA = importlib.util.find_spec("habana_frameworks") is None


def hpu():
    return get_registry().get("hpu")


def test_registered_through_the_entry_point_with_its_priority():
    b = hpu()
    assert b.info.distribution == "gptq-backend-hpu"
    assert HPU.kind == "hpu"
    assert b.info.priority_for(HPU) == 100
    assert b.info.capabilities.bits == (4,)


def test_cpu_is_not_served():
    assert hpu().reasons(DeviceInfo.of("cpu")) == ["runs on hpu devices, this is cpu"]


@pytest.mark.skipif(not NO_HABANA, reason="checks the reason given where habana_frameworks is absent")
def test_probe_says_habana_frameworks_is_not_installed():
    assert device_ops.unavailable_reason() == "habana_frameworks not installed"
    assert plugin.gptq_probe(device=HPU, spec=None) == ["habana_frameworks not installed"]
    assert hpu().reasons(HPU, LayerSpec(4, 128, 256, 64)) == ["habana_frameworks not installed"]


@pytest.mark.parametrize(
    "spec,reason",
    [
        (LayerSpec(8, 128, 256, 64), "8-bit is not supported (supports [4])"),
        (LayerSpec(4, 128, 192, 64), "K=192 is not divisible by group size 128"),
        (LayerSpec(4, 128, 256, 12), "N=12 is not divisible by 8"),
        (LayerSpec(4, 128, 256, 64, act_dtype=torch.float32), "activation dtype float32"),
        (LayerSpec(4, 128, 256, 64, mode="training"), "no backward pass"),
    ],
)
def test_layers_the_op_cannot_take_are_rejected_before_the_probe(spec, reason):
    reasons = hpu().reasons(HPU, spec)
    assert any(reason in r for r in reasons), reasons


def test_act_order_asym_bf16_is_declared():
    spec = LayerSpec(4, 32, 256, 64, sym=False, desc_act=True, act_dtype=torch.bfloat16)
    assert hpu().info.capabilities.layer_reasons(spec) == []


@pytest.mark.skipif(not NO_HABANA, reason="needs a machine without habana_frameworks")
def test_selector_falls_back_to_the_reference_with_the_reason():
    from gptq_backends.torch_ref import plugin as torch_plugin

    reg = Registry()
    reg.register(torch_plugin, name="torch", distribution="gptq-backends")
    reg.register(plugin, name="hpu", distribution="gptq-backend-hpu")
    chosen = plan(LayerSpec(4, 128, 256, 64), HPU, registry=reg)
    assert [b.name for b in chosen.ranked] == ["torch"]
    assert chosen.rejected["hpu"] == ["habana_frameworks not installed"]


def test_backends_list_shows_hpu_unavailable_here():
    from gptq_core.cli.backends import backend_rows

    row = next(r for r in backend_rows(DeviceInfo.of("cpu")) if r["name"] == "hpu")
    assert row["status"] == "unavailable"
    assert row["reasons"] == ["runs on hpu devices, this is cpu"]
    assert row["bits"] == [4] and row["device_kinds"] == ["hpu"] and row["desc_act"] is True
    if NO_HABANA:
        row = next(r for r in backend_rows(HPU) if r["name"] == "hpu")
        assert row["status"] == "unavailable"
        assert row["reasons"] == ["habana_frameworks not installed"]


@pytest.mark.skipif(device_ops.unavailable_reason() is not None,
                    reason=f"needs Gaudi: {device_ops.unavailable_reason()}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sym,desc_act", [(True, False), (False, True)])
def test_on_a_real_hpu_the_layer_matches_the_reference(dtype, sym, desc_act):
    """The only test of the device itself: Gaudi's op and matmul against float64."""
    b = hpu()
    packed = random_packed(4, 128, sym, desc_act, in_features=512, out_features=256, bias=True)
    device = DeviceInfo.of("hpu")
    prepared = b.prepare(packed, device, LayerSpec.of(packed, act_dtype=dtype))
    for m in (1, 16):
        x = random_activations(m, 512, dtype=dtype, seed=m, device="hpu")
        y = b.qmatmul(x, prepared, packed.bias.to(device="hpu", dtype=dtype))
        assert_matches_reference(y.cpu(), x.cpu(), packed, context=f"M={m}")
