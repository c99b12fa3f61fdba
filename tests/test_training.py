"""The backward pass through quantized layers (gptq_core/training.py): dX = dY @ W for every
backend, against float64, per call and from the cache, eager and compiled."""

from __future__ import annotations

import pytest
import torch

from gptq_core import training
from gptq_core.device import DeviceInfo
from gptq_core.errors import GPTQError, NotSupportedError
from gptq_core.options import OptionsError
from gptq_core.quant_linear import QuantLinear
from gptq_core.registry import get_registry
from gptq_core.spec import LayerSpec
from gptq_core.testing import TOLERANCES, check_close, random_activations, random_packed
from gptq_core.training import (
    DequantBudget,
    TrainingOptions,
    WeightSource,
    configure_training,
    contiguous_groups,
    dequantize_rows,
    differentiable_qmatmul,
)

CONFIGS = [  # bits, group size, sym, act-order, zero format
    (2, -1, True, False, "v1"),
    (3, 48, False, True, "v1"),
    (4, 32, False, False, "v2"),
    (4, 128, True, True, "v1"),
    (8, 64, False, False, "v1"),
]


def weight(bits=4, group=32, sym=False, act=False, zero_format="v1", K=172, N=40, seed=1, bias=True):
    return random_packed(bits, group, sym, act, K, N, seed=seed, bias=bias, zero_format=zero_format)


def grad_reference(grad: torch.Tensor, packed) -> torch.Tensor:
    """grad @ W in float64 (W as [N, K])."""
    return grad.double().reshape(-1, packed.out_features) @ packed.dequantize(torch.float64).t()


def assert_grad_close(x_grad: torch.Tensor, grad: torch.Tensor, packed, dtype: torch.dtype) -> None:
    ref = grad_reference(grad, packed)
    w = packed.dequantize(torch.float64)
    g64 = grad.double().reshape(-1, packed.out_features)
    bound = g64.abs() @ w.abs().t() + ref.abs()
    check = check_close(x_grad.reshape(-1, packed.in_features), ref, bound, dtype, TOLERANCES[dtype])
    assert check.ok, check.message


