"""save_quantized / load_quantized on the real stories260K model: the format, sharding,
atomic writes, and a clear CheckpointError naming file and tensor for every broken checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gptq_core import CheckpointError, QuantizeConfig, quantize_rtn
from gptq_core.checkpoint import load_quantized, read_quantize_config, save_quantized
from gptq_core.quant_linear import QuantLinear
from gptq_core.testing import random_packed


STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CONFIG = QuantizeConfig(bits=4, group_size=32)


def float_model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


def rtn_packed(model, config: QuantizeConfig) -> dict:
    names = [f"model.layers.{i}.{lin}" for i in range(5) for lin in LINEARS]
    return {n: quantize_rtn(model.get_submodule(n).weight, config.bits, config.group_size, config.sym,
                            zero_format=config.zero_format) for n in names}


def reference_model(model, packed) -> torch.nn.Module:
    """Float64 model computing exactly what the checkpoint holds (fp16 non-quantized weights)."""
    ref = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
        ref = ref.double()
        for name, pw in packed.items():
            ref.get_submodule(name).weight.copy_(pw.dequantize(torch.float64).t())
    return ref


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, packed, reference float64 model) of a 4-bit g32 RTN checkpoint of stories260K."""
    model = float_model()
    packed = rtn_packed(model, CONFIG)
    folder = tmp_path_factory.mktemp("ckpt") / "stories-w4g32"
    save_quantized(model, packed, CONFIG, folder)
    return folder, packed, reference_model(model, packed)


@pytest.fixture
def copy_of(saved, tmp_path):
    def make(name: str = "copy") -> Path:
        target = tmp_path / name
        shutil.copytree(saved[0], target)
        return target
    return make


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids() if ids is None else ids).logits.double()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------- the format
def test_folder_holds_the_gptq_format(saved):
    folder, packed, _ = saved
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "quantize_config.json", "model.safetensors", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    for name in ("tokenizer.json", "generation_config.json"):
        assert (folder / name).read_bytes() == (STORIES / name).read_bytes()
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == CONFIG.to_dict()
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((folder / "quantize_config.json").read_text()) == CONFIG.to_dict()
    tensors = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied to the embeddings, stored once
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert tensors["model.norm.weight"].dtype == torch.float16
    q = "model.layers.2.mlp.down_proj"  # K=172: 6 groups of 32, the last one partial
    assert tensors[f"{q}.qweight"].dtype == torch.int32 and tensors[f"{q}.qweight"].shape == (22, 64)
    assert tensors[f"{q}.qzeros"].shape == (6, 8) and tensors[f"{q}.scales"].shape == (6, 64)
    assert torch.equal(tensors[f"{q}.qweight"], packed[q].qweight)
    assert (tensors[f"{q}.qzeros"] == 0x77777777).all()  # symmetric 4-bit v1


