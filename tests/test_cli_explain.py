"""`gptq backends explain` on the real stories260K model (an RTN checkpoint written by
save_quantized), and `gptq backends list --options`: per-layer paths for M = 1..4096, typed
options from the command line, grouping of identical layers."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptq_core import (BackendOptions, Capabilities, DispatchPolicy, QuantizeConfig, get_registry,
                       hookimpl, option, quantize_rtn)
from gptq_core.checkpoint import save_quantized
from gptq_core.cli import main
from gptq_core.cli.explain import group_layers
from gptq_core.format import PackedWeight
from gptq_core.policy import EXPLAIN_M
from gptq_core.testing import StubBackend

STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"
M_KEYS = [str(m) for m in EXPLAIN_M]


@pytest.fixture(autouse=True)
def _automatic_choice(monkeypatch):
    monkeypatch.delenv("GPTQ_BACKEND", raising=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 4-bit g32 round-to-nearest checkpoint of stories260K (35 quantized linears)."""
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    names = [f"model.layers.{i}.{part}" for i in range(5) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    packed = {n: quantize_rtn(model.get_submodule(n).weight, 4, 32, True) for n in names}
    folder = tmp_path_factory.mktemp("explain") / "stories-w4g32"
    save_quantized(model, packed, QuantizeConfig(bits=4, group_size=32), folder)
    return folder


@dataclass(frozen=True)
class TieredOptions(BackendOptions):
    small_m: int = option(8, "largest M served by the gemv path")


@dataclass(frozen=True, eq=False)
class TieredPrepared:
    weight: PackedWeight
    policy: DispatchPolicy

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.dequantize(dtype)


class Tiered(StubBackend):
    """A backend with three paths whose M thresholds come from its typed options."""

    def __init__(self) -> None:
        super().__init__("tiered", Capabilities(device_kinds=frozenset({"cpu"}), bits=(4,)))
        self.info = replace(self.info, options=TieredOptions)

    @hookimpl
    def gptq_pack(self, weight, device, spec, options):
        policy = DispatchPolicy.from_thresholds(
            (options.small_m, "gemv"), (256, "tiles"), (None, "dequant+matmul"))
        return TieredPrepared(weight, policy)


@pytest.fixture
def tiered():
    registry = get_registry()
    registry.register(Tiered())
    yield
    registry.unregister("tiered")


def explain(capsys, checkpoint: Path, *args: str) -> list[dict]:
    assert main(["backends", "explain", str(checkpoint), "--device", "cpu", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_cpu_layers_show_the_cpu_paths_for_every_m_and_torch_on_request(checkpoint, capsys):
    rows = explain(capsys, checkpoint)
    assert len(rows) == 35
    for row in rows:
        assert list(row["paths"]) == M_KEYS
        assert row["backend"] == "cpu", row["layer"]  # the CPU's default backend
        assert all(path.startswith("cpu:") for path in row["paths"].values()), row["paths"]
    rows = explain(capsys, checkpoint, "--backend", "torch")
    assert all(r["backend"] == "torch" for r in rows)
    assert all(p.startswith("torch") for r in rows for p in r["paths"].values())
    assert main(["backends", "explain", str(checkpoint), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["layers", "backend", *(f"M={m}" for m in EXPLAIN_M), "spec", "fusion"]
    down = next(line for line in lines if line.startswith("model.layers.[0-4].mlp.down_proj "))
    backend, *paths = down.split()[1:7]
    assert backend == "cpu" and all(p.startswith("cpu:") for p in paths) and "K=172 N=64" in down


def test_paths_follow_the_backends_policy_and_options(checkpoint, capsys, tiered):
    default = explain(capsys, checkpoint, "--backend", "tiered")
    assert {tuple(r["paths"].values()) for r in default} == {
        ("gemv", "tiles", "tiles", "tiles", "dequant+matmul")}
    assert default[0]["policy"] == "M<=8: gemv; M<=256: tiles; M>256: dequant+matmul"
    tuned = explain(capsys, checkpoint, "--backend", "tiered",
                    "--backend-option", "tiered.small_m=64")
    assert {tuple(r["paths"].values()) for r in tuned} == {
        ("gemv", "gemv", "gemv", "tiles", "dequant+matmul")}
    assert main(["backends", "explain", str(checkpoint), "--device", "cpu", "--backend", "tiered"]) == 0
    text = capsys.readouterr().out
    down = next(line for line in text.splitlines() if line.startswith("model.layers.[0-4].mlp.down_proj "))
    assert down.split()[1:7] == ["tiered", "gemv", "tiles", "tiles", "tiles", "dequant+matmul"]
    assert "paths: M<=8: gemv; M<=256: tiles; M>256: dequant+matmul" in text


def test_bad_backend_options_are_one_clear_error(checkpoint, capsys, tiered):
    base = ["backends", "explain", str(checkpoint), "--device", "cpu"]
    assert main([*base, "--backend-option", "tiered.smallm=4"]) == 2
    err = capsys.readouterr().err
    assert "backend 'tiered' has no option 'smallm' (its options: small_m)" in err
    assert main([*base, "--backend-option", "tiered.small_m=few"]) == 2
    assert "small_m='few' cannot be read as int" in capsys.readouterr().err
    assert main([*base, "--backend-option", "small_m=4"]) == 2
    assert "not of the form BACKEND.NAME=VALUE" in capsys.readouterr().err
    assert main([*base, "--backend-option", "nosuch.x=1"]) == 2
    assert "names backend 'nosuch', which is not installed" in capsys.readouterr().err


def test_list_options(capsys, tiered):
    assert main(["backends", "list", "--device", "cpu", "--options"]) == 0
    text = capsys.readouterr().out
    tiered_at = text.index("\ntiered:\n")
    assert "small_m  int   8        -    largest M served by the gemv path" in text[tiered_at:]
    assert "\ntorch: no options" in text
    assert main(["backends", "list", "--device", "cpu"]) == 0
    assert "small_m" not in capsys.readouterr().out
    assert main(["backends", "list", "--device", "cpu", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiered"]["options"] == [{"name": "small_m", "type": "int", "default": 8, "env": None,
                                          "help": "largest M served by the gemv path"}]
    assert rows["torch"]["options"] == []


def test_group_layers():
    names = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1, 2, 5) for p in ("q_proj", "k_proj")]
    names += ["model.layers.3.mlp.down_proj", "lm_head"]
    assert group_layers(names) == [
        "lm_head",
        "model.layers.[0-2,5].self_attn.{q_proj,k_proj}",
        "model.layers.3.mlp.down_proj",
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_checkpoint_shows_each_layers_path(tmp_path, capsys):
    """A 2-layer Llama of 7B-like widths, 4-bit g128 fp16: GPU backends serve every layer, and
    the table shows their paths per M (run with -s to see it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).half().eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    packed = {n: quantize_rtn(model.get_submodule(n).weight.float(), 4, 128, True) for n in names}
    save_quantized(model, packed, QuantizeConfig(bits=4, group_size=128), tmp_path / "ckpt")
    assert main(["backends", "explain", str(tmp_path / "ckpt"), "--device", "cuda", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(names) == 14
    for row in rows:
        assert list(row["paths"]) == M_KEYS and row["backend"] != "torch", row
    assert main(["backends", "explain", str(tmp_path / "ckpt"), "--device", "cuda"]) == 0
    with capsys.disabled():
        print("\n" + capsys.readouterr().out)
