"""PEFT LoRA on gptq-core models (gptq_core/integrations/peft.py): no registration by the user,
adapters beside QuantLinear (fused projections included), gradients through the quantized
base equal those of the float model holding the same weights, a clear refusal to merge, and
the stories260K example's loss falling."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as PeftLoraLinear  # noqa: E402
from peft.tuners.lora.model import LoraModel  # noqa: E402

from gptq_core import AutoGPTQForCausalLM, NotSupportedError, QuantizeConfig, quantize_rtn  # noqa: E402
from gptq_core.checkpoint import save_quantized  # noqa: E402
from gptq_core.fusion import FusedSlice  # noqa: E402
from gptq_core.integrations import peft as peft_integration  # noqa: E402
from gptq_core.quant_linear import QuantLinear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "gptq_core" / "data" / "stories260K"
EXAMPLE = ROOT / "examples" / "lora_stories260k.py"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    """stories260K, every decoder linear RTN 4-bit g32 asymmetric, and the packed weights."""
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    packed = {}
    for i in range(5):
        for lin in LINEARS:
            name = f"model.layers.{i}.{lin}"
            packed[name] = quantize_rtn(model.get_submodule(name).weight, 4, 32, False)
    config = QuantizeConfig(bits=4, group_size=32, sym=False)
    return save_quantized(model, packed, config, tmp_path_factory.mktemp("peft") / "q"), packed


@pytest.fixture(autouse=True)
def _registered():
    peft_integration.register()  # what ``import gptq_core`` arranges (checked in a subprocess)


def load(folder: Path, fuse: bool = True) -> nn.Module:
    return AutoGPTQForCausalLM.from_quantized(folder, device="cpu", torch_dtype=torch.float32,
                                              fuse=fuse).model


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """LoRA starts with B = 0 (a no-op) and a random A: give both seeded values, so the
    adapters change the output and two models get the same adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------ registration
