"""Inputs that used to give a wrong answer without a word (issue 12): each must now give a
clear error of the library's own type, or the right result."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gptq_core import CheckpointError, QuantizeConfig, quantize_rtn
from gptq_core.errors import FormatError, NotSupportedError
from gptq_core.format import PackedWeight, pack_weight
from gptq_core.quant_linear import QuantLinear
from gptq_core.testing import random_packed
from gptq_core.checkpoint import load_quantized, save_quantized
from gptq_core.cli.main import main
from gptq_core.models import decoder_layers, get_architecture, prepare_model_for_quantization, sequential_groups
from gptq_core.quantize.driver import quantize_model


STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"


@pytest.fixture(scope="module")
def stories() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


def save_rtn(model: torch.nn.Module, config: QuantizeConfig, out: Path) -> Path:
    """A real stories260K checkpoint, every decoder linear quantized by RTN."""
    packed = {
        name: quantize_rtn(mod.weight, config.bits, config.group_size, config.sym,
                           zero_format=config.zero_format)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and ".layers." in name
    }
    return save_quantized(model, packed, config, out)


def relabel(out: Path, checkpoint_format: str) -> None:
    """Rewrite the checkpoint_format of every config file, as a careless converter would."""
    for path in (out / "quantize_config.json", out / "config.json"):
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        section = data.get("quantization_config", data) if path.name == "config.json" else data
        if path.name == "config.json" and "quantization_config" not in data:
            continue
        section["checkpoint_format"] = section["format"] = checkpoint_format
        path.write_text(json.dumps(data))


# ---------------------------------------------------------------- (1) zero-point convention
def test_gptq_asymmetric_v1_labelled_v2_is_refused(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    cfg = QuantizeConfig(bits=4, group_size=32, sym=False)
    arch = get_architecture(model)
    prepare_model_for_quantization(model, arch)
    samples = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    packed = quantize_model(model, samples, cfg, decoder_layers(model, arch),
                            lambda index, layer: sequential_groups(layer, arch), device="cpu", progress=False)
    out = save_quantized(model, packed, cfg, tmp_path / "ck")
    load_quantized(out, torch_dtype=torch.float32)  # correctly labelled: no false alarm
    relabel(out, "gptq_v2")
    with pytest.raises(CheckpointError, match=r"v1 zero points"):
        load_quantized(out, torch_dtype=torch.float32)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (2, -1)])
def test_asymmetric_v1_labelled_v2_is_refused(stories, tmp_path, bits, group_size):
    out = save_rtn(stories, QuantizeConfig(bits=bits, group_size=group_size, sym=False), tmp_path / "ck")
    relabel(out, "gptq_v2")
    with pytest.raises(CheckpointError, match=r"qzeros.*v1 zero points.*checkpoint_format.*\"gptq\""):
        load_quantized(out, torch_dtype=torch.float32)


def test_asymmetric_v2_labelled_v1_is_refused(stories, tmp_path):
    cfg = QuantizeConfig(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2")
    out = save_rtn(stories, cfg, tmp_path / "ck")
    relabel(out, "gptq")
    with pytest.raises(CheckpointError, match=r"qzeros.*v2 zero points.*\"gptq_v2\""):
        load_quantized(out, torch_dtype=torch.float32)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (2, -1), (8, 32)])
def test_correctly_labelled_asymmetric_checkpoints_load(stories, tmp_path, checkpoint_format, bits, group_size):
    cfg = QuantizeConfig(bits=bits, group_size=group_size, sym=False, checkpoint_format=checkpoint_format)
    model = load_quantized(save_rtn(stories, cfg, tmp_path / "ck"), torch_dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.zero_format == cfg.zero_format


# ---------------------------------------------------------------- (2) packed-weight values
def _bad_g_idx(pw: PackedWeight, value: int) -> torch.Tensor:
    g = pw.g_idx.clone()
    g[3] = value
    return g




@pytest.mark.parametrize("value", [-1, 2])  # K=64, group_size=32: groups 0 and 1 only
def test_packed_weight_rejects_g_idx_outside_its_groups(value):
    pw = random_packed(4, 32, in_features=64, out_features=16)
    with pytest.raises(FormatError, match=rf"g_idx values must lie in \[0, 1\], found .*{value}"):
        PackedWeight(**{**_fields(pw), "g_idx": _bad_g_idx(pw, value)})
    with pytest.raises(FormatError, match="g_idx values must lie in"):
        pack_weight(pw.unpack_qweight().t().int(), pw.scales, pw.zeros(), bits=4, group_size=32,
                    g_idx=_bad_g_idx(pw, value))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_packed_weight_rejects_non_finite_scales(bad):
    pw = random_packed(4, 32, in_features=64, out_features=16)
    scales = pw.scales.clone()
    scales[1, 5] = bad
    with pytest.raises(FormatError, match=r"scales contain NaN or Inf \(layer K=64, N=16"):
        pw.replace(scales=scales)
    with pytest.raises(FormatError, match="scales contain NaN or Inf"):
        pack_weight(pw.unpack_qweight().t().int(), scales, pw.zeros(), bits=4, group_size=32)


def test_quant_linear_rejects_a_packed_weight_corrupted_after_construction():
    """Tensors are mutable: a weight changed in place is caught when the layer binds."""
    pw = random_packed(4, 32, in_features=64, out_features=16)
    pw.g_idx[3] = -1
    with pytest.raises(FormatError, match="g_idx values must lie in"):
        QuantLinear.from_packed(pw, act_dtype=torch.float32)
    pw = random_packed(4, 32, in_features=64, out_features=16)
    pw.scales[0, 0] = float("nan")
    layer = QuantLinear.from_packed(pw, act_dtype=None)
    with pytest.raises(FormatError, match="scales contain NaN"):
        layer(torch.randn(2, 64))


def _fields(pw: PackedWeight) -> dict:
    return {f.name: getattr(pw, f.name) for f in dataclasses.fields(pw)}


@pytest.mark.parametrize("field", ["g_idx", "scales"])
def test_loading_names_the_layer_of_a_corrupt_value(stories, tmp_path, field):
    out = save_rtn(stories, QuantizeConfig(bits=4, group_size=32, desc_act=True), tmp_path / "ck")
    shard = out / "model.safetensors"
    tensors = load_file(shard)
    key = f"model.layers.1.mlp.up_proj.{field}"
    t = tensors[key].clone()
    t.view(-1)[0] = 7 if field == "g_idx" else float("nan")
    tensors[key] = t
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"'{key}' in model.safetensors"):
        load_quantized(out, torch_dtype=torch.float32)


# ---------------------------------------------------------------- (3) QuantLinear arguments
@pytest.mark.parametrize(
    "change,message",
    [
        ({"group_size": 0}, "group_size=0 is invalid"),
        ({"group_size": -5}, "group_size=-5 is invalid"),
        ({"in_features": 0}, "in_features must be a positive integer"),
        ({"out_features": -3}, "out_features must be a positive integer"),
        ({"zero_format": "v3"}, "zero_format='v3' is unknown"),
    ],
)
def test_quant_linear_constructor_rejects_bad_arguments(change, message):
    args = {"bits": 4, "group_size": 32, "in_features": 64, "out_features": 16, **change}
    with pytest.raises(FormatError, match=message):
        QuantLinear(**args)


def test_quant_linear_rejects_a_0d_input():
    layer = QuantLinear.from_packed(random_packed(4, 32, in_features=64, out_features=16),
                                    act_dtype=torch.float32)
    with pytest.raises(NotSupportedError, match="0-d tensor"):
        layer(torch.tensor(1.0))
    assert layer(torch.randn(3, 64)).shape == (3, 16)


# ---------------------------------------------------------------- (4) generate on NaN weights
def test_generate_on_nan_weights_is_an_error_like_eval(tmp_path, capsys):
    model_dir = tmp_path / "nan"
    shutil.copytree(STORIES, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.input_layernorm.weight"][0] = float("nan")
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    code = main(["generate", str(model_dir), "--prompt", "Once upon a time", "--max-new-tokens", "4",
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2
    assert "gptq generate: error: the model produced NaN/Inf logits" in captured.err
    assert "Once upon a time" not in captured.out  # nothing printed as if it had worked


def test_generate_on_finite_weights_still_prints_text(capsys):
    code = main(["generate", str(STORIES), "--prompt", "Once upon a time", "--max-new-tokens", "4",
                 "--device", "cpu"])
    assert code == 0
    assert capsys.readouterr().out.startswith("Once upon a time")
