"""QuantLinear: binding once, clear input errors, torch.compile, state dicts, device moves."""

from __future__ import annotations

import pytest
import torch

from gptq_core import QuantLinear, selector
from gptq_core.errors import FormatError, GPTQError, NoBackendError, NotSupportedError
from gptq_core.testing import assert_matches_reference, random_activations, random_packed


@pytest.fixture(autouse=True)
def _automatic_choice(monkeypatch):
    monkeypatch.delenv("GPTQ_BACKEND", raising=False)


@pytest.fixture
def packed():
    return random_packed(4, 32, sym=False, desc_act=True, in_features=96, out_features=40,
                         seed=11, bias=True)


def test_forward_matches_reference_with_any_leading_dims(packed):
    layer = QuantLinear.from_packed(packed, act_dtype=torch.float32)
    for shape in ((5, 96), (2, 3, 96), (2, 1, 2, 96), (0, 96)):
        x = random_activations(*shape, dtype=torch.float32, seed=len(shape))
        assert_matches_reference(layer(x), x, packed, context=str(shape))


@pytest.mark.parametrize(
    ("make_x", "message"),
    [
        (lambda: torch.randn(3, 95), r"input has 95 features in its last dimension, this layer "
                                     r"takes K=96 \(shape \(3, 95\)\)"),
        (lambda: torch.randint(0, 3, (3, 96)), "input has dtype torch.int64; use float16, "
                                               "bfloat16 or float32"),
        (lambda: torch.randn(3, 96, dtype=torch.float64), "dtype torch.float64"),
        (lambda: torch.randn(3, 96, device="meta"), "input is on meta but this layer's weights "
                                                    "are on cpu"),
    ],
)
def test_unsupported_inputs_raise_clear_errors(packed, make_x, message):
    layer = QuantLinear.from_packed(packed, act_dtype=torch.float32)
    with pytest.raises(NotSupportedError, match=message):
        layer(make_x())


def test_gradients_need_a_training_backend(packed):
    layer = QuantLinear.from_packed(packed, backend="example", act_dtype=torch.float32)
    x = torch.randn(2, 96, requires_grad=True)
    with pytest.raises(NotSupportedError, match="backend 'example' has no backward pass; bind "
                                                "the model with mode='training'"):
        layer(x)
    trainable = QuantLinear.from_packed(packed, act_dtype=torch.float32, mode="training")
    trainable(x).sum().backward()
    expected = packed.dequantize(torch.float64).sum(dim=1)  # d(sum y)/dx = W.sum over N
    assert torch.allclose(x.grad.double(), expected.expand(2, -1), rtol=1e-5, atol=1e-6)


def test_forward_does_not_select_again(packed, monkeypatch):
    layer = QuantLinear.from_packed(packed, act_dtype=torch.float16)
    x = random_activations(4, 96, dtype=torch.float16)
    expected = layer(x)

    def no_selection(*args, **kwargs):
        raise AssertionError("the selector ran on the forward path")

    monkeypatch.setattr(selector, "bind", no_selection)
    assert torch.equal(layer(x), expected)
    with pytest.raises(AssertionError, match="selector ran"):  # a new dtype does select
        layer(x.float())


def test_binds_per_activation_dtype_and_defers_when_asked(packed):
    layer = QuantLinear.from_packed(packed, act_dtype=None)
    assert layer.binding is None
    for dtype in (torch.bfloat16, torch.float32):
        x = random_activations(3, 96, dtype=dtype, seed=2)
        assert_matches_reference(layer(x), x, packed)
        assert layer.binding.plan.spec.act_dtype == dtype
    assert "backend=cpu" in repr(layer)  # the cpu backend serves CPU layers by default


def test_explicit_backend_and_environment_preference(packed, monkeypatch):
    assert QuantLinear.from_packed(packed, backend="example").binding.backend.name == "example"
    monkeypatch.setenv("GPTQ_BACKEND", "example")
    assert QuantLinear.from_packed(packed).binding.backend.name == "example"
    three_bit = random_packed(3, 32, in_features=96, out_features=40)
    with pytest.raises(NoBackendError, match="example: 3-bit is not supported"):
        QuantLinear.from_packed(three_bit)


def test_torch_compile_fullgraph(packed):
    torch._dynamo.reset()
    layer = QuantLinear.from_packed(packed, act_dtype=torch.float32, mode="compile")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for shape in ((1, 96), (2, 7, 96)):
        x = random_activations(*shape, dtype=torch.float32, seed=shape[0])
        assert_matches_reference(compiled(x), x, packed, context=f"compiled {shape}")
    torch._dynamo.reset()


def test_state_dict_round_trip(packed):
    layer = QuantLinear.from_packed(packed, act_dtype=torch.float32)
    state = layer.state_dict()
    assert set(state) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    x = random_activations(3, 96, dtype=torch.float32)
    for device in ("cpu", "meta"):
        fresh = QuantLinear(4, 32, 96, 40, bias=True, sym=False, desc_act=True, device=device)
        fresh.load_state_dict(state)
        assert torch.equal(fresh(x), layer(x)), device
        assert torch.equal(fresh.g_idx, packed.g_idx)


def test_state_dict_contradicting_the_config_names_the_tensor(packed):
    state = QuantLinear.from_packed(packed, act_dtype=None).state_dict()
    wrong_bits = QuantLinear(8, 32, 96, 40, bias=True)
    with pytest.raises(FormatError, match=r"tensor 'qweight' has shape \(12, 40\), but bits=8, "
                                          r"group_size=32, K=96, N=40 require \(24, 40\)"):
        wrong_bits.load_state_dict(state)


def test_unloaded_layer_cannot_bind():
    with pytest.raises(GPTQError, match="no weights yet"):
        QuantLinear(4, 32, 96, 40, device="meta").bind()


def test_module_casts_keep_the_format_dtypes(packed):
    layer = QuantLinear.from_packed(packed, act_dtype=torch.float32)
    layer.float().half().to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.int32
    assert layer.bias.dtype == torch.float16 and layer.binding is None  # unbound by the move
    x = random_activations(2, 96, dtype=torch.float32)
    assert_matches_reference(layer(x), x, packed)
