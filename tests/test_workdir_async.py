"""The work folder's background writer (gptq_core/quantize/workdir.py): commits return after a
host copy, files are written in order on one thread, ``progress.json`` stays the commit point.

Crashes are injected before the write (in ``commit``), while it is in flight (the next layer
fails), inside it (a write error) and by killing the process mid-write; every resumed run must
give the bytes of an uninterrupted one, and no recorded layer may lack a complete file.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from gptq_core import GPTQError, QuantizeConfig, quantize_rtn
from gptq_core.models import get_architecture
from gptq_core.quantize import quantize_model
from gptq_core.quantize import workdir
from gptq_core.quantize.workdir import WorkDir

#: Llama's true-sequential groups, from the architecture table
GROUPS = [list(g) for g in get_architecture(LlamaConfig()).groups]
#: float target on: two hidden-state sets per layer, as in the default CLI run
CFG = QuantizeConfig(bits=4, group_size=16, sym=False, float_target=0.5)
LAYERS = 3


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(7)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def quantize(work: Path | None, model: LlamaForCausalLM | None = None):
    model = model or tiny_llama()
    data = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(7))
    return quantize_model(model, data, CFG, model.model.layers, GROUPS, device="cpu", work_dir=work,
                          progress=False, batch_size=2)


@pytest.fixture(scope="module")
def reference():
    return quantize(None)


def assert_same(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for t in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            x, y = getattr(a[name], t), getattr(b[name], t)
            assert (x is None and y is None) or torch.equal(x, y), f"{name}.{t}"


def recorded(work: Path) -> int:
    """The finished-layer count on disk; every recorded layer's files must be complete."""
    progress = work / "progress.json"
    done = json.loads(progress.read_text())["done"] if progress.exists() else 0
    for i in range(done):
        assert load_file(str(work / f"layer_{i:05d}.safetensors"))
    if done:
        assert len(load_file(str(work / f"hidden_{done - 1:05d}.safetensors"))) == 2 * 2  # 2 batches x 2 tracks
    return done


class Gate:
    """Holds the writer at its first ``_atomic_save`` of a file whose name starts with ``prefix``
    until released; then runs the real save, or raises ``error`` instead."""

    def __init__(self, monkeypatch, prefix: str, error: BaseException | None = None) -> None:
        self.prefix, self.error = prefix, error
        self.reached, self.release = threading.Event(), threading.Event()
        real = workdir._atomic_save

        def save(tensors, path, metadata):
            if path.name.startswith(self.prefix) and not self.reached.is_set():
                self.reached.set()
                assert self.release.wait(60), "the test never released the writer"
                if self.error is not None:
                    raise self.error
            return real(tensors, path, metadata)

        monkeypatch.setattr(workdir, "_atomic_save", save)


def disk_full() -> OSError:
    return OSError(28, "No space left on device")


# ---------------------------------------------------------------------------- WorkDir alone
def packed(seed: int):
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))
    return {"mlp.down_proj": quantize_rtn(w, 4, 16, bias=torch.ones(8))}


def test_commit_returns_before_the_write_and_keeps_its_own_copies(tmp_path, monkeypatch):
    work = WorkDir(tmp_path / "w", {"run": 1})
    gate = Gate(monkeypatch, "layer_")
    pw, hidden = packed(0), [torch.randn(2, 3, 4), torch.randn(2, 3, 4)]
    want_pw = {k: v.clone() for k, v in vars(pw["mlp.down_proj"]).items() if torch.is_tensor(v)}
    want_hidden = [h.clone() for h in hidden]
    work.commit(0, pw, hidden)
    assert gate.reached.wait(60)
    # the caller reuses its tensors in place (a layer may write into its input)
    for h in hidden:
        h.add_(1)
    for v in vars(pw["mlp.down_proj"]).values():
        if torch.is_tensor(v):
            v.add_(1)
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.append(work.done))
    reader.start()
    reader.join(0.5)
    assert reader.is_alive() and seen == []  # done waits for the write: the layer is not on disk yet
    assert not (work.path / "progress.json").exists()
    gate.release.set()
    reader.join(60)
    assert seen == [1] and work.done == 1
    again = WorkDir(work.path, {"run": 1})
    assert again.done == 1
    got = again.load_layer(0)["mlp.down_proj"]
    for k, v in want_pw.items():
        assert torch.equal(getattr(got, k), v), k
    assert all(torch.equal(a, b) for a, b in zip(again.load_hidden(0, 2), want_hidden))


def test_the_previous_hidden_file_goes_only_after_the_next_layer_is_recorded(tmp_path, monkeypatch):
    work = WorkDir(tmp_path / "w", {"run": 1})
    work.commit(0, packed(0), [torch.randn(2, 4)])
    work.flush()
    gate = Gate(monkeypatch, "hidden_00001")
    work.commit(1, packed(1), [torch.randn(2, 4)])
    assert gate.reached.wait(60)
    assert (work.path / "hidden_00000.safetensors").exists()
    gate.release.set()
    work.flush()
    assert work.done == 2
    assert sorted(p.name for p in work.path.glob("hidden_*")) == ["hidden_00001.safetensors"]


