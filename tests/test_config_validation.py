"""QuantizeConfig refuses every wrong type and out-of-range value by name, in the constructor,
in ``from_dict`` and when read from a checkpoint folder (issue 12: values that slipped through
were quantized with the opposite meaning or wrote checkpoints that could not be loaded)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gptq_core import QuantizeConfig
from gptq_core.checkpoint import read_quantize_config
from gptq_core.config import check_save_dtype
from gptq_core.errors import CheckpointError, FormatError


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bits", 4.7, r"bits=4\.7 is not an integer"),
        ("bits", "four", r"bits='four' is not an integer"),
        ("bits", True, r"bits=True is not an integer"),
        ("group_size", 128.0, r"group_size=128\.0 is not an integer"),
        ("sym", "false", r"sym='false' is not a bool"),
        ("desc_act", 1, r"desc_act=1 is not a bool"),
        ("true_sequential", "yes", r"true_sequential='yes' is not a bool"),
        ("static_groups", None, r"static_groups=None is not a bool"),
        ("damp_percent", math.nan, r"damp_percent=nan is not a finite number"),
        ("damp_percent", "0.01", r"damp_percent='0.01' is not a finite number"),
        ("damp_auto_increment", math.inf, r"damp_auto_increment=inf is not a finite number"),
        ("mse", math.nan, r"mse=nan is not a finite number"),
        ("mse", -math.inf, r"mse=-inf is not a finite number"),
        ("checkpoint_format", ["gptq"], r"checkpoint_format=\['gptq'\] cannot be read or written"),
        ("meta", [], r"meta=\[\] must be a dict"),
    ],
)
def test_constructor_refuses_wrong_types_by_name(field, value, message):
    with pytest.raises(FormatError, match=message):
        QuantizeConfig(**{field: value})


def test_replace_validates_too():
    with pytest.raises(FormatError, match="sym='false' is not a bool"):
        QuantizeConfig().replace(sym="false")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"bits": "four"}, r"config.json: bits='four' is not an integer"),
        ({"bits": 4.7}, r"config.json: bits=4\.7 is not an integer"),
        ({"sym": "false"}, r"config.json: sym='false' is not a bool"),
        ({"zero_point": "true"}, r"config.json: zero_point='true' is not a bool"),
        ({"meta": {"mse": math.nan}}, r"config.json: mse=nan is not a finite number"),
        ({"damp_percent": "0.1"}, r"config.json: damp_percent='0.1' is not a finite number"),
    ],
)
def test_from_dict_refuses_by_source_and_field(raw, message):
    with pytest.raises(FormatError, match=message):
        QuantizeConfig.from_dict(raw, source="config.json")


def test_checkpoint_folder_with_bad_value_names_file_and_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": "four", "group_size": 128}))
    with pytest.raises(CheckpointError, match=r"quantize_config.json: bits='four' is not an integer"):
        read_quantize_config(tmp_path)


def test_valid_values_still_pass():
    cfg = QuantizeConfig(bits=3, group_size=-1, sym=False, desc_act=True, damp_percent=0.1, mse=2.4,
                         damp_auto_increment=0, checkpoint_format="gptq_v2")
    assert QuantizeConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, "bfloat16", "torch.float32"])
def test_save_dtype_accepts_the_float_types(dtype):
    assert check_save_dtype(dtype) in (torch.float16, torch.bfloat16, torch.float32)
    assert check_save_dtype(None) is None


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.bool, "int8", 16])
def test_save_dtype_refuses_others_with_the_fix(dtype):
    with pytest.raises(FormatError, match=r"cannot hold a checkpoint's float tensors; use one of torch.float16"):
        check_save_dtype(dtype)


def test_save_quantized_refuses_an_integer_dtype_before_writing(tmp_path):
    from pathlib import Path

    import torch

    from gptq_core import AutoGPTQForCausalLM, QuantizeConfig
    from gptq_core.errors import GPTQError

    stories = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"
    model = AutoGPTQForCausalLM.from_pretrained(stories, QuantizeConfig(bits=4, group_size=32))
    with pytest.raises(GPTQError, match="int8"):
        model.save_quantized(tmp_path / "q", torch_dtype=torch.int8)
    assert not (tmp_path / "q").exists()
