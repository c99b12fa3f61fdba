"""``gptq bench generate`` on the CPU with the real stories260K model (what CI runs), and the
synthetic real-shape models it builds for GPUs. No timing is asserted, only that every number
is there and that the quantized fast path picks eager's greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptq_core import GPTQError
from gptq_core.auto import is_quantized_checkpoint
from gptq_core.checkpoint import load_quantized, read_quantize_config
from gptq_core.cli import main
from gptq_core.quant_linear import QuantLinear
from gptq_core.rtn import quantize_rtn
from gptq_core.synthetic import (
    SHAPES,
    Shape,
    build_synthetic,
    float_model_of,
    llama_config,
    rtn_on_device,
)

STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"
MODES = ("eager", "static", "fast")


def test_bench_generate_on_stories_cpu(tmp_path, capsys):
    out = tmp_path / "gen.json"
    rc = main(["bench", "generate", str(STORIES), "--device", "cpu", "--batch", "1,2",
               "--new-tokens", "8", "--prompt-len", "8", "--seconds", "0", "--quiet", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {(r["model"], r["mode"], r["batch"]): r for r in data["rows"]}
    assert set(rows) == {(m, mode, b) for m in ("float", "quantized") for mode in MODES for b in (1, 2)}
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row["note"])
        assert row["tok_s"] > 0 and row["ms_per_step"] > 0 and row["prefill_ms"] > 0, key
        assert row["load_s"] is not None and row["load_s"] >= 0
    for batch in (1, 2):
        fast = rows[("quantized", "fast", batch)]
        assert fast["tokens_match"] is True and fast["path"] == "eager"
        assert rows[("quantized", "static", batch)]["tokens_match"] is True
        assert rows[("quantized", "eager", batch)]["tokens_match"] is None  # the reference
    assert data["meta"]["quantized_by_bench"] is True and data["meta"]["batches"] == [1, 2]
    assert {m["label"] for m in data["models"]} == {"float", "quantized"}
    table = capsys.readouterr().out
    assert "batch 2: prompt 8 tokens, 8 new tokens" in table and "DIFFER" not in table


def test_compare_backends_times_the_quantized_model_once_per_backend(tmp_path):
    out = tmp_path / "gen.json"
    rc = main(["bench", "generate", str(STORIES), "--device", "cpu", "--batch", "1", "--modes", "eager",
               "--new-tokens", "4", "--prompt-len", "4", "--seconds", "0", "--quiet", "--json", str(out),
               "--compare-backends", "torch,cpu"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [(r["model"], r["status"]) for r in data["rows"]] == [
        ("float", "ok"), ("quantized[torch]", "ok"), ("quantized[cpu]", "ok")]
    assert data["meta"]["backend"] == "torch,cpu"
    assert [(m["label"], m["backend"]) for m in data["models"]] == [
        ("float", None), ("quantized[torch]", "torch"), ("quantized[cpu]", "cpu")]


@pytest.mark.parametrize("args, message", [
    ([str(STORIES), "--compare-backends", "torch"], "two or more"),
    ([str(STORIES), "--compare-backends", "torch,nosuch"], "no backend named 'nosuch'"),
    ([str(STORIES), "--compare-backends", "torch,cpu", "--backend", "torch"], "give one of them"),
    ([], "exactly one"),
    ([str(STORIES), "--synthetic", "llama-2-7b"], "exactly one"),
    ([str(STORIES), "--modes", "eager,turbo"], "unknown mode"),
    ([str(STORIES), "--new-tokens", "1"], "--new-tokens"),
    ([str(STORIES), "--batch", "1,x"], "--batch"),
    ([str(STORIES), "--layers", "2"], "--layers"),
    ([str(STORIES), "--backend-option", "cpu.nope=1"], "backend 'cpu' has no option 'nope'"),
    ([str(STORIES), "--backend-option", "nosuch.x=1"], "names backend 'nosuch', which is not installed"),
])
def test_bad_arguments_are_named(args, message, capsys):
    assert main(["bench", "generate", "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err


def test_backend_options_apply_to_the_quantized_load_only(tmp_path):
    """cpu.gemm_threshold=0 puts every row of the quantized model on the cpu backend's gemm
    path; the float model loads as it would without options."""
    from gptq_backends.cpu_kernels import build
    from gptq_backends.cpu_kernels.policy import GEMM
    from gptq_core.auto import load_for_inference
    from gptq_core.generation.benchmark import GenerateBenchConfig, ModelEntry, load_model
    from gptq_core.synthetic import write_rtn_checkpoint

    try:
        build.load()
    except build.BuildError as exc:  # pragma: no cover - a machine without g++
        pytest.skip(f"C++ kernels not built here: {exc}")
    model, tokenizer = load_for_inference(STORIES, "cpu", "auto", "float32")
    folder = write_rtn_checkpoint(model, tokenizer, tmp_path / "q", STORIES)
    out = tmp_path / "gen.json"
    assert main(["bench", "generate", str(folder), "--device", "cpu", "--batch", "1", "--modes", "eager",
                 "--new-tokens", "2", "--prompt-len", "4", "--seconds", "0", "--quiet", "--json", str(out),
                 "--backend", "cpu", "--backend-option", "cpu.gemm_threshold=0"]) == 0
    data = json.loads(out.read_text())
    assert [(r["model"], r["status"]) for r in data["rows"]] == [("float", "ok"), ("quantized", "ok")]
    assert data["meta"]["backend_options"] == {"cpu": {"gemm_threshold": "0"}}

    cfg = GenerateBenchConfig(batches=[1], prompt_len=4, new_tokens=2, modes=["eager"],
                              device=torch.device("cpu"), backend="cpu", dtype="float32",
                              backend_options=data["meta"]["backend_options"])
    quantized, _ = load_model(ModelEntry("quantized", folder), cfg)
    layers = [m for m in quantized.modules() if isinstance(m, QuantLinear)]
    assert layers and {layer.binding.policy.describe() for layer in layers} == {f"any M: {GEMM}"}
    floats, _ = load_model(ModelEntry("float", STORIES), cfg)
    assert not any(isinstance(m, QuantLinear) for m in floats.modules())


def test_kernel_bench_still_parses_without_a_mode():
    from gptq_core.cli.main import build_parser

    args = build_parser().parse_args(["bench", "--shapes", "128x64", "--m", "1"])
    assert args.bench_mode is None and args.shapes == "128x64"
    args = build_parser().parse_args(["bench", "generate", "--synthetic", "llama-3-8b", "--batch", "1,8"])
    assert args.bench_mode == "generate" and args.synthetic == "llama-3-8b"


# ---------------------------------------------------------------------------- synthetic models
@pytest.mark.parametrize("name, params", [
    ("llama-2-7b", 6_738_415_616),
    ("llama-3-8b", 8_030_261_248),
])
def test_synthetic_shapes_have_the_real_parameter_counts(name, params):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config(name))
    assert sum(p.numel() for p in model.parameters()) == params


def test_llama_3_70b_layers_are_the_real_layers():
    """Four layers of Llama-3-70B's shapes; with all 80 the count is the real model's."""
    assert SHAPES["llama-3-70b-layers"].layers == 4
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config("llama-3-70b-layers", layers=80))
    assert sum(p.numel() for p in model.parameters()) == 70_553_706_496


def test_rtn_on_device_equals_quantize_rtn():
    w = torch.randn(96, 384, generator=torch.Generator().manual_seed(0)) * 0.02
    w[3, 130:140] = 0.3  # an outlier group
    fast, slow = rtn_on_device(w), quantize_rtn(w, 4, 128, True)
    for field in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(fast, field), getattr(slow, field)), field


TINY = Shape(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=32000,
             max_positions=256, rope_theta=10000.0, bos=1, eos=2)


def test_build_synthetic_writes_a_float_model_and_its_checkpoint(tmp_path):
    pair = build_synthetic(TINY, tmp_path, device="cpu")
    assert not is_quantized_checkpoint(pair.float_dir) and is_quantized_checkpoint(pair.quantized_dir)
    assert float_model_of(pair.quantized_dir) == pair.float_dir.resolve()
    qcfg = read_quantize_config(pair.quantized_dir)
    assert (qcfg.bits, qcfg.group_size, qcfg.sym, qcfg.desc_act) == (4, 128, True, False)
    assert (pair.float_dir / "tokenizer.json").is_file() and (pair.quantized_dir / "tokenizer.json").is_file()
    model = load_quantized(pair.quantized_dir, "cpu")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 7
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == 32000
    again = build_synthetic(TINY, tmp_path / "again", device="cpu")
    assert (again.float_dir / "model.safetensors").read_bytes() == (pair.float_dir / "model.safetensors").read_bytes()
    with pytest.raises(GPTQError, match="not empty"):
        build_synthetic(TINY, tmp_path, device="cpu")


def test_a_mismatch_names_its_row_column_and_eager_logit_gap():
    from gptq_core.generation.benchmark import _mismatch, logit_gap

    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    ref = torch.tensor([[1, 5, 9, 14, 20, 30], [1, 7, 8, 12, 22, 40]])
    out = ref.clone()
    assert _mismatch(out, ref, prompt_len=2) is None
    out[1, 4] = 3  # row 1 differs from the third generated token
    assert _mismatch(out, ref, prompt_len=2) == (1, 2)
    with torch.no_grad():
        logits = model(ref[1:2, :4]).logits[0, -1]
    top = torch.topk(logits, 2).values
    assert logit_gap(model, ref, 1, 4) == pytest.approx(float(top[0] - top[1]))
    assert logit_gap(model, ref, 1, 4) >= 0