def test_get_peft_model_needs_no_registration(checkpoint):
    """A fresh interpreter: ``import gptq_core``, then PEFT as a user calls it, nothing else."""
    folder, _ = checkpoint
    code = textwrap.dedent(f"""
        import torch, gptq_core
        from peft import LoraConfig, get_peft_model
        model = gptq_core.AutoGPTQForCausalLM.from_quantized({str(folder)!r},
                                                            torch_dtype=torch.float32).model
        peft_model = get_peft_model(model, LoraConfig(target_modules={TARGETS!r}))
        q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        print(type(q).__name__, type(q.base_layer).__name__)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["QuantLoraLinear", "FusedSlice"]


def test_register_is_idempotent_and_leaves_other_layers_to_peft():
    peft_integration.register()
    fn = LoraModel.__dict__["_create_new_module"].__func__
    assert fn.__gptq_core__ and not getattr(fn.__wrapped__, "__gptq_core__", False)
    plain = nn.Sequential(nn.Linear(8, 8))
    wrapped = get_peft_model(plain, LoraConfig(target_modules=["0"]))
    assert type(wrapped.base_model.model[0]) is PeftLoraLinear


# ------------------------------------------------------------------------------ forward, backward
def test_adapters_wrap_the_quantized_layers_and_add_their_product(checkpoint):
    folder, _ = checkpoint
    model = load(folder)
    with torch.no_grad():
        base = model(tokens()).logits
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    wrapped = [m for m in peft_model.modules() if peft_integration.is_quant_lora(m)]
    assert len(wrapped) == 10
    assert all(isinstance(m.base_layer, FusedSlice) for m in wrapped)  # q/k/v share one matmul
    with torch.no_grad():
        assert torch.equal(peft_model(tokens()).logits, base)  # B = 0 at start
    randomize_adapters(peft_model)
    q = wrapped[0]
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = q.base_layer(x) + q.lora_B["default"](q.lora_A["default"](x)) * q.scaling["default"]
        assert torch.allclose(q(x), expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(peft_model(tokens()).logits, base)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(tokens()).logits, base)


def float_twin(model: nn.Module) -> nn.Module:
    """``model`` (in place) in float64 with every QuantLinear an ``nn.Linear`` holding its
    dequantized weight; the rest of the model stays as loaded."""
    from gptq_core.models.layers import set_module

    twin = model
    for name, m in list(twin.named_modules()):
        if isinstance(m, QuantLinear):
            w = m.packed()
            linear = nn.Linear(w.in_features, w.out_features, bias=w.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(w.dequantize(torch.float64).t())
                if w.bias is not None:
                    linear.bias.copy_(w.bias)
            set_module(twin, name, linear)
    return twin.double().eval()


def test_only_adapters_train_and_their_gradients_are_the_float_model_s(checkpoint):
    """The gradient of layer 0's adapters flows back through four layers of quantized bases:
    it equals the one of the float64 model holding the same dequantized weights."""
    folder, _ = checkpoint
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    reference = get_peft_model(float_twin(load(folder)), config)
    quant = get_peft_model(load(folder), config)
    randomize_adapters(quant)
    randomize_adapters(reference)
    trainable = [n for n, p in quant.named_parameters() if p.requires_grad]
    assert len(trainable) == 20 and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for n, p in quant.named_parameters() if "lora_" not in n)
    ids = tokens(1)
    quant(input_ids=ids, labels=ids).loss.backward()
    reference(input_ids=ids, labels=ids).loss.backward()
    grads = dict(reference.named_parameters())
    for name in trainable:
        got, ref = dict(quant.named_parameters())[name].grad, grads[name].grad
        assert got is not None and got.abs().sum() > 0, name
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 2e-5, f"{name}: relative error {err:.2e}"


# ------------------------------------------------------------------------------ merging, saving
def test_merging_into_a_quantized_base_fails_with_one_line(checkpoint):
    folder, _ = checkpoint
    peft_model = get_peft_model(load(folder), LoraConfig(target_modules=TARGETS))
    message = r"cannot merge a LoRA adapter into a gptq-core QuantLinear: its weight is packed 4-bit"
    with pytest.raises(NotSupportedError, match=message) as merge:
        peft_model.merge_adapter()
    assert "\n" not in str(merge.value)
    with pytest.raises(NotSupportedError, match=message):
        peft_model.merge_and_unload()
    peft_model.unmerge_adapter()  # nothing was merged: nothing to undo
    assert isinstance(peft_model.unload().model.layers[0].self_attn.q_proj, QuantLinear)


@pytest.mark.parametrize("fuse", [False, True])
def test_a_saved_adapter_loads_onto_a_fresh_quantized_model(checkpoint, tmp_path, fuse):
    """PEFT loads an adapter with ``load_state_dict(strict=False)`` over the whole model: the
    quantized layers, fused ones included, must let it pass by."""
    folder, _ = checkpoint
    peft_model = get_peft_model(load(folder, fuse), LoraConfig(target_modules=TARGETS))
    randomize_adapters(peft_model)
    with torch.no_grad():
        expected = peft_model(tokens()).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert not any("qweight" in p.name for p in (tmp_path / "adapter").iterdir())
    again = PeftModel.from_pretrained(load(folder, fuse), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again(tokens()).logits, expected)


# ------------------------------------------------------------------------------ the example
@pytest.mark.slow
def test_the_stories260k_example_lowers_the_loss(capsys):
    """Its own GPTQ quantization, load, PEFT wrapping and 30 steps (the example runs 300)."""
    spec = importlib.util.spec_from_file_location("lora_stories260k", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.train(example.parse_args(["--steps", "30", "--log-every", "10"]))
    first, last = example.summary(losses)
    assert len(losses) == 30 and last < first - 0.02, (first, last)
    out = capsys.readouterr().out
    assert "QuantLinear layers served by" in out and "step   30  loss" in out


# ------------------------------------------------------------------------------ the GPU benchmark
def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_RUN = ["--device", "cpu", "--shape", "tiny", "--layers", "1", "--backends", "torch",
            "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "1"]


def test_lora_step_benchmark_checks_gradients_then_times_every_variant(tmp_path, capsys):
    """benchmarks/lora_step.py's logic on the CPU (the H200 runs it on Llama-2-7B shapes)."""
    bench = load_script(ROOT / "benchmarks" / "lora_step.py")
    out = tmp_path / "lora.json"
    assert bench.main([*TINY_RUN, "--cache-mb", "0,16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [c["layer"].rsplit(".", 1)[1] for c in result["checks"]] == ["q_proj", "gate_proj", "down_proj"]
    assert all(c["ok"] and c["backend"] == "torch" for c in result["checks"])
    variants = [r["variant"] for r in result["steps"]]
    assert variants == ["float float32", "4-bit g128 torch", "4-bit g128 torch cache 16 MiB"]
    assert all(r["tokens_per_s"] > 0 and r["trainable"] > 0 for r in result["steps"])
    assert "x fp tokens/s" in capsys.readouterr().out


def test_lora_step_benchmark_stops_when_a_gradient_is_wrong(monkeypatch, capsys):
    bench = load_script(ROOT / "benchmarks" / "lora_step.py")
    monkeypatch.setattr(bench, "TOLERANCES", {torch.float32: (0.0, 0.0)})
    assert bench.main([*TINY_RUN, "--no-fp16"]) == 1
    out = capsys.readouterr().out
    assert "FAIL gradient torch" in out and "nothing timed" in out and "step 4-bit" not in out
