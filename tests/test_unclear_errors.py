"""Bad input gets one line naming the problem and the fix (issue 12, "Unclear"; docs/DESIGN.md §10):
exit 2 for usage errors, 1 for runtime failures, no traceback unless ``gptq --debug``."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from gptq_core.cli import backends as backends_cli
from gptq_core.cli.main import main
from gptq_core.errors import CalibrationError, CheckpointError, GPTQError
from gptq_core.quantize import prepare_calibration, token_stream

STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"

#: (exception escaping a command, exit code, text the one-line error must hold)
FAILURES = [
    (CheckpointError("model.safetensors is truncated; re-download it"), 2, "re-download"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere/x"), 2, "/nowhere/x"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp"), 2, "not a folder"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/etc/hostname/x"), 2, "not a file"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/out"), 2, "permissions"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2, "not UTF-8"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/out"), 2, "writable"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/out"), 1, "disk is full"),
    (RuntimeError("CUDA error: an illegal memory access\nsecond line"), 1, "--debug"),
]


def _failing_command(monkeypatch, exc: BaseException) -> None:
    """``gptq backends list`` raising ``exc`` (a fault injected where the command runs)."""
    def fail(args):
        raise exc

    monkeypatch.setattr(backends_cli, "_list", fail)


@pytest.mark.parametrize(("exc", "code", "text"), FAILURES, ids=lambda v: type(v).__name__)
def test_a_failure_is_one_line_and_an_exit_code(monkeypatch, capsys, exc, code, text):
    _failing_command(monkeypatch, exc)
    assert main(["backends", "list"]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("gptq backends: error: ") and err.count("\n") == 1, err
    assert text in err


def test_debug_shows_the_traceback(monkeypatch, capsys):
    _failing_command(monkeypatch, RuntimeError("boom"))
    assert main(["--debug", "backends", "list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("(a runtime failure; `gptq --debug ...` shows the traceback)")


# ---------------------------------------------------------------------------- text files

#: (file name, bytes, text the error must hold): text that is not UTF-8, and binary data.
NOT_TEXT = [
    ("latin1.txt", "Once upon a time, a café.".encode("latin-1"), "not UTF-8 text"),
    ("records.jsonl", '{"text": "na\xefve"}\n'.encode("latin-1"), "not UTF-8 text"),
    ("weights.txt", bytes(range(256)) * 8, "binary"),
]


@pytest.mark.parametrize(("name", "raw", "text"), NOT_TEXT, ids=[n for n, _, _ in NOT_TEXT])
def test_a_file_that_is_not_utf8_text_is_named(tmp_path, name, raw, text):
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(CalibrationError, match=f"calibration file '{path}' is {text}"):
        prepare_calibration(path, None, nsamples=1, seqlen=4)
    with pytest.raises(CalibrationError, match=f"text file '{path}' is"):
        token_stream(path)


def test_a_folder_given_as_a_file_is_named(tmp_path):
    with pytest.raises(CalibrationError, match="is a folder; give a text"):
        prepare_calibration(tmp_path, None, nsamples=1, seqlen=4)
    with pytest.raises(CalibrationError, match=f"text file '{tmp_path}' is a folder"):
        token_stream(tmp_path)


def test_gptq_eval_on_binary_text_is_one_line(tmp_path, capsys):
    """The whole path through the CLI: exit 2, the file named, the word "text" (eval does not
    calibrate)."""
    path = tmp_path / "eval.txt"
    path.write_bytes(b"\xdf\xff" * 100)
    assert main(["eval", str(STORIES), "--text", str(path), "--window", "64"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' load progress
    assert last.startswith("gptq eval: error: text file") and f"'{path}' is not UTF-8 text" in last


# ---------------------------------------------------------------------------- disabled backends
@pytest.fixture
def torch_disabled(monkeypatch):
    """The process-wide registry discovered again with GPTQ_DISABLED_BACKENDS=torch."""
    from gptq_core import get_registry

    monkeypatch.setenv("GPTQ_DISABLED_BACKENDS", "torch")
    monkeypatch.delenv("GPTQ_BACKEND", raising=False)
    yield get_registry(refresh=True)
    monkeypatch.delenv("GPTQ_DISABLED_BACKENDS")
    get_registry(refresh=True)


def _bind(backend: str):
    import torch

    from gptq_core import DeviceInfo, LayerSpec, selector
    from gptq_core.testing import random_packed

    weight = random_packed(4, 32, in_features=64, out_features=16, seed=7)
    return selector.bind(weight, DeviceInfo.of("cpu"), LayerSpec.of(weight, torch.float16), backend=backend)


def test_asking_for_a_disabled_backend_says_so(torch_disabled):
    from gptq_core.errors import NoBackendError

    with pytest.raises(NoBackendError, match="'torch' is disabled by GPTQ_DISABLED_BACKENDS; remove it"):
        _bind("torch")


def test_a_disabled_backend_first_in_a_chain_is_not_skipped_silently(torch_disabled, caplog):
    with caplog.at_level("WARNING", logger="gptq_core.selector"):
        binding = _bind("torch,example")
    assert binding.backend.name == "example"
    assert "backend 'torch' was asked for but is disabled by GPTQ_DISABLED_BACKENDS" in caplog.text


# ---------------------------------------------------------------------------- unknown model types
def _config_folder(tmp_path, **config) -> Path:
    import json

    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_an_unknown_model_type_gets_advice_the_cli_can_follow(tmp_path):
    from gptq_core.models import check_model_type_known

    folder = _config_folder(tmp_path, model_type="foobar")
    with pytest.raises(CheckpointError, match="model_type 'foobar' is unknown to transformers .*upgrade") as err:
        check_model_type_known(folder)
    assert "trust_remote_code" not in str(err.value) and "\n" not in str(err.value)
    remote = _config_folder(tmp_path, model_type="foobar", auto_map={"AutoConfig": "x.FooConfig"})
    with pytest.raises(CheckpointError, match="from Python with trust_remote_code=True; the gptq CLI never"):
        check_model_type_known(remote)
    check_model_type_known(remote, trust_remote_code=True)  # trusted: transformers runs its code
    check_model_type_known(_config_folder(tmp_path, model_type="llama"))


def test_token_ids_outside_the_vocabulary_are_named(tmp_path):
    from gptq_core import AutoGPTQForCausalLM, QuantizeConfig

    model = AutoGPTQForCausalLM.from_pretrained(STORIES, QuantizeConfig(bits=4, group_size=32))
    with pytest.raises(GPTQError, match="token id 1000000, outside the model's vocabulary"):
        model.generate(torch.tensor([[5, 10**6]]), max_new_tokens=2)


def test_a_stock_model_saves_no_auto_map_pointing_at_code_it_did_not_copy(tmp_path):
    from gptq_core import AutoGPTQForCausalLM, QuantizeConfig

    model = AutoGPTQForCausalLM.from_pretrained(STORIES, QuantizeConfig(bits=4, group_size=32))
    model.model.config.auto_map = {"AutoConfig": "configuration_x.XConfig"}
    model.quantize(torch.randint(3, 500, (4, 32)), progress=False)
    out = model.save_quantized(tmp_path / "q")
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    AutoGPTQForCausalLM.from_quantized(out, device="cpu", trust_remote_code=True)
