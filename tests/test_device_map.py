"""device_map / max_memory / offload_folder of ``from_quantized`` on the real stories260K model:
a model split between the CPU and disk offload generates the same greedy tokens as the whole
model, its offloaded layers keep nothing in memory between calls, and bad maps are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptq_core import AutoGPTQForCausalLM, GPTQError, QuantizeConfig, quantize_rtn
from gptq_core.checkpoint import save_quantized
from gptq_core.quant_linear import QuantLinear

pytest.importorskip("accelerate")

STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CONFIG = QuantizeConfig(bits=4, group_size=32)
#: Layers 0-1 on the CPU, 2-4 offloaded to disk; embeddings (tied to lm_head), norm and head on the CPU.
SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
         "model.layers.2": "disk", "model.layers.3": "disk", "model.layers.4": "disk",
         "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 4-bit g32 round-to-nearest checkpoint of stories260K written by save_quantized."""
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    packed = {f"model.layers.{i}.{lin}": quantize_rtn(model.get_submodule(f"model.layers.{i}.{lin}").weight,
                                                      4, 32, True)
              for i in range(5) for lin in LINEARS}
    folder = tmp_path_factory.mktemp("dm") / "stories-w4g32"
    save_quantized(model, packed, CONFIG, folder)
    return folder


def greedy(model: AutoGPTQForCausalLM, n: int = 24) -> list[int]:
    ids = model.tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False,
                             pad_token_id=model.tokenizer.eos_token_id)
    return out[0].tolist()


@pytest.fixture(scope="module")
def whole(checkpoint):
    return AutoGPTQForCausalLM.from_quantized(checkpoint, fuse=False)


def test_cpu_and_disk_split_generates_the_same_tokens(checkpoint, whole, tmp_path):
    split = AutoGPTQForCausalLM.from_quantized(checkpoint, device_map=SPLIT, offload_folder=tmp_path / "off")
    assert split.model.hf_device_map == SPLIT
    layers = split.quant_linears()
    offloaded = [n for n, m in layers.items() if m.qweight.device.type == "meta"]
    assert offloaded == [n for n in layers if n.startswith(("model.layers.2.", "model.layers.3.", "model.layers.4."))]
    assert all(layers[n].binding is not None for n in layers if n not in offloaded)
    assert any((tmp_path / "off").glob("*.dat")), "the offloaded tensors were written to the offload folder"

    assert greedy(split) == greedy(whole)
    # Between calls an offloaded layer is unbound again with its tensors back on meta.
    for name in offloaded:
        assert layers[name].binding is None and layers[name].qweight.device.type == "meta"
    ids = torch.tensor([[1, 45, 99, 300, 7]])
    with torch.no_grad():
        torch.testing.assert_close(split(ids).logits, whole(ids).logits, rtol=0, atol=0)


def test_auto_map_with_max_memory_offloads_what_does_not_fit(checkpoint, whole, tmp_path):
    split = AutoGPTQForCausalLM.from_quantized(
        checkpoint, device_map="auto", max_memory={"cpu": "250KB"}, offload_folder=tmp_path / "off")
    places = split.model.hf_device_map
    assert set(places.values()) == {"cpu", "disk"}, places
    assert greedy(split, 12) == greedy(whole, 12)


def test_auto_map_without_limits_is_one_device_and_fused(checkpoint):
    model = AutoGPTQForCausalLM.from_quantized(checkpoint, device_map="auto")
    assert set(model.model.hf_device_map.values()) == {"cpu"}
    assert all(isinstance(m, QuantLinear) and m.binding is not None for m in model.quant_linears().values())


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(device_map=SPLIT), "pass offload_folder="),
    (dict(device_map={"model.embed_tokens": "cpu"}), "does not cover the model"),
    (dict(device_map={"": "meta"}), "keeps no weights anywhere"),
    (dict(device_map={"": "cuda:0"}), "no cuda device on this machine"),
    (dict(device_map={"": "warp drive"}), "is not a device"),
    (dict(device="cuda:0", device_map="auto"), "pass one of them"),
    (dict(max_memory={"cpu": "1GB"}), "pass device_map='auto' with it"),
    (dict(device_map="auto", max_memory={"cpu": "10KB"}, offload_folder="unused"), "whole model on 'disk'"),
])
def test_bad_maps_are_one_clear_line(checkpoint, kwargs, message):
    if "cuda" in str(kwargs) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(GPTQError, match=message) as info:
        AutoGPTQForCausalLM.from_quantized(checkpoint, **kwargs)
    assert "\n" not in str(info.value)


def test_input_device_is_the_embeddings_and_cpu_for_an_offloaded_one():
    """Token ids go where the input embedding is; an embedding offloaded to disk has its
    weight on meta and takes them on the CPU; a model without embeddings uses its first
    parameter, and one without parameters the CPU."""
    from gptq_core.placement import input_device

    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    assert input_device(model) == torch.device("cpu")
    model.model.embed_tokens.to("meta")
    assert model.get_input_embeddings().weight.device.type == "meta"
    assert input_device(model) == torch.device("cpu")
    assert input_device(torch.nn.Sequential(torch.nn.Linear(2, 2, device="meta"))) == torch.device("cpu")
    assert input_device(torch.nn.Sequential(torch.nn.Linear(2, 2))) == torch.device("cpu")
    assert input_device(torch.nn.Sequential()) == torch.device("cpu")
