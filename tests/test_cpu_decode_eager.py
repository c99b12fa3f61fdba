"""Eager decode on the CPU: what a quantized layer call costs in Python, and that the lean path
computes what the traced one does.

A stories260K decode step is Python overhead, not arithmetic (NOTES/perf-cpu.md "End to
end"), so ``QuantLinear.forward`` hands a plainly eager input straight to the cpu backend's
``eager_qmatmul`` (the layout bound once into the extension, any leading dimensions) and a
fused group splits its output once for all members. These tests pin that structure (no
reshape, view or narrow per call: counted with a ``TorchFunctionMode``, which leaves
``plain_eager`` true) and check the lean path against the custom-op path that torch.compile
and dispatch modes take (a ``TorchDispatchMode`` is active there), bit for bit, on the real
stories260K model quantized by the project's RTN.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gptq_core import QuantLinear
from gptq_core.auto import load_for_inference
from gptq_core.errors import NotSupportedError
from gptq_core.synthetic import write_rtn_checkpoint
from gptq_core.testing import random_activations, random_packed
from gptq_backends.cpu_kernels import build

STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"
ATTN, MLP = "model.layers.1.self_attn", "model.layers.1.mlp"


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The cpu backend's extension (built or found in its cache once)."""
    try:
        build.load()
    except build.BuildError as exc:  # pragma: no cover - a machine without g++
        pytest.skip(f"C++ kernels not built here: {exc}")


@pytest.fixture(scope="module")
def stories_q(tmp_path_factory) -> Path:
    """stories260K quantized by RTN 4-bit g128 (what ``gptq bench generate`` times)."""
    out = tmp_path_factory.mktemp("decode") / "stories260K-rtn"
    model, tokenizer = load_for_inference(STORIES, "cpu", "auto", "float32")
    return write_rtn_checkpoint(model, tokenizer, out, STORIES)


class TorchCalls(TorchFunctionMode):
    """Names of the torch functions and tensor methods called (property reads included)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class Passthrough(TorchDispatchMode):
    """An active dispatch mode: layers take the custom op, as under tracing or recording."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def cpu_layer(bits=4, group=32, sym=False, act=False, K=172, N=72, bias=True, dtype=torch.float32):
    layer = QuantLinear.from_packed(random_packed(bits, group, sym, act, K, N, seed=bits, bias=bias),
                                    backend="cpu", act_dtype=dtype)
    assert layer.binding.backend.name == "cpu" and layer._eager is not None
    return layer


