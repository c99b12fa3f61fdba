"""MarlinOptions: parsed once at load, validated, with environment fallbacks only for the build."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptq_core.options import OptionsError
from gptq_core.registry import get_registry
from gptq_core.selector import parse_backend_options
from gptq_backend_marlin.options import MAX_KERNEL_M, MarlinOptions


def test_declared_through_backend_info_and_taken_by_pack():
    backend = get_registry().get("marlin")
    assert backend.info.options is MarlinOptions
    assert backend.pack_takes_options
    assert backend.default_options() == MarlinOptions.parse(None, "marlin")


def test_unknown_key_is_one_error_naming_it_and_the_known_ones():
    with pytest.raises(OptionsError, match=r"no option 'dense_cach_mb'.*dense_cache_mb") as info:
        parse_backend_options({"marlin": {"dense_cach_mb": 1}})
    assert "dequant_threshold" in str(info.value)


def test_values_from_text_are_typed():
    o = MarlinOptions.parse({"dense_cache_mb": "512", "dequant_threshold": "128", "build_dir": "~/x",
                             "dense_threshold": "none"}, "marlin")
    assert o.dense_cache_mb == 512.0 and o.dequant_threshold == 128 and o.dense_threshold is None
    assert o.build_dir == Path("~/x").expanduser()


@pytest.mark.parametrize("values,message", [
    ({"dequant_threshold": -1}, "dequant_threshold=-1 must be in"),
    ({"dequant_threshold": MAX_KERNEL_M + 1}, "must be in"),
    ({"dense_threshold": -3}, "dense_threshold=-3"),
    ({"dense_cache_mb": -1}, "dense_cache_mb"),
    ({"archs": "hopper"}, "archs.*like 8.0"),
    ({"dequant_threshold": "many"}, "cannot be read as int"),
    ({"hopper_cache_mb": -1}, "hopper_cache_mb=-1.* must be >= 0"),
    ({"hopper_threshold": MAX_KERNEL_M + 1}, "hopper_threshold=.*must be in"),
    ({"hopper_max_rows": -1}, "hopper_max_rows=-1 must be in"),
])
def test_bad_values_are_errors_that_say_what_to_do(values, message):
    with pytest.raises(OptionsError, match=message):
        MarlinOptions.parse(values, "marlin")


def test_build_dir_and_archs_fall_back_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTQ_MARLIN_BUILD_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("GPTQ_MARLIN_ARCHS", "8.0;9.0")
    o = MarlinOptions.parse(None, "marlin")
    assert o.build_dir == tmp_path / "env" and o.archs == "8.0;9.0"
    assert MarlinOptions.parse({"build_dir": tmp_path / "given"}, "marlin").build_dir == tmp_path / "given"


def test_only_the_build_settings_read_the_environment(monkeypatch):
    for name in ("GPTQ_MARLIN_DENSE_CACHE_MB", "GPTQ_MARLIN_DEQUANT_M", "GPTQ_MARLIN_DENSE_M"):
        monkeypatch.setenv(name, "7")
    assert MarlinOptions.parse(None, "marlin") == MarlinOptions()
    envs = {row["name"]: row["env"] for row in MarlinOptions.fields_table()}
    assert envs == {"build_dir": "GPTQ_MARLIN_BUILD_DIR", "archs": "GPTQ_MARLIN_ARCHS",
                    "dense_cache_mb": None, "dequant_threshold": None, "dense_threshold": None,
                    "hopper_cache_mb": None, "hopper_threshold": None, "hopper_max_rows": None}