# ------------------------------------------------------------------------------ dequantization
@pytest.mark.parametrize("bits,group,sym,act,zf", CONFIGS)
@pytest.mark.parametrize("K", [200, 256])
def test_dequantized_rows_are_the_format_s_weight(bits, group, sym, act, zf, K):
    """Exact: q - z is exact in every float dtype and the scale product is rounded once;
    gathered per row or broadcast per group (blocks of whole groups, or inside one)."""
    p = weight(bits, group, sym, act, zf, K=K)
    zeros = p.zeros()
    rows = contiguous_groups(p.g_idx, group)
    assert rows == (None if act else (K if group == -1 else group))
    w64 = p.dequantize(torch.float64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for k0, k1 in ((0, K), (64, K), (64, 128), (128, 192)):
            want = w64[k0:k1].to(dtype)
            for group_rows in {None, rows}:
                got = dequantize_rows(p.qweight, zeros, p.scales, p.g_idx, bits, k0, k1, dtype, group_rows)
                assert got.dtype == dtype and torch.equal(got, want), (dtype, k0, k1, group_rows)


# ------------------------------------------------------------------------------ through QuantLinear
@pytest.mark.parametrize("bits,group,sym,act,zf", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_gradient_matches_float64(bits, group, sym, act, zf, dtype):
    p = weight(bits, group, sym, act, zf)
    layer = QuantLinear.from_packed(p, backend="torch", act_dtype=dtype, mode="training")
    x = random_activations(2, 3, p.in_features, dtype=dtype, seed=2).requires_grad_(True)
    y = layer(x)
    grad = random_activations(2, 3, p.out_features, dtype=dtype, seed=3)
    y.backward(grad)
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    assert_grad_close(x.grad, grad, p, dtype)


def test_the_forward_is_the_backend_s_own_kernel():
    """With grad, y is bit-identical to the inference call: same kernel, only wrapped."""
    p = weight()
    layer = QuantLinear.from_packed(p, backend="torch", act_dtype=torch.float32, mode="training")
    x = random_activations(5, p.in_features, dtype=torch.float32, seed=4)
    with torch.no_grad():
        plain = layer(x)
    assert torch.equal(layer(x.clone().requires_grad_(True)), plain)


def test_inference_builds_nothing_for_the_backward():
    layer = QuantLinear.from_packed(weight(), backend="torch", act_dtype=torch.float32, mode="training")
    x = random_activations(3, 172, dtype=torch.float32, seed=5)
    layer(x)
    with torch.no_grad():
        layer(x.clone().requires_grad_(True))
    assert layer._grad_source is None
    layer(x.clone().requires_grad_(True))
    assert isinstance(layer._grad_source, WeightSource)
    layer.unbind()
    assert layer._grad_source is None


@pytest.mark.parametrize("bits,group,act", [(3, 48, True), (4, 32, False), (4, -1, False)])
def test_blocked_backward_equals_the_whole(monkeypatch, bits, group, act):
    p = weight(bits, group, False, act, K=320)
    layer = QuantLinear.from_packed(p, backend="torch", act_dtype=torch.float32, mode="training")
    grad = random_activations(4, p.out_features, dtype=torch.float32, seed=6)

    def input_grad():
        x = random_activations(4, p.in_features, dtype=torch.float32, seed=7).requires_grad_(True)
        layer(x).backward(grad)
        return x.grad

    whole = input_grad()
    monkeypatch.setattr(training, "MAX_BLOCK_ELEMENTS", 64 * p.out_features)
    assert training.block_rows(320, p.out_features) == 64
    assert torch.allclose(input_grad(), whole, rtol=1e-6, atol=1e-6)
    assert_grad_close(whole, grad, p, torch.float32)


def test_backward_reads_the_gptq_tensors_not_the_backend_s_layout():
    """Any backend's qmatmul gets the same backward (here the example backend's, called
    directly: it declares training=False, so QuantLinear itself refuses it)."""
    example = get_registry().get("example")
    p = weight(4, 32, True, False, K=256, N=64, bias=False)
    prepared = example.prepare(p, DeviceInfo.of("cpu"), LayerSpec.of(p, torch.float32))
    x = random_activations(3, 256, dtype=torch.float32, seed=8).requires_grad_(True)
    y = differentiable_qmatmul(example.qmatmul, x, prepared, None, WeightSource.of(p))
    grad = random_activations(3, 64, dtype=torch.float32, seed=9)
    y.backward(grad)
    assert_grad_close(x.grad, grad, p, torch.float32)


def test_a_backend_without_backward_is_refused_with_the_fix():
    layer = QuantLinear.from_packed(weight(4, 32, True, K=256, N=64), backend="example",
                                    act_dtype=torch.float32)
    x = torch.randn(2, 256, requires_grad=True)
    with pytest.raises(NotSupportedError, match="backend 'example' has no backward pass"):
        layer(x)
    with torch.no_grad():  # no graph is built: the kernel alone serves
        assert layer(x).shape == (2, 64)


def test_an_automatic_choice_without_backward_is_made_again_for_training():
    """PEFT users never bind: a layer whose automatically chosen backend has no backward pass
    is bound again, in training mode, by the first forward that needs a gradient."""
    p = weight(4, 32, True, K=256, N=64)
    layer = QuantLinear.from_packed(p, backend="example", act_dtype=torch.float32)
    layer.backend = None  # as if the selector had picked it (it ranks below torch here)
    x = random_activations(2, 256, dtype=torch.float32, seed=17).requires_grad_(True)
    grad = random_activations(2, 64, dtype=torch.float32, seed=18)
    layer(x).backward(grad)
    assert layer.mode == "training" and layer.binding.backend.info.capabilities.training
    assert_grad_close(x.grad, grad, p, torch.float32)


# ------------------------------------------------------------------------------ cache and options
def test_the_cache_keeps_copies_while_the_budget_lasts():
    layers = [QuantLinear.from_packed(weight(4, 32, seed=s), backend="torch", act_dtype=torch.float32,
                                      mode="training") for s in (1, 2, 3)]
    model = torch.nn.Sequential(*layers)
    one = 172 * 40 * 4  # bytes of one fp32 copy
    budget = configure_training(model, {"dequant_cache_mb": 2.5 * one / 2**20})
    assert isinstance(budget, DequantBudget) and budget.limit == int(2.5 * one)
    grads = []
    for _ in range(2):
        x = random_activations(2, 172, dtype=torch.float32, seed=10).requires_grad_(True)
        h = x
        for layer in layers:
            h = layer(h[..., :40].repeat(1, 5)[..., :172])
        h.sum().backward()
        grads.append(x.grad)
    # backward visits the last layer first: it and the middle one fit, the first does not
    assert [layer._grad_source.cached_bytes for layer in layers] == [0, one, one]
    assert budget.used == 2 * one
    assert torch.equal(grads[0], grads[1])  # the cached copy is the per-call weight
    layers[1].unbind()
    assert budget.used == one
    configure_training(model)  # back to no cache: copies are dropped
    assert all(layer._dequant_budget is None and layer._grad_source is None for layer in layers)


def test_cached_gradient_matches_float64():
    p = weight(8, 64, False, True)
    layer = QuantLinear.from_packed(p, backend="torch", act_dtype=torch.float32, mode="training")
    configure_training(torch.nn.Sequential(layer), TrainingOptions(dequant_cache_mb=1))
    for _ in range(2):
        x = random_activations(3, p.in_features, dtype=torch.float32, seed=11).requires_grad_(True)
        grad = random_activations(3, p.out_features, dtype=torch.float32, seed=12)
        layer(x).backward(grad)
        assert_grad_close(x.grad, grad, p, torch.float32)
    assert layer._grad_source.cached_bytes == p.in_features * p.out_features * 4


@pytest.mark.parametrize("values,message", [
    ({"dequant_cache": 1}, r"TrainingOptions has no option 'dequant_cache' \(its options: dequant_cache_mb\)"),
    ({"dequant_cache_mb": "lots"}, "TrainingOptions option dequant_cache_mb='lots' cannot be read as float"),
    ({"dequant_cache_mb": -1}, "dequant_cache_mb=-1.0 is negative"),
])
def test_bad_training_options_say_what_and_how(values, message):
    with pytest.raises(OptionsError, match=message):
        TrainingOptions.parse(values)


def test_parsed_options_and_a_model_without_quantized_layers():
    assert TrainingOptions.parse({"dequant_cache_mb": "512"}).dequant_cache_mb == 512.0
    assert DequantBudget.of(TrainingOptions()) is None
    with pytest.raises(GPTQError, match="holds no QuantLinear layers"):
        configure_training(torch.nn.Linear(4, 4))


# ------------------------------------------------------------------------------ torch.compile
@pytest.mark.slow
def test_compiled_backward_matches_eager():
    p = weight(4, 32, False, True, K=256, N=64)
    layer = QuantLinear.from_packed(p, backend="torch", act_dtype=torch.float32, mode="training")
    configure_training(torch.nn.Sequential(layer), {"dequant_cache_mb": 1})
    grad = random_activations(2, 5, 64, dtype=torch.float32, seed=13)

    def input_grad(fn):
        x = random_activations(2, 5, 256, dtype=torch.float32, seed=14).requires_grad_(True)
        fn(x).backward(grad)
        return x.grad

    eager = input_grad(layer)
    torch._dynamo.reset()
    try:
        compiled = input_grad(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    finally:
        torch._dynamo.reset()
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    assert_grad_close(compiled, grad, p, torch.float32)


# ------------------------------------------------------------------------------ backends
def test_torch_backend_op_keeps_its_own_autograd():
    """``gptq_torch::qmatmul`` stays differentiable on its own (direct callers), opchecked."""
    torch_backend = get_registry().get("torch")
    p = weight(3, 48, False, True)
    prepared = torch_backend.prepare(p, DeviceInfo.of("cpu"), LayerSpec.of(p, torch.float32, "training"))
    x = random_activations(4, p.in_features, dtype=torch.float32, seed=15).requires_grad_(True)
    args = (x, prepared.qweight, prepared.zeros, prepared.scales, prepared.g_idx, p.bias, p.bits)
    torch.library.opcheck(torch.ops.gptq_torch.qmatmul.default, args)
    grad = random_activations(4, p.out_features, dtype=torch.float32, seed=16)
    torch.ops.gptq_torch.qmatmul(*args).backward(grad)
    assert_grad_close(x.grad, grad, p, torch.float32)


def test_torch_backend_backward_dtype():
    """fp16/bf16 on a GPU in their own dtype (tensor cores, fp32 accumulation); the CPU and
    fp32 keep the reference's float32."""
    from gptq_backends.torch_ref.kernels import grad_compute_dtype

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert grad_compute_dtype(torch.float16, gpu) == torch.float16
    assert grad_compute_dtype(torch.bfloat16, gpu) == torch.bfloat16
    assert grad_compute_dtype(torch.float32, gpu) == torch.float32
    assert grad_compute_dtype(torch.float16, cpu) == torch.float32


@pytest.mark.parametrize("name", ["triton", "marlin"])
def test_gpu_backends_declare_training_and_the_suite_checks_it(name):
    """What runs on the GPU later: the selector accepts them for training, and the
    conformance suite's training family has a case per bit width and dtype for them."""
    from gptq_conformance.cases import build_plan

    backend = get_registry().get(name)
    caps = backend.info.capabilities
    assert caps.training
    spec = LayerSpec(4, 128, 256, 64, mode="training")
    assert not any("backward" in r for r in caps.layer_reasons(spec))
    cases = build_plan(caps, [], quick=False, device_type="cuda").families["training"]
    assert {(c.bits, c.dtype) for c in cases} == {
        (b, d) for b in caps.bits for d in caps.act_dtypes
    }
    assert "limit-training" not in {c.id for c in build_plan(caps, [], False, "cuda").families["limit"]}