def test_a_write_error_is_one_line_at_the_next_commit(tmp_path, monkeypatch):
    work = WorkDir(tmp_path / "w", {"run": 1})
    work.commit(0, packed(0), [torch.randn(2, 4)])
    gate = Gate(monkeypatch, "hidden_00001", disk_full())
    gate.release.set()
    work.commit(1, packed(1), [torch.randn(2, 4)])  # returns: the write fails in the background
    with pytest.raises(GPTQError) as err:
        work.commit(2, packed(2), [torch.randn(2, 4)])
    text = str(err.value)
    assert "\n" not in text and str(work.path) in text and "No space left on device" in text
    assert "holds 1 finished layers" in text
    assert json.loads((work.path / "progress.json").read_text()) == {"done": 1}
    assert not (work.path / "layer_00002.safetensors").exists()  # nothing after the failure
    work.flush()  # reported once


def test_a_write_error_is_raised_by_flush_and_by_done(tmp_path, monkeypatch):
    work = WorkDir(tmp_path / "w", {"run": 1})
    Gate(monkeypatch, "layer_00000", disk_full()).release.set()
    work.commit(0, packed(0), [torch.randn(2, 4)])
    with pytest.raises(GPTQError, match="could not write the work folder .*holds 0 finished layers"):
        work.flush()
    assert not (work.path / "progress.json").exists()
    work2 = WorkDir(tmp_path / "w2", {"run": 1})
    Gate(monkeypatch, "layer_00000", disk_full()).release.set()
    work2.commit(0, packed(0), [torch.randn(2, 4)])
    with pytest.raises(GPTQError, match="could not write"):
        work2.done  # noqa: B018  (a reader is never told a failed layer is done)


# ---------------------------------------------------------------------------- the driver
def test_a_write_error_inside_the_writer_resumes_byte_identically(reference, tmp_path, monkeypatch):
    work = tmp_path / "w"
    Gate(monkeypatch, "hidden_00001", disk_full()).release.set()
    with pytest.raises(GPTQError, match="could not write the work folder"):
        quantize(work)
    assert recorded(work) == 1
    monkeypatch.undo()
    assert_same(reference, quantize(work))


def test_the_last_layers_write_error_is_raised_before_returning(reference, tmp_path, monkeypatch):
    work = tmp_path / "w"
    Gate(monkeypatch, f"layer_{LAYERS - 1:05d}", disk_full()).release.set()
    with pytest.raises(GPTQError, match="could not write the work folder"):
        quantize(work)
    assert recorded(work) == LAYERS - 1
    monkeypatch.undo()
    assert_same(reference, quantize(work))


def test_a_crash_before_the_write_starts(reference, tmp_path, monkeypatch):
    work = tmp_path / "w"
    commit = WorkDir.commit

    def failing(self, index, packed, hidden):
        if index == 1:
            raise RuntimeError("out of host memory")
        commit(self, index, packed, hidden)

    monkeypatch.setattr(WorkDir, "commit", failing)
    with pytest.raises(RuntimeError, match="out of host memory"):
        quantize(work)
    assert recorded(work) == 1
    monkeypatch.undo()
    assert_same(reference, quantize(work))


def crash_layer_when(model: LlamaForCausalLM, layer: int, gate: Gate) -> None:
    """Layer ``layer`` fails once the writer is held, then lets the writer go on."""

    def crash(*_):
        assert gate.reached.wait(60)
        gate.release.set()
        raise RuntimeError("simulated crash")

    model.model.layers[layer].mlp.down_proj.register_forward_hook(crash)


def test_a_crash_while_the_write_is_in_flight_still_records_that_layer(reference, tmp_path, monkeypatch):
    work = tmp_path / "w"
    gate = Gate(monkeypatch, "hidden_00001")
    model = tiny_llama()
    crash_layer_when(model, 2, gate)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quantize(work, model)
    assert recorded(work) == 2  # the driver waited for layer 1's write
    monkeypatch.undo()
    assert_same(reference, quantize(work))


def test_a_write_error_does_not_mask_the_crash_under_way(reference, tmp_path, monkeypatch, caplog):
    work = tmp_path / "w"
    gate = Gate(monkeypatch, "hidden_00001", disk_full())
    model = tiny_llama()
    crash_layer_when(model, 2, gate)
    with caplog.at_level(logging.ERROR, logger="gptq_core.quantize"):
        with pytest.raises(RuntimeError, match="simulated crash"):
            quantize(work, model)
    assert any("could not write the work folder" in r.getMessage() and "No space left" in r.getMessage()
               for r in caplog.records)
    assert recorded(work) == 1
    monkeypatch.undo()
    assert_same(reference, quantize(work))


KILL = """
import os, sys
sys.path.insert(0, {tests!r})
from gptq_core.quantize import workdir
from test_workdir_async import quantize
point, name = {point!r}, {name!r}
real_umask, real_text = workdir.honour_umask, workdir._atomic_write_text

def umask(path):  # between writing a file's temporary and renaming it into place
    if point == "temporary" and path.name.startswith(name):
        os._exit(9)
    real_umask(path)

def text(path, content):  # the progress record, after the layer's files are renamed into place
    if point == "progress" and path.name == "progress.json" and content == name:
        os._exit(9)
    real_text(path, content)

workdir.honour_umask, workdir._atomic_write_text = umask, text
quantize({work!r})
sys.exit(3)
"""


@pytest.mark.parametrize("point,name,done", [
    ("temporary", "hidden_00001", 1),  # killed while layer 1's hidden states are half written
    ("progress", json.dumps({"done": 2}), 1),  # killed with layer 1's files complete, not recorded
])
def test_a_process_killed_inside_the_writer_resumes_byte_identically(reference, tmp_path, point, name, done):
    work = tmp_path / "w"
    script = KILL.format(tests=str(Path(__file__).parent), point=point, name=name, work=str(work))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert recorded(work) == done
    assert_same(reference, quantize(work))