def test_round_trip_matches_float64_reference(saved):
    folder, packed, ref = saved
    model = load_quantized(folder, device="cpu", torch_dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(packed)
    assert all(m.binding is not None and m.binding.backend.name for m in layers.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert relative_error(logits(model), logits(ref)) < 1e-5
    assert model.quantize_config.bits == 4 and model.config.quantization_config["group_size"] == 32


def test_sharded_checkpoint_has_an_index_and_loads_the_same(saved, tmp_path):
    folder, packed, _ = saved
    single = load_quantized(folder, torch_dtype=torch.float32)
    save_quantized(single, None, CONFIG, tmp_path / "sharded", max_shard_size="60KB")
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    stored = {}
    for f in files:
        part = load_file(tmp_path / "sharded" / f)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 60_000 or len(part) == 1
        stored.update({k: f for k in part})
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for f in files for t in load_file(tmp_path / "sharded" / f).values())
    again = load_quantized(tmp_path / "sharded", torch_dtype=torch.float32)
    assert torch.equal(logits(again), logits(single))


def test_v2_checkpoint_stores_the_zero_itself(saved, tmp_path):
    folder, packed, ref = saved
    v2 = CONFIG.replace(checkpoint_format="gptq_v2")
    save_quantized(float_model(), packed, v2, tmp_path / "v2")
    tensors = load_file(tmp_path / "v2" / "model.safetensors")
    assert (tensors["model.layers.0.self_attn.q_proj.qzeros"] == -0x77777778).all()  # 0x88888888
    assert json.loads((tmp_path / "v2" / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    model = load_quantized(tmp_path / "v2", torch_dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.zero_format == "v2"
    assert relative_error(logits(model), logits(ref)) < 1e-5


def test_asym_v2_zero_points_that_v1_cannot_store(tmp_path):
    model = float_model()
    cfg = QuantizeConfig(bits=3, group_size=64, sym=False, checkpoint_format="gptq_v2")
    packed = {}
    for i, name in enumerate(rtn_packed(model, QuantizeConfig(bits=3, group_size=64))):
        lin = model.get_submodule(name)
        packed[name] = random_packed(3, 64, sym=False, in_features=lin.in_features,
                                     out_features=lin.out_features, seed=i, zero_format="v2")
    assert any(bool((pw.zeros() == 0).any()) for pw in packed.values())
    with pytest.raises(CheckpointError, match="gptq_v2|v1"):
        save_quantized(model, packed, cfg.replace(checkpoint_format="gptq"), tmp_path / "v1")
    assert not (tmp_path / "v1").exists()
    save_quantized(model, packed, cfg, tmp_path / "v2")
    loaded = load_quantized(tmp_path / "v2", torch_dtype=torch.float32)
    assert relative_error(logits(loaded), logits(reference_model(model, packed))) < 1e-5


# ---------------------------------------------------------------------------- atomic writes
def test_never_clobbers_and_overwrites_only_when_asked(saved, tmp_path):
    folder, packed, _ = saved
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="overwrite"):
        save_quantized(float_model(), packed, CONFIG, target)
    assert (target / "precious.txt").read_text() == "keep me"
    save_quantized(float_model(), packed, CONFIG, target, overwrite=True)
    assert not (target / "precious.txt").exists() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


class ExplodingTokenizer:
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{half")
        raise OSError("disk full")


def test_a_failed_write_leaves_nothing_behind(saved, tmp_path):
    _, packed, _ = saved
    with pytest.raises(OSError, match="disk full"):
        save_quantized(float_model(), packed, CONFIG, tmp_path / "out", tokenizer=ExplodingTokenizer())
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- broken checkpoints
def rewrite_tensors(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def rewrite_configs(folder: Path, **changes) -> None:
    for name in ("quantize_config.json", "config.json"):
        data = json.loads((folder / name).read_text())
        target = data if name == "quantize_config.json" else data["quantization_config"]
        target.update(changes)
        (folder / name).write_text(json.dumps(data))


DOWN = "model.layers.1.mlp.down_proj"


def _drop(t):
    del t[f"{DOWN}.scales"]


def _extra(t):
    t["model.layers.0.self_attn.rotary_scale.weight"] = torch.ones(3)


def _nan(t):
    t[f"{DOWN}.scales"][2, 5] = float("nan")


def _float_qweight(t):
    t[f"{DOWN}.qweight"] = t[f"{DOWN}.qweight"].float()


def _nonzero_bias(t):
    t[f"{DOWN}.bias"] = torch.full((64,), 0.5, dtype=torch.float16)


def _shuffled_g_idx(t):
    t[f"{DOWN}.g_idx"] = t[f"{DOWN}.g_idx"].flip(0).contiguous()


def _asym_zeros(t):
    t[f"{DOWN}.qzeros"][0, 0] = 0x12345677


def _g_idx_out_of_range(t):
    t[f"{DOWN}.g_idx"][4] = 6


TENSOR_BREAKS = {
    "missing tensor": (_drop, [f"'{DOWN}.scales'", "lacks"]),
    "unexpected tensor": (_extra, ["model.layers.0.self_attn.rotary_scale.weight", "model.safetensors"]),
    "nan scales": (_nan, [f"'{DOWN}.scales'", "model.safetensors", "NaN"]),
    "float qweight": (_float_qweight, [f"'{DOWN}.qweight'", "int32"]),
    "non-zero bias on a bias-free layer": (_nonzero_bias, [f"'{DOWN}.bias'", "non-zero"]),
    "act-order g_idx, desc_act false": (_shuffled_g_idx, [f"'{DOWN}.g_idx'", "desc_act"]),
    "asymmetric zeros, sym true": (_asym_zeros, [f"'{DOWN}.qzeros'", "sym"]),
    "g_idx out of range": (_g_idx_out_of_range, [f"'{DOWN}.g_idx'", "groups"]),
}


@pytest.mark.parametrize("case", sorted(TENSOR_BREAKS))
def test_broken_tensors_get_a_clear_error(copy_of, case):
    change, words = TENSOR_BREAKS[case]
    folder = copy_of()
    rewrite_tensors(folder, change)
    with pytest.raises(CheckpointError) as info:
        load_quantized(folder)
    for word in words:
        assert word in str(info.value), f"{case}: {info.value}"


@pytest.mark.parametrize("changes,words", [
    ({"bits": 8}, ["bits=8", "match bits=4", "qweight", "model.safetensors"]),
    ({"group_size": 64}, ["group_size=64", "match group_size=32"]),
    ({"bits": 3}, ["bits=3", "match bits=4"]),
])
def test_config_contradicting_tensors(copy_of, changes, words):
    folder = copy_of()
    rewrite_configs(folder, **changes)
    with pytest.raises(CheckpointError) as info:
        load_quantized(folder)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_all_zero_biases_of_bias_free_layers_are_accepted(copy_of, saved):
    folder = copy_of()
    rewrite_tensors(folder, lambda t: t.update({f"{DOWN}.bias": torch.zeros(64, dtype=torch.float16)}))
    model = load_quantized(folder, torch_dtype=torch.float32)
    assert model.get_submodule(DOWN).bias is None
    assert relative_error(logits(model), logits(saved[2])) < 1e-5


def test_corrupt_and_missing_files(copy_of, tmp_path):
    folder = copy_of("truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        load_quantized(folder)

    folder = copy_of("sharded")
    model = load_quantized(folder, torch_dtype=torch.float32)
    save_quantized(model, None, CONFIG, tmp_path / "sharded2", max_shard_size="100KB")
    (tmp_path / "sharded2" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors.*missing"):
        load_quantized(tmp_path / "sharded2")

    folder = copy_of("badjson")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json.*not valid JSON"):
        load_quantized(folder)


def test_config_files_must_agree(copy_of):
    folder = copy_of()
    data = json.loads((folder / "quantize_config.json").read_text())
    data["desc_act"] = True
    (folder / "quantize_config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="desc_act.*agree"):
        read_quantize_config(folder)


def test_not_a_gptq_checkpoint_and_pickle_only(tmp_path):
    with pytest.raises(CheckpointError, match="not a GPTQ checkpoint"):
        load_quantized(STORIES)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_quantized(tmp_path / "nowhere")
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(STORIES / "config.json", folder)
    rewrite = json.loads((folder / "config.json").read_text())
    rewrite["quantization_config"] = CONFIG.to_dict()
    (folder / "config.json").write_text(json.dumps(rewrite))
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")  # would run if unpickled
    with pytest.raises(CheckpointError, match="pickle"):
        load_quantized(folder)
    assert not marker.exists()


def test_remote_code_never_runs_without_trust(copy_of, tmp_path):
    folder = copy_of()
    marker = tmp_path / "code-ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (folder / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evil_llama"
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        load_quantized(folder)
    assert not marker.exists()
