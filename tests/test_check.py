"""``gptq check`` and the save-time rules on real checkpoints this project writes.

A tiny Llama with linear shapes that every reader's kernels take (multiples of 128 and 64)
is quantized with the real GPTQ quantizer (gptq_core.quantize.quantize_linear, on activations
whose channel scales differ so act-order really permutes) and saved with save_quantized, once
per variant; the verdicts must be the ones the rules (and the matrix of
docs/COMPATIBILITY.md) give. stories260K (in_features 172 in down_proj) shows the shape rules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptq_core import QuantizeConfig, quantize_rtn
from gptq_core.checkpoint import load_quantized, save_quantized
from gptq_core.cli.main import main
from gptq_core.compat import (
    CHECKS, READER_KEYS, READERS, RULES, check_checkpoint, facts_of_folder, judge_all,
)
from gptq_core.compat.matrix import VARIANTS, markdown
from gptq_core.quantize.gptq import quantize_linear
from gptq_core.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "gptq_core" / "data" / "stories260K"
DOC = ROOT / "docs" / "COMPATIBILITY.md"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def clean_model() -> torch.nn.Module:
    """One decoder layer; linears 128->128, 128->64 (k/v), 128->256, 256->128."""
    return tiny_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def gptq_packed(model: torch.nn.Module, config: QuantizeConfig) -> dict:
    """Every decoder linear through GPTQ on inputs whose channels differ in scale."""
    gen = torch.Generator().manual_seed(0)
    packed = {}
    for lin in LINEARS:
        name = f"model.layers.0.{lin}"
        linear = model.get_submodule(name)
        k = linear.in_features
        scale = torch.linspace(0.1, 3.0, k)[torch.randperm(k, generator=gen)]
        inputs = torch.randn(64, k, generator=gen) * scale
        packed[name], _ = quantize_linear(linear, config=config, inputs=inputs)
    return packed


#: variant -> (settings, matrix column it stands for, readers that refuse it)
VARIANT_CASES = {
    "sym": (dict(), "4-bit g128 sym", set()),
    "asym": (dict(sym=False), "asym", {"gptqmodel", "vllm", "sglang"}),
    "act-order": (dict(desc_act=True), "act-order", {"vllm"}),
    "static-groups": (dict(desc_act=True, static_groups=True), "act-order + static groups", set()),
    "v2": (dict(checkpoint_format="gptq_v2"), "v2 sym", {"autogptq"}),
    "v2-asym": (dict(checkpoint_format="gptq_v2", sym=False), "v2 asym", {"autogptq", "vllm", "sglang", "tgi"}),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    root = tmp_path_factory.mktemp("check")
    for variant, (settings, _, _) in VARIANT_CASES.items():
        config = QuantizeConfig(bits=4, group_size=128, **settings)
        model = clean_model()
        folders[variant] = save_quantized(model, gptq_packed(model, config), config, root / variant)
    return folders


@pytest.mark.parametrize("variant", sorted(VARIANT_CASES))
def test_verdicts_match_the_rules_and_the_matrix(written, variant):
    settings, column, refused = VARIANT_CASES[variant]
    verdicts = check_checkpoint(written[variant])
    assert {v.reader.key for v in verdicts if not v.loads} == refused
    facts = next(v.facts for v in VARIANTS if v.title == column)
    assert [v.loads for v in verdicts] == [v.loads for v in judge_all(facts)]
    for v in verdicts:
        assert v.loads == (not v.reasons)


def test_act_order_really_permutes_and_static_groups_writes_desc_act_false(written):
    act = facts_of_folder(written["act-order"])
    permuted = {layer.name for layer in act.layers if not layer.natural_g_idx}
    assert act.desc_act and "model.layers.0.mlp.down_proj" in permuted  # K=256: two groups
    static = written["static-groups"]
    for file in ("quantize_config.json", "config.json"):
        raw = json.loads((static / file).read_text())
        raw = raw.get("quantization_config", raw)
        assert raw["desc_act"] is False and raw["static_groups"] is True
    model = load_quantized(static)  # the config agrees with the tensors
    assert not any(pw.desc_act for pw in (m.packed() for m in model.modules() if hasattr(m, "packed")))


def test_desc_act_true_with_natural_g_idx_gets_the_hint(written, tmp_path):
    import shutil

    folder = tmp_path / "relabelled"
    shutil.copytree(written["static-groups"], folder)
    for file in ("quantize_config.json", "config.json"):
        raw = json.loads((folder / file).read_text())
        target = raw.get("quantization_config", raw)
        target["desc_act"] = True
        (folder / file).write_text(json.dumps(raw))
    (folder / "gptq_manifest.json").unlink(missing_ok=True)
    vllm = next(v for v in check_checkpoint(folder) if v.reader.key == "vllm")
    assert not vllm.loads
    assert "could say desc_act: false" in vllm.reasons[0].found


def test_asym_v1_made_by_gptqmodel_loads_in_gptqmodel(written):
    facts = facts_of_folder(written["asym"])
    from dataclasses import replace

    gptqmodel = [v for v in judge_all(replace(facts, quantizers=("gptqmodel:2.0.0",)))
                 if v.reader.key == "gptqmodel"]
    assert gptqmodel[0].loads


def test_stories260k_shapes_are_refused_by_the_shape_rules(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    config = QuantizeConfig(bits=4, group_size=32)
    packed = {f"model.layers.{i}.{lin}": quantize_rtn(model.get_submodule(f"model.layers.{i}.{lin}").weight, 4, 32)
              for i in range(5) for lin in LINEARS}
    folder = save_quantized(model, packed, config, tmp_path / "stories")
    verdicts = {v.reader.key: v for v in check_checkpoint(folder)}
    assert {k for k, v in verdicts.items() if not v.loads} == {"autogptq", "vllm", "sglang", "tgi", "exllamav2"}
    assert any("in_features=172" in r.found for r in verdicts["vllm"].reasons)
    assert any("more layers" in r.found for r in verdicts["sglang"].reasons)


def test_cli_json_gives_reader_loads_reasons_per_reader(written, capsys):
    assert main(["check", str(written["asym"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    readers = out["readers"]
    assert [r["key"] for r in readers] == list(READER_KEYS)
    for r in readers:
        assert {"reader", "loads", "reasons"} <= set(r) and isinstance(r["loads"], bool)
    vllm = next(r for r in readers if r["key"] == "vllm")
    assert vllm["loads"] is False and any("sym=false" in reason for reason in vllm["reasons"])
    assert out["settings"]["sym"] is False


def test_cli_text_and_require(written, capsys):
    assert main(["check", str(written["act-order"])]) == 0
    text = capsys.readouterr().out
    assert "vLLM 0.33.0: refuses" in text and "desc_act=true" in text
    assert main(["check", str(written["act-order"]), "--require", "vllm"]) == 1
    assert main(["check", str(written["act-order"]), "--require", "tgi"]) == 0
    capsys.readouterr()
    assert main(["check", str(written["act-order"]), "--require", "nosuch"]) == 2
    assert "unknown reader" in capsys.readouterr().err


def test_save_warns_once_when_vllm_refuses(caplog, tmp_path):
    model = clean_model()
    config = QuantizeConfig(bits=4, group_size=128, sym=False)
    with caplog.at_level("WARNING", logger="gptq_core"):
        save_quantized(model, gptq_packed(model, config), config, tmp_path / "asym")
    lines = [r for r in caplog.records if "vLLM" in r.getMessage()]
    assert len(lines) == 1 and "sym=false" in lines[0].getMessage()
    assert "gptq check" in lines[0].getMessage()
    caplog.clear()
    config = QuantizeConfig(bits=4, group_size=128)
    with caplog.at_level("WARNING", logger="gptq_core"):
        save_quantized(model, gptq_packed(model, config), config, tmp_path / "sym")
    assert not [r for r in caplog.records if "vLLM" in r.getMessage()]


def test_the_rules_table_is_well_formed():
    keys = {r.key for r in READERS}
    for rule in RULES:
        assert rule.reader in keys and rule.check in CHECKS and rule.source and rule.reason and rule.fix
    assert {r.reader for r in RULES} == keys


def test_the_documented_matrix_is_the_computed_one():
    assert markdown() in DOC.read_text()
    assert markdown() in (ROOT / "README.md").read_text()


def test_the_doc_cites_every_rule_with_its_file_and_version():
    doc = DOC.read_text()
    for rule in RULES:
        assert rule.source in doc, rule
    for r in READERS:
        assert r.version in doc, r
