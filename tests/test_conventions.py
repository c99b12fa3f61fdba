"""Conventions shared with the ecosystem: peers' quantization configs, GPTQModel's backend
names, the CLI's logging flags, the `hf download` hint and the distributions list.

The transformers config is made by the installed transformers; the others are written as
their code writes them (the file each comes from is named above each dict).
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from transformers import GPTQConfig
from transformers.utils.quantization_config import QuantizationMethod

from gptq_core import FormatError, QuantizeConfig
from gptq_core.checkpoint.configs import check_model_dir
from gptq_core.cli.main import build_parser, configure_logging, log_level, main
from gptq_core.errors import CheckpointError
from gptq_core.registry import BACKEND_ALIASES, BACKEND_ENV, get_registry, names_from_env
from gptq_core.selector import parse_backend_options, parse_preference

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ peers' configs
def test_transformers_gptqconfig_to_dict_with_its_enum():
    raw = GPTQConfig(bits=4, group_size=64, desc_act=True, sym=False, damp_percent=0.05).to_dict()
    assert isinstance(raw["quant_method"], QuantizationMethod)
    cfg = QuantizeConfig.from_dict(raw)
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym, cfg.damp_percent) == (4, 64, True, False, 0.05)
    assert cfg.checkpoint_format == "gptq"
    v2 = QuantizeConfig.from_dict(GPTQConfig(bits=3, group_size=-1, format="gptq_v2").to_dict())
    assert (v2.bits, v2.group_size, v2.checkpoint_format) == (3, -1, "gptq_v2")


def test_optimum_quantizer_to_dict():
    # optimum/gptq/quantizer.py GPTQQuantizer.to_dict: its serialization_keys, quant_method
    # being transformers' enum, meta.quantizer filled in.
    raw = {
        "bits": 8, "dataset": ["some text"], "group_size": 32, "damp_percent": 0.1, "desc_act": False,
        "act_group_aware": True, "sym": True, "true_sequential": True,
        "quant_method": QuantizationMethod.GPTQ, "modules_in_block_to_quantize": None,
        "format": "gptq", "meta": {"quantizer": ["optimum:2.1.0", "gptqmodel:5.0.0"]},
    }
    cfg = QuantizeConfig.from_dict(raw)
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.checkpoint_format) == (8, 32, True, "gptq")
    assert cfg.meta["quantizer"] == ["optimum:2.1.0", "gptqmodel:5.0.0"]


def test_autogptq_quantize_config():
    # auto_gptq/quantization/config.py BaseQuantizeConfig.to_dict
    raw = {
        "bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": True, "static_groups": True,
        "sym": True, "true_sequential": True, "model_name_or_path": None,
        "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "gptq",
    }
    cfg = QuantizeConfig.from_dict(raw)
    assert (cfg.desc_act, cfg.static_groups, cfg.damp_percent) == (True, True, 0.01)


def test_gptqmodel_quantize_config_reads_its_meta():
    # gptqmodel/quantization/config.py QuantizeConfig.to_dict (7.3.4): damp_percent,
    # static_groups and true_sequential live in meta; method and quant_method both written.
    raw = {
        "bits": 4, "dynamic": None, "group_size": 128, "desc_act": False, "lm_head": False,
        "method": "gptq", "quant_method": "gptq", "format": "gptq_v2", "checkpoint_format": "gptq_v2",
        "pack_dtype": "int32", "rotation": None,
        "meta": {"quantizer": ["gptqmodel:7.3.4"], "uri": "https://github.com/modelcloud/gptqmodel",
                 "damp_percent": 0.05, "damp_auto_increment": 0.01, "static_groups": True,
                 "true_sequential": False, "mse": 0.0, "act_group_aware": True, "gptaq": None},
        "sym": False,
    }
    cfg = QuantizeConfig.from_dict(raw)
    assert (cfg.checkpoint_format, cfg.sym, cfg.damp_percent) == ("gptq_v2", False, 0.05)
    assert (cfg.static_groups, cfg.true_sequential, cfg.damp_auto_increment) == (True, False, 0.01)


@pytest.mark.parametrize("key, value, words", [
    ("dynamic", {r"+:.*\.1\..*": {"bits": 8}}, "per-module overrides"),
    ("lm_head", True, "quantized lm_head"),
    ("pack_dtype", "int16", "int32 packing"),
    ("is_marlin_format", True, "Marlin-format"),
])
def test_what_cannot_be_honoured_is_refused_by_name(key, value, words):
    raw = {"bits": 4, "group_size": 128, "sym": True, "desc_act": False, "quant_method": "gptq", key: value}
    with pytest.raises(FormatError, match=words) as info:
        QuantizeConfig.from_dict(raw)
    assert key in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------ backend aliases
def test_gptqmodel_backend_names_are_aliases(monkeypatch):
    assert BACKEND_ALIASES["gptq_marlin"] == "marlin"
    assert parse_preference("gptq_marlin,gptq_triton") == ("marlin", "triton")
    assert parse_preference(["GPTQ_TORCH"]) == ("torch",)
    monkeypatch.setenv(BACKEND_ENV, "gptq_torch")
    assert names_from_env(BACKEND_ENV) == ("torch",) and parse_preference("auto") == ("torch",)
    registry = get_registry()
    assert registry.get("gptq_torch") is registry.get("torch")
    assert set(parse_backend_options({"gptq_torch": {}})) <= {"torch"}


def test_from_quantized_takes_a_gptqmodel_backend_name(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from gptq_core import AutoGPTQForCausalLM, quantize_rtn
    from gptq_core.checkpoint import save_quantized

    stories = ROOT / "gptq_core" / "data" / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()
    name = "model.layers.0.mlp.up_proj"
    config = QuantizeConfig(bits=4, group_size=32)
    folder = save_quantized(model, {name: quantize_rtn(model.get_submodule(name).weight, 4, 32)},
                            config, tmp_path / "ckpt")
    loaded = AutoGPTQForCausalLM.from_quantized(folder, device="cpu", backend="gptq_torch")
    with torch.no_grad():
        loaded(torch.tensor([[1, 5, 9]]))
    assert loaded.quant_linears()[name].binding.backend.name == "torch"


# ------------------------------------------------------------------ CLI logging
def test_log_level_and_verbose_flags():
    parser = build_parser()
    assert log_level(parser.parse_args(["models", "list"])) == logging.WARNING
    assert log_level(parser.parse_args(["-v", "models", "list"])) == logging.INFO
    assert log_level(parser.parse_args(["models", "list", "-vv"])) == logging.DEBUG
    assert log_level(parser.parse_args(["--log-level", "error", "check", "x"])) == logging.ERROR
    assert log_level(parser.parse_args(["check", "x", "--log-level", "debug"])) == logging.DEBUG
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-level", "loud", "models", "list"])


def test_configured_logging_prints_one_line_per_record(capsys):
    try:
        configure_logging(logging.INFO)
        configure_logging(logging.INFO)  # a second run replaces the handler, never stacks it
        logging.getLogger("gptq_core.test").info("hello from the test")
        logging.getLogger("gptq_core.test").debug("not shown")
        err = capsys.readouterr().err
        assert err.count("hello from the test") == 1 and "not shown" not in err
    finally:
        configure_logging(logging.WARNING)


def test_main_applies_verbose(capsys):
    try:
        assert main(["-v", "models", "list"]) == 0
        assert logging.getLogger("gptq_core").level == logging.INFO
    finally:
        configure_logging(logging.WARNING)


# ------------------------------------------------------------------ hints and packaging
def test_missing_folder_hint_names_hf_download(tmp_path):
    with pytest.raises(CheckpointError) as info:
        check_model_dir(tmp_path / "absent")
    assert "hf download" in str(info.value) and "huggingface-cli" not in str(info.value)


def test_no_hint_in_the_package_names_huggingface_cli():
    hits = [p for p in (ROOT / "gptq_core").rglob("*.py") if "huggingface-cli" in p.read_text()]
    assert not hits, f"these files still advise huggingface-cli: {hits}"


def test_distributions_are_local_paths_pip_cannot_take_for_index_names():
    lines = [l.strip() for l in (ROOT / "scripts" / "distributions.txt").read_text().splitlines()]
    entries = [l for l in lines if l and not l.startswith("#")]
    assert entries and all(e.startswith("./") for e in entries)
    for entry in entries:
        assert (ROOT / entry / "pyproject.toml").is_file(), entry
    for script in ("setup.sh", "lib_steps.sh"):
        text = (ROOT / "scripts" / script).read_text()
        assert "grep -v '^#' scripts/distributions.txt" in text, script


def test_the_install_line_expands_to_editable_local_paths():
    out = subprocess.run(
        ["bash", "-c", "printf '%s\\n' $(grep -v '^#' scripts/distributions.txt | sed 's/^/-e /')"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out[0::2] == ["-e"] * (len(out) // 2) and all(p.startswith("./") for p in out[1::2])
