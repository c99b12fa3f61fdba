"""QuantizeConfig: what the ecosystem writes, the synonyms peers use, and clear rejections."""

from __future__ import annotations

import pytest

from gptq_core import QuantizeConfig, __version__
from gptq_core.errors import FormatError


def test_to_dict_has_the_ecosystem_keys():
    d = QuantizeConfig(bits=3, group_size=64, desc_act=True, sym=False,
                       checkpoint_format="gptq_v2").to_dict()
    assert d["quant_method"] == "gptq"
    assert (d["bits"], d["group_size"], d["desc_act"], d["sym"]) == (3, 64, True, False)
    assert d["checkpoint_format"] == d["format"] == "gptq_v2"
    assert {"damp_percent", "true_sequential", "static_groups"} <= d.keys()
    assert d["meta"]["quantizer"] == [f"gptq-core:{__version__}"]


def test_round_trip():
    cfg = QuantizeConfig(bits=8, group_size=-1, damp_percent=0.05, static_groups=True, mse=2.4)
    again = QuantizeConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.zero_format == "v1" and QuantizeConfig(checkpoint_format="gptq_v2").zero_format == "v2"


def test_optimum_style_config_with_extra_keys_loads():
    raw = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
           "damp_percent": 0.1, "use_exllama": True, "exllama_config": {"version": 1},
           "tokenizer": None, "dataset": None, "model_seqlen": 2048, "cache_block_outputs": True,
           "module_name_preceding_first_block": ["model.embed_tokens"]}
    cfg = QuantizeConfig.from_dict(raw)
    assert (cfg.bits, cfg.group_size, cfg.damp_percent, cfg.checkpoint_format) == (4, 128, 0.1, "gptq")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"wbits": 3, "groupsize": 64}, {"bits": 3, "group_size": 64}),
        ({"w_bit": 8, "q_group_size": 32}, {"bits": 8, "group_size": 32}),
        ({"bits": "4", "group_size": None}, {"bits": 4, "group_size": -1}),
        ({"act_order": True, "damp": 0.02}, {"desc_act": True, "damp_percent": 0.02}),
        ({"zero_point": True}, {"sym": False}),
        ({"zero_point": False}, {"sym": True}),
        ({"format": "gptq_v2"}, {"checkpoint_format": "gptq_v2"}),
        ({"checkpoint_format": "GPTQ"}, {"checkpoint_format": "gptq"}),
        ({"version": "v2"}, {"checkpoint_format": "gptq_v2"}),
        ({"version": "gptq_v1"}, {"checkpoint_format": "gptq"}),
        ({"wbits": 2, "bits": 3}, {"bits": 3}),  # the canonical key wins
        ({"meta": {"damp_auto_increment": 0.01, "mse": 2.0}},
         {"damp_auto_increment": 0.01, "mse": 2.0}),
    ],
)
def test_synonyms(raw, expected):
    cfg = QuantizeConfig.from_dict(raw)
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"quant_method": "awq", "bits": 4}, "quant_method='awq'; gptq-core loads GPTQ checkpoints only"),
        ({"bits": 5}, r"config.json: bits=5 is not a GPTQ bit width"),
        ({"group_size": 0}, "group_size=0 is invalid"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format='marlin' cannot be read or written"),
        ({"version": "GEMM"}, "checkpoint_format='gemm'"),
        ({"damp_percent": 0}, r"damp_percent=0 must lie in \(0, 1\)"),
        ({"mse": -1}, "mse"),
    ],
)
def test_rejections_name_the_source_and_the_fix(raw, message):
    with pytest.raises(FormatError, match=message):
        QuantizeConfig.from_dict(raw, source="config.json")


def test_non_object_is_rejected():
    with pytest.raises(FormatError, match="must be a JSON object, got list"):
        QuantizeConfig.from_dict([4, 128])


def test_constructor_validates():
    with pytest.raises(FormatError, match="bits=6"):
        QuantizeConfig(bits=6)
    with pytest.raises(FormatError, match="damp_auto_increment"):
        QuantizeConfig(damp_auto_increment=-0.1)
