"""``gptq bench generate --device-map``: the option's parsing, both models placed through the
device map on the CPU with the real stories260K model (what CI can run), the per-layer time sum
and its arithmetic, and the fast path's one-line refusal of a model spread over several GPUs.
No timing is asserted: the numbers must be there and add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptq_core import GPTQError
from gptq_core.cli import main
from gptq_core.cli.bench import parse_bench_device_map
from gptq_core.generation import FastGenerator
from gptq_core.generation.benchmark import ModelEntry, Row
from gptq_core.generation.spread import DevicePlacement, LayerSum, time_layer_sum
from gptq_core.generation.report import layer_sum_line, placement_line, table
from gptq_core.generation.support import unsupported_reason
from gptq_core.models import decoder_layers, get_architecture

pytest.importorskip("accelerate")

STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"
#: stories260K module by module, all on the CPU: a dict map both models must take.
CPU_MAP = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(5)},
           "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


# ---------------------------------------------------------------------------- option parsing
@pytest.mark.parametrize("text, expected", [
    ("auto", "auto"), ("balanced", "balanced"), ("sequential", "sequential"), ("cpu", "cpu"),
    ("cuda:1", "cuda:1"), ('{"": "cpu"}', {"": "cpu"}),
])
def test_device_map_values_parse(text, expected):
    assert parse_bench_device_map(text) == expected


def test_device_map_json_file_is_read(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(CPU_MAP))
    assert parse_bench_device_map(str(path)) == CPU_MAP


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_bad_device_map_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "map.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(GPTQError, match=message) as info:
        parse_bench_device_map(str(path))
    assert "\n" not in str(info.value)


def test_a_word_that_is_no_map_is_named():
    with pytest.raises(GPTQError, match="is not a strategy .*--device-map auto"):
        parse_bench_device_map("everywhere")


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu", "--device-map", "auto"], "give one of them"),
    (["--max-memory", "cpu=1GiB"], "give --device-map auto with it"),
    (["--device-map", "auto", "--max-memory", "cpu"], "must be DEVICE=SIZE"),
    (["--device-map", "{\"\": \"cuda:0\"}"], "no cuda device on this machine"),
])
def test_bad_placement_arguments_are_named(args, message, capsys):
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "generate", str(STORIES), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---------------------------------------------------------------------------- both models placed
def _bench(tmp_path: Path, device_map: str, extra: tuple[str, ...] = ()) -> tuple[int, dict]:
    """``gptq bench generate`` of stories260K (batch 1, eager and fast) under ``device_map``:
    (exit status, the JSON it wrote or {})."""
    out = tmp_path / "gen.json"
    rc = main(["bench", "generate", str(STORIES), "--device-map", device_map, "--batch", "1",
               "--modes", "eager,fast", "--new-tokens", "4", "--prompt-len", "4", "--seconds", "0",
               "--quiet", "--work-dir", str(tmp_path / "work"), "--json", str(out), *extra])
    return rc, json.loads(out.read_text()) if out.is_file() else {}


def test_auto_map_on_the_cpu_places_both_models_and_sums_the_layers(tmp_path, capsys):
    rc, data = _bench(tmp_path, "auto")
    assert rc == 0
    models = {m["label"]: m for m in data["models"]}
    assert set(models) == {"float", "quantized"}
    for label, m in models.items():
        (place,) = m["placement"]  # one device: the CPU holds every layer
        assert place["device"] == "cpu" and place["layers"] == [0, 1, 2, 3, 4], label
        assert place["weights_gb"] > 0
        (s,) = m["layer_sums"]
        assert s["batch"] == 1 and s["layers"] == 5 and s["layer_ms"] > 0 and s["head_ms"] > 0
        assert s["total_ms"] == pytest.approx(5 * s["layer_ms"] + s["head_ms"])
    assert models["float"]["placement"][0]["backends"] == {}
    served = models["quantized"]["placement"][0]["backends"]
    assert sum(served.values()) == 35 and "unbound" not in served  # 5 layers x 7 linears, each bound
    for row in data["rows"]:
        assert row["status"] == "ok", row
        total = models[row["model"]]["layer_sums"][0]["total_ms"]
        assert row["layer_sum_ratio"] == pytest.approx(row["ms_per_step"] / total)
        assert row["mode"] != "fast" or row["path"] == "eager"  # one device: the fast path serves it
    assert data["meta"]["device_map"] == "auto"
    text = capsys.readouterr().out
    assert "x layer sum" in text and "quantized per-layer time sum" in text
    assert "cpu: layers 0-4 (5 of 5)" in text


def test_a_json_map_file_places_the_float_and_the_quantized_model(tmp_path, capsys):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(CPU_MAP))
    rc, data = _bench(tmp_path, str(path), ("--no-layer-sum",))
    assert rc == 0
    for m in data["models"]:
        (place,) = m["placement"]
        assert set(place["modules"]) == {"embed_tokens", "norm", "rotary_emb", "lm_head"}, m["label"]
        assert m["layer_sums"] == []
    assert all(r["layer_sum_ratio"] is None for r in data["rows"])
    assert data["meta"]["device_map"] == CPU_MAP
    assert "x layer sum" not in capsys.readouterr().out


def test_a_map_that_needs_disk_is_refused_in_one_line(tmp_path, capsys):
    rc, _ = _bench(tmp_path, json.dumps({**CPU_MAP, "model.layers.4": "disk"}))
    assert rc == 2
    err = capsys.readouterr().err
    assert "offload_folder" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- the per-layer sum
@pytest.fixture(scope="module")
def stories() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


def test_layer_sum_replays_the_first_layer_and_runs_the_head_without_layers(stories):
    layers = decoder_layers(stories, get_architecture(stories))
    ids = torch.tensor([[1, 45, 99, 300, 7, 12]])
    with torch.no_grad():
        before = stories(ids).logits
    calls = {0: 0, 4: 0}
    hooks = [layers[i].register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1)) for i in calls]
    try:
        s = time_layer_sum(stories, ids, steps=3, devices=[torch.device("cpu")], repeats=2)
    finally:
        for h in hooks:
            h.remove()
    # Per repeat: a prefill and a decode step through every layer, then 3 replays of layer 0;
    # the head's calls run with the layer list emptied, so the last layer sees none of them.
    assert calls == {0: 2 * (2 + 3), 4: 2 * 2}
    assert decoder_layers(stories, get_architecture(stories)) is layers and len(layers) == 5
    with torch.no_grad():
        torch.testing.assert_close(stories(ids).logits, before, rtol=0, atol=0)
    assert (s.batch, s.device, s.layers) == (1, "cpu", 5) and s.layer_ms > 0 and s.head_ms > 0


def test_placement_of_a_cpu_and_disk_split_names_layers_and_backends(stories, tmp_path):
    from gptq_core.auto import load_for_inference, load_tokenizer
    from gptq_core.generation.spread import placement_of
    from gptq_core.synthetic import write_rtn_checkpoint

    folder = write_rtn_checkpoint(stories, load_tokenizer(STORIES), tmp_path / "q", STORIES)
    split = {**CPU_MAP, "model.layers.2": "disk", "model.layers.3": "disk", "model.layers.4": "disk"}
    model, _ = load_for_inference(folder, None, device_map=split, offload_folder=tmp_path / "off")
    cpu, disk = placement_of(model)
    assert (cpu.device, cpu.layers, disk.device, disk.layers) == ("cpu", [0, 1], "disk", [2, 3, 4])
    assert set(cpu.modules) == {"embed_tokens", "norm", "rotary_emb", "lm_head"} and disk.modules == []
    assert cpu.backends == {"cpu": 14} and disk.backends == {"per call": 21}  # 7 linears a layer
    assert cpu.weights_gb > 0 and disk.weights_gb > 0


def test_layer_sum_arithmetic_and_its_lines():
    s = LayerSum(batch=8, device="cuda:0", layers=80, layer_ms=1.25, head_ms=0.5)
    assert s.total_ms == pytest.approx(100.5)
    assert s.ratio(110.55) == pytest.approx(1.1)
    assert s.ratio(None) is None
    rows = [Row("quantized", "eager", 8, 32, 128, ms_per_step=110.55, tok_s=72.0, layer_sum_ratio=s.ratio(110.55)),
            Row("quantized", "fast", 8, 32, 128, ms_per_step=100.5, tok_s=80.0, layer_sum_ratio=1.0,
                path="transformers")]
    line = layer_sum_line("quantized", s, rows)
    assert "80 x 1.250 ms + embeddings/norm/head 0.500 ms = 100.50 ms" in line
    assert "eager 110.55 ms = 1.10x, fast 100.50 ms = 1.00x" in line
    place = DevicePlacement("cuda:1", list(range(40, 80)), ["norm", "lm_head"], 17.5, {"marlin": 280})
    assert placement_line(place, 80) == (
        "  cuda:1: layers 40-79 (40 of 80), norm, lm_head, 17.50 GB of weights, linears: marlin x 280")
    entry = ModelEntry("quantized", Path("q"), load_s=1.0, placement=[place], layer_sums=[s])
    text = table(rows, [entry])
    assert "x layer sum" in text and "1.10" in text and "cuda:1: layers 40-79" in text


# ---------------------------------------------------------------------------- fast path refusal
def test_fast_path_refuses_a_model_on_two_gpus_in_one_line(stories):
    ids = torch.tensor([[1, 45, 99, 300]])
    with torch.no_grad():
        want = stories.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                do_sample=False, pad_token_id=0)
    # What a device map over two GPUs records (ints as transformers writes them); the tensors
    # stay on the CPU here, so the refused model still generates, through transformers.
    stories.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0,
                             "model.layers.2": 1, "model.layers.3": 1, "model.layers.4": "cuda:1",
                             "model.norm": 1, "model.rotary_emb": 0, "lm_head": 1}
    try:
        messages: list[str] = []
        fast = FastGenerator(stories, log=messages.append)
        got = fast.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        got = fast.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    finally:
        del stories.hf_device_map
    assert torch.equal(got, want) and fast.last_path == "transformers"
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "2 devices (cuda:0, cuda:1)" in messages[0] and "using transformers' generate" in messages[0]


@pytest.mark.parametrize("placed", [{"": 0}, {"": "cpu"}, {"model.layers.0": "cpu", "": "disk"},
                                    {"model.layers.0": "cuda:0", "": "cpu"}])
def test_one_accelerator_or_the_cpu_is_not_refused(stories, placed):
    stories.hf_device_map = placed
    try:
        reason = unsupported_reason(stories)
    finally:
        del stories.hf_device_map
    assert reason is None


# ---------------------------------------------------------------------------- the device script
ROOT = Path(__file__).resolve().parents[1]


def test_step_helper_records_each_step_and_fails_the_run(tmp_path):
    script = ". scripts/lib_steps.sh; steps_init; step good 20 echo fine; step bad 20 false; steps_end"
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)}, timeout=60)
    assert done.returncode == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert "good: exit 0" in summary and "fine" in summary and "bad: exit 1" in summary
    assert "done, status 1" in summary and "fine" in (tmp_path / "log.txt").read_text()


def test_multi_gpu_script_names_an_unknown_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "SKIP_INSTALL": "1", "SKIP_BUILD": "1", "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/multi_gpu.sh", "warp"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert "unknown step 'warp'" in summary and "GPU(s)" in summary
