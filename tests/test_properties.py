"""Property-based tests (hypothesis): whatever a user or a damaged file hands the library, the
outcome is a success or the library's own error (``GPTQError``), never another exception and
never a wrong answer (issue 12; docs/DESIGN.md §10).

Fed: random quantization config dicts (right and wrong types) to ``QuantizeConfig.from_dict``,
random shapes and corrupt tensors to ``PackedWeight`` and ``pack_weight``, and truncated or
byte-flipped safetensors files of a tiny real checkpoint to the loader.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptq_core import QuantizeConfig
from gptq_core.checkpoint import load_quantized, save_quantized
from gptq_core.errors import GPTQError
from gptq_core.format import PackedWeight, num_groups, pack_weight
from gptq_core.packing import packed_length
from gptq_core.rtn import quantize_rtn
from gptq_core.testing import random_packed

#: Small budgets: the whole module runs in well under a minute on two cores.
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=12, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _outcome(call):
    """Run ``call``: its result, or None when it raised the library's own error (anything else
    propagates and fails the test)."""
    try:
        return call()
    except GPTQError:
        return None


# ---------------------------------------------------------------------------- configs
#: Any JSON value (what a config file can hold), plus the non-finite floats Python's json reads.
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True),
    st.text(max_size=8), st.sampled_from(["4", "four", "true", "false", "gptq", "gptq_v2", "v2", "marlin"]),
)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
#: Right values for each field, so that mixed dicts also reach the paths after type checks.
GOOD = {
    "bits": st.sampled_from([2, 3, 4, 8]),
    "group_size": st.sampled_from([-1, 32, 64, 128]),
    "desc_act": st.booleans(),
    "sym": st.booleans(),
    "damp_percent": st.floats(0.001, 0.5),
    "true_sequential": st.booleans(),
    "static_groups": st.booleans(),
    "checkpoint_format": st.sampled_from(["gptq", "gptq_v2"]),
    "quant_method": st.just("gptq"),
}
KEYS = [*GOOD, "format", "version", "zero_point", "meta", "mse", "damp_auto_increment",
        "is_marlin_format", "model_name_or_path"]


@st.composite
def config_dicts(draw) -> dict:
    raw = {}
    for key in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=len(KEYS))):
        right = key in GOOD and draw(st.booleans())
        raw[key] = draw(GOOD[key]) if right else draw(JSON_VALUES)
    return raw


@FAST
@given(config_dicts())
def test_any_config_dict_gives_a_valid_config_or_a_gptq_error(raw):
    cfg = _outcome(lambda: QuantizeConfig.from_dict(raw))
    if cfg is None:
        return
    # A config that was accepted holds values of the right type and range...
    assert type(cfg.bits) is int and cfg.bits in (2, 3, 4, 8)
    assert type(cfg.group_size) is int and (cfg.group_size == -1 or cfg.group_size > 0)
    for name in ("desc_act", "sym", "true_sequential", "static_groups"):
        assert type(getattr(cfg, name)) is bool, name
    assert math.isfinite(cfg.damp_percent) and 0 < cfg.damp_percent < 1
    assert math.isfinite(cfg.mse) and cfg.mse >= 0
    # ...and reads back from what it writes as the same config.
    assert QuantizeConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@FAST
@given(st.one_of(JSON_VALUES, config_dicts()))
def test_any_json_value_as_a_config_is_a_config_or_a_gptq_error(raw):
    _outcome(lambda: QuantizeConfig.from_dict(raw))


# ---------------------------------------------------------------------------- packed weights
BITS = st.sampled_from([2, 3, 4, 8]) | st.integers(-2, 17)
GROUPS = st.sampled_from([-1, 16, 32, 128]) | st.integers(-3, 300)
DTYPES = st.sampled_from([torch.int32, torch.int64, torch.float16, torch.float32, torch.uint8])


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, fill: float) -> torch.Tensor:
    return torch.full(shape, fill).to(dtype)


@st.composite
def packed_fields(draw) -> dict:
    """Fields of a PackedWeight: a well-formed layer, then some of its parts made wrong."""
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    group_size = draw(st.sampled_from([-1, 16, 32]))
    K = draw(st.sampled_from([16, 32, 48, 64]))
    N = draw(st.sampled_from([8, 16, 32]))
    pw = random_packed(bits, group_size, sym=draw(st.booleans()), desc_act=draw(st.booleans()),
                       in_features=K, out_features=N, seed=draw(st.integers(0, 99)),
                       bias=draw(st.booleans()))
    fields = {f: getattr(pw, f) for f in ("qweight", "qzeros", "scales", "g_idx", "bits",
                                         "group_size", "in_features", "out_features", "sym",
                                         "desc_act", "zero_format", "bias")}
    for name in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=3)):
        value = fields[name]
        if name in ("bits", "group_size", "in_features", "out_features"):
            fields[name] = draw(st.one_of(BITS if name == "bits" else GROUPS, st.floats(), st.text(max_size=2)))
        elif name in ("sym", "desc_act"):
            fields[name] = draw(JSON_SCALARS)
        elif name == "zero_format":
            fields[name] = draw(st.sampled_from(["v1", "v2", "v3", "", None]))
        elif value is None or draw(st.booleans()):  # a wrong shape or dtype
            shape = tuple(draw(st.lists(st.integers(0, 70), min_size=0, max_size=3)))
            fields[name] = _tensor(shape, draw(DTYPES), draw(st.floats(-5, 5)))
        else:  # the right shape and dtype, corrupt values
            bad = draw(st.sampled_from([math.nan, math.inf, -1, 2**31 - 1, 10**6]))
            t = value.clone()
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = bad if t.is_floating_point() else (
                int(bad) if math.isfinite(bad) else -1)
            fields[name] = t
    return fields


@FAST
@given(packed_fields())
def test_packed_weight_is_well_formed_or_a_gptq_error(fields):
    pw = _outcome(lambda: PackedWeight(**fields))
    if pw is None:
        return
    # Accepted: every index names a group and every scale is finite, so matmuls are defined.
    G = num_groups(pw.in_features, pw.group_size)
    assert 0 <= int(pw.g_idx.min()) and int(pw.g_idx.max()) < G
    assert bool(torch.isfinite(pw.scales).all())
    assert pw.qweight.shape == (packed_length(pw.in_features, pw.bits), pw.out_features)


@st.composite
def pack_arguments(draw) -> dict:
    bits = draw(BITS)
    group_size = draw(GROUPS)
    N, K = draw(st.integers(0, 12)), draw(st.integers(0, 70))
    G = draw(st.integers(0, 5))
    args = {
        "intweight": _tensor((N, K), draw(DTYPES), draw(st.sampled_from([0, 1, 3, 15, 16, 255, -1]))),
        "scales": _tensor((G, N), draw(DTYPES), draw(st.sampled_from([0.01, 1.0, math.nan, math.inf]))),
        "zeros": _tensor((G, N), draw(DTYPES), draw(st.sampled_from([0, 1, 8, 16, -1]))),
        "bits": bits,
        "group_size": group_size,
        "sym": draw(st.booleans()),
    }
    if draw(st.booleans()):
        args["g_idx"] = _tensor((K,), draw(DTYPES), draw(st.sampled_from([0, 1, -1, 7])))
    return args


@FAST
@given(pack_arguments())
def test_pack_weight_is_a_packed_weight_or_a_gptq_error(args):
    tensors = {k: args.pop(k) for k in ("intweight", "scales", "zeros")}
    pw = _outcome(lambda: pack_weight(tensors["intweight"], tensors["scales"], tensors["zeros"], **args))
    if pw is not None:  # accepted: values a kernel can use
        assert bool(torch.isfinite(pw.scales).all())
        assert 0 <= int(pw.g_idx.min()) and int(pw.g_idx.max()) < pw.num_groups


# ---------------------------------------------------------------------------- checkpoints
STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"
CONFIG = QuantizeConfig(bits=4, group_size=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real 4-bit g32 RTN checkpoint of stories260K, written once for the module."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    packed = {name: quantize_rtn(module.weight, CONFIG.bits, CONFIG.group_size, CONFIG.sym)
              for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and ".layers." in name}
    folder = tmp_path_factory.mktemp("ckpt") / "stories-w4g32"
    save_quantized(model, packed, CONFIG, folder)
    return folder


@st.composite
def damages(draw) -> tuple[str, int, bytes]:
    """(kind, where, what): cut the file at a fraction of its length, or overwrite bytes there
    (the header's first kilobyte is as likely as the tensor data)."""
    kind = draw(st.sampled_from(["truncate", "overwrite-header", "overwrite-data"]))
    return kind, draw(st.integers(0, 10**6)), draw(st.binary(min_size=1, max_size=64))


@SLOW
@given(damage=damages())
def test_a_damaged_weight_file_loads_exactly_or_is_a_gptq_error(checkpoint, tmp_path_factory, damage):
    kind, where, what = damage
    folder = tmp_path_factory.mktemp("damaged") / "ckpt"
    shutil.copytree(checkpoint, folder)
    target = folder / "model.safetensors"
    raw = bytearray(target.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    if kind == "truncate":
        raw = raw[: where % len(raw)]
    else:
        start = where % min(header, 1024) if kind == "overwrite-header" else header + where % (len(raw) - header)
        raw[start : start + len(what)] = what[: len(raw) - start]
    changed = bytes(raw) != target.read_bytes()
    target.write_bytes(bytes(raw))
    model = _outcome(lambda: load_quantized(folder, "cpu"))
    # The checkpoint's manifest vouches for every byte: a changed file never loads silently.
    assert model is None or not changed, f"{kind} at {where} loaded without an error"
