"""The checkpoint manifest on the real stories260K model: written by every save, checked by
every load, so flipped bytes inside a tensor are a clear error instead of garbage text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptq_core import CheckpointError, QuantizeConfig, quantize_rtn
from gptq_core.auto import AutoGPTQForCausalLM
from gptq_core.checkpoint import load_quantized, save_quantized
from gptq_core.checkpoint.manifest import MANIFEST_FILE

STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"
CONFIG = QuantizeConfig(bits=4, group_size=32)
DOWN = "model.layers.2.mlp.down_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A 4-bit g32 RTN checkpoint of stories260K, sharded so one shard can be damaged alone."""
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    names = [f"model.layers.{i}.{lin}" for i in range(5)
             for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    packed = {n: quantize_rtn(model.get_submodule(n).weight, 4, 32, True) for n in names}
    folder = tmp_path_factory.mktemp("ckpt") / "stories-w4g32"
    save_quantized(model, packed, CONFIG, folder, max_shard_size="200KB")
    return folder


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


def flip_bytes(folder: Path, tensor: str, count: int = 8) -> str:
    """Invert ``count`` bytes in the middle of ``tensor``'s data; return the file's name."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    file = folder / index["weight_map"][tensor]
    data = bytearray(file.read_bytes())
    length = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + length])[tensor]["data_offsets"]
    middle = 8 + length + (start + end) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))
    return file.name


def test_save_writes_a_manifest_of_every_shard(saved):
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    shards = sorted(p.name for p in saved.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(manifest["files"]) == shards
    for name, entry in manifest["files"].items():
        assert entry["size"] == (saved / name).stat().st_size
        assert len(entry["sha256"]) == 64 and entry["tensors"]
    # the index (what peers read) does not mention it
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert MANIFEST_FILE not in index["weight_map"].values()


def test_flipped_bytes_in_a_tensor_are_an_error_naming_file_and_tensor(copy):
    file = flip_bytes(copy, f"{DOWN}.qweight")
    with pytest.raises(CheckpointError) as info:
        load_quantized(copy)
    message = str(info.value)
    assert file in message and f"'{DOWN}.qweight'" in message and "verify=False" in message
    assert "\n" not in message


def test_verify_false_skips_the_check(copy):
    flip_bytes(copy, f"{DOWN}.qweight")
    model = load_quantized(copy, verify=False)
    assert model.get_submodule(DOWN).qweight.shape == (22, 64)
    wrapper = AutoGPTQForCausalLM.from_quantized(copy, verify=False)
    assert wrapper.model.get_submodule(DOWN).qweight.shape == (22, 64)


def test_checkpoint_without_manifest_still_loads(copy):
    (copy / MANIFEST_FILE).unlink()
    load_quantized(copy)


def test_corrupt_manifest_is_a_clear_error(copy):
    (copy / MANIFEST_FILE).write_text("{half")
    with pytest.raises(CheckpointError, match=f"{MANIFEST_FILE}.*not a valid checkpoint manifest"):
        load_quantized(copy)


def test_resaving_a_loaded_checkpoint_writes_a_fresh_manifest(copy, tmp_path):
    model = load_quantized(copy, torch_dtype=torch.float32)
    save_quantized(model, None, CONFIG, tmp_path / "again")
    manifest = json.loads((tmp_path / "again" / MANIFEST_FILE).read_text())
    assert sorted(manifest["files"]) == ["model.safetensors"]
    load_quantized(tmp_path / "again")
