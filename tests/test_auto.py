"""AutoGPTQForCausalLM: from_pretrained -> quantize -> save_quantized -> from_quantized on the
real stories260K model, determinism, and generate() of the loaded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gptq_core import AutoGPTQForCausalLM, CheckpointError, QuantizeConfig
from gptq_core.quant_linear import QuantLinear


ROOT = Path(__file__).resolve().parents[1] / "gptq_core" / "data"
STORIES = ROOT / "stories260K"
SAMPLE = ROOT / "text" / "tinystories-sample.txt"
CONFIG = QuantizeConfig(bits=4, group_size=32)


def calibration_docs(count: int = 40) -> list[str]:
    docs = SAMPLE.read_text(encoding="utf-8").split("<|endoftext|>")
    return [d.strip() + "\n" for d in docs[:count] if d.strip()]


def quantized(folder: Path) -> AutoGPTQForCausalLM:
    model = AutoGPTQForCausalLM.from_pretrained(STORIES, CONFIG)
    model.quantize(calibration_docs(), nsamples=8, seqlen=64, seed=3, progress=False)
    model.save_quantized(folder)
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two independent quantizations of stories260K with the same settings and seed."""
    base = tmp_path_factory.mktemp("auto")
    first = quantized(base / "a")
    quantized(base / "b")
    return base, first


def test_same_seed_gives_byte_identical_checkpoints(runs):
    base, _ = runs
    for name in ("model.safetensors", "config.json", "quantize_config.json"):
        assert (base / "a" / name).read_bytes() == (base / "b" / name).read_bytes(), name


def test_quantized_model_runs_and_reloads_identically(runs):
    base, model = runs
    layers = model.quant_linears()
    assert len(layers) == 35 and set(layers) == set(model.packed)
    log = [json.loads(line) for line in (base / "a" / "quantize_log.jsonl").read_text().splitlines()]
    assert [r["name"] for r in log] == list(model.packed)
    assert all(r["error"] >= 0 and r["damp"] > 0 for r in log)

    loaded = AutoGPTQForCausalLM.from_quantized(base / "a", device="cpu", torch_dtype=torch.float32)
    assert loaded.tokenizer is not None and loaded.quantize_config.group_size == 32
    for name, layer in loaded.quant_linears().items():
        pw = model.packed[name]
        for field in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(layer, field), getattr(pw, field)), f"{name}.{field}"
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits.double()
        got = loaded(ids).logits.double()
    # the checkpoint stores the non-quantized weights in fp16: close, not identical
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-3


def test_generate_greedy_sampling_and_kv_cache(runs):
    base, _ = runs
    model = AutoGPTQForCausalLM.from_quantized(base / "a", torch_dtype=torch.float32)
    inputs = model.tokenizer("Once upon a time", return_tensors="pt")
    greedy = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    no_cache = model.generate(**inputs, max_new_tokens=12, do_sample=False, use_cache=False)
    assert greedy.shape == (1, inputs["input_ids"].shape[1] + 12)
    assert torch.equal(greedy, no_cache)
    sampled = []
    for _ in range(2):
        torch.manual_seed(5)
        sampled.append(model.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=0.7,
                                      top_k=20, top_p=0.9))
    assert torch.equal(sampled[0], sampled[1])
    assert int(sampled[0].max()) < 512 and len(model.tokenizer.decode(sampled[0][0])) > len("Once upon a time")


def test_act_order_asym_v2_on_a_tiny_model(tmp_path):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "float")
    qcfg = QuantizeConfig(bits=3, group_size=16, desc_act=True, sym=False, checkpoint_format="gptq_v2")
    model = AutoGPTQForCausalLM.from_pretrained(tmp_path / "float", qcfg)
    samples = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(2))
    model.quantize(samples, progress=False)
    model.save_quantized(tmp_path / "q")
    loaded = AutoGPTQForCausalLM.from_quantized(tmp_path / "q", torch_dtype=torch.float32)
    down = loaded.model.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.desc_act and not down.sym and down.zero_format == "v2"
    assert not torch.equal(down.g_idx, torch.arange(48, dtype=torch.int32) // 16)  # act-order
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, rtol=0, atol=5e-3)


def test_wrong_entry_points_say_which_to_use(runs):
    base, _ = runs
    with pytest.raises(CheckpointError, match="from_quantized"):
        AutoGPTQForCausalLM.from_pretrained(base / "a", CONFIG)
    with pytest.raises(CheckpointError, match="not a GPTQ checkpoint"):
        AutoGPTQForCausalLM.from_quantized(STORIES)


def test_from_quantized_fast_generates_what_transformers_generates(runs):
    base, _ = runs
    plain = AutoGPTQForCausalLM.from_quantized(base / "a", device="cpu")
    fast = AutoGPTQForCausalLM.from_quantized(base / "a", device="cpu", fast=True)
    ids = plain.tokenizer("Once upon a time", return_tensors="pt").input_ids
    want = plain.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
    got = fast.generate(ids, max_new_tokens=24, do_sample=False)
    assert fast.fast and hasattr(fast.model, "_gptq_fast_generator")
    assert torch.equal(got, want)
