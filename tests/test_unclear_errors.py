"""Bad input gets one line naming the problem and the fix (issue 12, "Unclear"; docs/DESIGN.md §10):
exit 2 for usage errors, 1 for runtime failures, no traceback unless ``gptq --debug``."""

from __future__ import annotations

import errno

import pytest

from gptq_core.cli import backends as backends_cli
from gptq_core.cli.main import main
from gptq_core.errors import CheckpointError

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