def both_paths(layer: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain eager output, output under a dispatch mode, which must have run the op)."""
    with torch.no_grad():
        eager = layer(x)
        with Passthrough() as mode:
            traced = layer(x)
    assert "gptq_cpu.qmatmul" in mode.ops
    return eager, traced


# ------------------------------------------------------------------------------ one layer
def test_a_plain_eager_call_runs_no_torch_op_in_python():
    """The whole call is one entry into the extension: a 3-D decode input is neither reshaped
    nor made contiguous in Python, and the output comes back 3-D."""
    layer = cpu_layer(K=64, N=64, bias=False)
    x = random_activations(1, 1, 64, dtype=torch.float32)
    with torch.no_grad():
        layer(x)
        with TorchCalls() as calls:
            y = layer(x)
    assert y.shape == (1, 1, 64)
    assert all(name == "__get__" for name in calls.names), calls.names  # x.dtype, x.requires_grad


SHAPES = {
    "1d": lambda K: random_activations(K, dtype=torch.float32),
    "m0": lambda K: random_activations(0, K, dtype=torch.float32),
    "m1-3d": lambda K: random_activations(1, 1, K, dtype=torch.float32),
    "m5": lambda K: random_activations(5, K, dtype=torch.float32),
    "m17-gemm": lambda K: random_activations(17, K, dtype=torch.float32),  # above GEMM_ABOVE_M
    "4d": lambda K: random_activations(2, 3, 2, K, dtype=torch.float32),
    "transposed": lambda K: random_activations(K, 6, dtype=torch.float32).t(),
    "strided-3d": lambda K: random_activations(4, 2, 2 * K, dtype=torch.float32)[:, :, ::2],
    "expanded": lambda K: random_activations(1, K, dtype=torch.float32).expand(3, K),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("act", [False, True], ids=["plain", "act-order"])
def test_the_eager_entry_equals_the_op_on_every_input(shape, act):
    layer = cpu_layer(act=act)
    x = SHAPES[shape](layer.in_features)
    before = x.clone()
    eager, traced = both_paths(layer, x)
    assert eager.shape == (*x.shape[:-1], layer.out_features) and eager.dtype == x.dtype
    assert torch.equal(eager, traced)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_take_the_eager_entry_too(dtype):
    layer = cpu_layer(bits=3, dtype=dtype)
    x = random_activations(2, 3, layer.in_features, dtype=dtype)
    eager, traced = both_paths(layer, x)
    assert eager.dtype == dtype and torch.equal(eager, traced)


@pytest.mark.parametrize("x, message", [
    (torch.zeros(2, 100), "features in its last dimension"),
    (torch.tensor(1.0), "0-d tensor"),
    (torch.zeros(2, 172, device="meta"), "move the input or the model"),
], ids=["wrong-K", "scalar", "other-device"])
def test_an_input_the_entry_refuses_gets_the_checked_error(x, message):
    layer = cpu_layer()
    with torch.no_grad(), pytest.raises(NotSupportedError, match=message):
        layer(x)


def test_the_prepared_layer_survives_deepcopy():
    """The prepared object holds the extension's bound layer; a deep copy rebuilds it from
    copies of its tensors and computes the same."""
    layer = cpu_layer(act=True)
    x = random_activations(3, layer.in_features, dtype=torch.float32)
    with torch.no_grad():
        want = layer._eager(x, layer.bias)
        prepared = copy.deepcopy(layer._prepared)
        assert prepared.eager_qmatmul is not layer._eager
        assert prepared.eager_qmatmul.gemm_above == layer._prepared.gemm_above
        assert torch.equal(prepared.eager_qmatmul(x, layer.bias), want)


def test_an_input_that_needs_a_gradient_never_takes_the_eager_entry():
    """The entry has no backward: with the cpu backend chosen explicitly the call is refused
    (it declares no training), chosen automatically the layer is bound again for training."""
    x = random_activations(2, 172, dtype=torch.float32).requires_grad_()
    with pytest.raises(NotSupportedError, match="no backward pass"):
        cpu_layer()(x)
    auto = QuantLinear.from_packed(random_packed(4, 32, False, False, 172, 72, seed=4),
                                   act_dtype=torch.float32)
    assert auto.binding.backend.name == "cpu"
    auto(x).sum().backward()
    assert auto.binding.backend.name != "cpu" and x.grad is not None and bool(x.grad.abs().sum() > 0)


# ------------------------------------------------------------------------------ fused groups
def test_a_fused_group_splits_its_output_once(stories_q):
    fused, _ = load_for_inference(stories_q, "cpu", "cpu", "float32")
    attn, mlp = fused.get_submodule(ATTN), fused.get_submodule(MLP)
    x = random_activations(1, 1, 64, dtype=torch.float32)
    with torch.no_grad():
        attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        with TorchCalls() as calls:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    ops = [n for n in calls.names if n not in ("__get__", "is_inference")]
    assert ops == ["split_with_sizes", "split_with_sizes"], calls.names
    plain, _ = load_for_inference(stories_q, "cpu", "cpu", "float32", fuse=False)
    with torch.no_grad():
        for name, got in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            assert torch.allclose(got, plain.get_submodule(f"{ATTN}.{name}")(x), rtol=0, atol=1e-6)
        for name, got in (("gate_proj", gate), ("up_proj", up)):
            assert torch.allclose(got, plain.get_submodule(f"{MLP}.{name}")(x), rtol=0, atol=1e-6)


def test_a_fused_model_runs_under_inference_mode(stories_q):
    """Inference tensors have no version counter: the input object alone keys the shared
    output, and the fused matmul still runs once per group."""
    model, _ = load_for_inference(stories_q, "cpu", "cpu", "float32")
    attn = model.get_submodule(ATTN)
    runs = []
    attn.q_proj.fused.register_forward_hook(lambda m, args, out: runs.append(out))
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    runs.clear()
    with torch.inference_mode():
        got = model(ids).logits
    assert len(runs) == 1 and attn.q_proj._group._entry is None
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------ end to end
def test_greedy_tokens_equal_on_the_eager_entry_and_the_op_path(stories_q):
    """stories260K quantized: eager (lean entry) and under a dispatch mode (the custom op,
    as traced) generate the same greedy tokens; so does the unfused model."""
    model, _ = load_for_inference(stories_q, "cpu", "cpu", "float32")
    plain, _ = load_for_inference(stories_q, "cpu", "cpu", "float32", fuse=False)
    ids = torch.randint(3, 512, (2, 8), generator=torch.Generator().manual_seed(1))
    kw = {"max_new_tokens": 12, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    eager = model.generate(ids, **kw)
    with Passthrough() as mode:
        traced = model.generate(ids, **kw)
    assert "gptq_cpu.qmatmul" in mode.ops
    assert torch.equal(eager, traced)
    assert torch.equal(plain.generate(ids, **kw), eager)


def test_a_profiled_call_takes_the_custom_op():
    """Under torch.profiler the backends take their custom op, so a decode-step breakdown
    (gptq_core/generation/profile.py) sees each linear's kernels inside its range."""
    from gptq_core.tracing import plain_eager

    assert plain_eager()
    with torch.profiler.profile():
        assert not plain_eager()
    assert plain_eager()
