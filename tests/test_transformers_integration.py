"""Plain transformers on gptq-core checkpoints: after ``import gptq_core``,
``AutoModelForCausalLM.from_pretrained`` builds QuantLinear layers bound by gptq-core's
selector (no optimum, no gptqmodel), with logits equal to ``from_quantized``'s, across a
cpu/disk device map too; ``save_pretrained`` writes save_quantized's tensors and config;
broken checkpoints fail with the same errors as ``from_quantized``."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

import gptq_core
from gptq_core import AutoGPTQForCausalLM, CheckpointError, GPTQError, QuantizeConfig, quantize_rtn
from gptq_core.checkpoint import save_quantized
from gptq_core.integrations import transformers as integration
from gptq_core.quant_linear import QuantLinear

STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"
SAMPLE = STORIES.parent / "text" / "tinystories-sample.txt"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
IDS = torch.tensor([[1, 45, 99, 300, 7, 12, 480], [1, 3, 260, 8, 77, 140, 5]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """An asymmetric 4-bit g32 round-to-nearest checkpoint of stories260K from save_quantized."""
    config = QuantizeConfig(bits=4, group_size=32, sym=False)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    packed = {f"model.layers.{i}.{lin}": quantize_rtn(model.get_submodule(f"model.layers.{i}.{lin}").weight,
                                                      4, 32, False)
              for i in range(5) for lin in LINEARS}
    return save_quantized(model, packed, config, tmp_path_factory.mktemp("tf") / "stories-w4g32-asym")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_neither_optimum_nor_gptqmodel_is_installed():
    """What this file proves holds without the peers' packages transformers' own path needs."""
    assert importlib.util.find_spec("optimum") is None and importlib.util.find_spec("gptqmodel") is None


def test_import_registers_without_importing_transformers_quantizers():
    code = ("import sys, gptq_core\n"
            "print('transformers.quantizers.auto' in sys.modules)\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m\n"
            "print(m['gptq'].__module__, m['gptq'].__name__)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "gptq_core.integrations.transformers", "GptqCoreHfQuantizer"]


def test_from_pretrained_equals_from_quantized(saved):
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) >= 35 and all(m.binding is not None for m in layers)
    assert not any(isinstance(m, torch.nn.Linear) and m is not model.lm_head for m in model.modules())
    assert isinstance(model.config.quantization_config, integration.GptqCoreConfig)
    assert model.quantize_config == gptq_core.checkpoint.read_quantize_config(saved)
    reference = AutoGPTQForCausalLM.from_quantized(saved, torch_dtype=torch.float32)
    assert torch.equal(logits(model), logits(reference))


def test_default_dtype_and_generate(saved):
    """No dtype: transformers takes the checkpoint's (float16); from_quantized agrees in fp16."""
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert model.dtype == torch.float16
    reference = AutoGPTQForCausalLM.from_quantized(saved, torch_dtype=torch.float16)
    assert torch.equal(logits(model), logits(reference))
    out = model.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    assert out[0].tolist() == reference.generate(input_ids=IDS[:1], max_new_tokens=6, do_sample=False)[0].tolist()


def test_device_map_split_between_cpu_and_disk(saved, tmp_path):
    pytest.importorskip("accelerate")
    split = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
             "model.layers.2": "disk", "model.layers.3": "cpu", "model.layers.4": "disk",
             "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32, device_map=split,
                                                 offload_folder=tmp_path / "off", offload_buffers=True)
    offloaded = model.model.layers[1].mlp.down_proj
    assert isinstance(offloaded, QuantLinear) and offloaded.qweight.device.type == "meta"
    whole = AutoGPTQForCausalLM.from_quantized(saved, torch_dtype=torch.float32, fuse=False)
    torch.testing.assert_close(logits(model), logits(whole), rtol=0, atol=0)
    assert (model.generate(IDS[:1], max_new_tokens=8, do_sample=False).tolist()
            == whole.generate(input_ids=IDS[:1], max_new_tokens=8, do_sample=False).tolist())
    assert offloaded.binding is None and offloaded.qweight.device.type == "meta"


def test_save_pretrained_writes_what_save_quantized_writes(saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    model.save_pretrained(tmp_path / "resaved")
    ours, theirs = load_file(saved / "model.safetensors"), load_file(tmp_path / "resaved" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        if key.rpartition(".")[2] in ("qweight", "qzeros", "scales", "g_idx"):
            assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), key
        else:  # the float model's tensors, written in its dtype (float32 here, fp16 in ours)
            assert torch.equal(theirs[key].half(), value), key
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert config == json.loads((saved / "config.json").read_text())["quantization_config"]
    again = AutoGPTQForCausalLM.from_quantized(tmp_path / "resaved", torch_dtype=torch.float32)
    reference = AutoGPTQForCausalLM.from_quantized(saved, torch_dtype=torch.float32)
    torch.testing.assert_close(logits(again), logits(reference), rtol=1e-3, atol=1e-3)


def test_broken_checkpoint_fails_with_from_quantizeds_error(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    for name in ("config.json", "quantize_config.json"):
        raw = json.loads((broken / name).read_text())
        (raw.get("quantization_config") or raw)["bits"] = 8
        (broken / name).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"qweight' in model.safetensors has shape \[22, 64\], but the config \(bits=8"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_outside_the_supported_range_is_one_line():
    assert integration.is_supported(Version("5.14.1")) and not integration.is_supported(Version("5.12.1"))
    assert not integration.is_supported(Version("4.57.3"))
    assert not integration.is_supported(Version("6.0.0"))
    with pytest.raises(GPTQError, match=r"supports transformers>=5.14,<6, this is [0-9.]+; install") as info:
        integration.UnsupportedTransformersQuantizer(GPTQConfig(bits=4))
    assert "\n" not in str(info.value)
    assert "4.57.3" in integration.unsupported_message(Version("4.57.3"))


def test_gptq_config_of_transformers_reads_into_quantize_config():
    config = integration.quantize_config_of(GPTQConfig(bits=8, group_size=64, desc_act=True, sym=False))
    assert (config.bits, config.group_size, config.desc_act, config.sym) == (8, 64, True, False)


@pytest.mark.slow
def test_gptq_config_with_dataset_quantizes_through_from_pretrained(tmp_path):
    texts = [line for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()][:24]
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(
        STORIES, dtype=torch.float32,
        quantization_config=GPTQConfig(bits=4, group_size=32, dataset=texts, tokenizer=tok))
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    model.save_pretrained(tmp_path / "q")
    loaded = AutoGPTQForCausalLM.from_quantized(tmp_path / "q", torch_dtype=torch.float32, fuse=False)
    assert loaded.quantize_config.bits == 4
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    with pytest.raises(GPTQError, match="dataset="):
        AutoModelForCausalLM.from_pretrained(STORIES, quantization_config=GPTQConfig(bits=4, tokenizer=tok))
