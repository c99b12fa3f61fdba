"""`gptq backends list`, `gptq --version`, `gptq --help` (in process; the broken-plugin case
runs in a subprocess in test_registry.py)."""

from __future__ import annotations

import json

import pytest

from gptq_core import __version__
from gptq_core.cli import main
from gptq_core.registry import get_registry


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_list_json(capsys):
    code, out = run(capsys, "backends", "list", "--json", "--device", "cpu")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    for row in rows.values():
        assert {"name", "distribution", "version", "status", "bits", "reasons"} <= row.keys()
        assert row["status"] in ("available", "unavailable", "broken", "disabled")
    torch_row = rows["torch"]
    assert torch_row["status"] == "available" and torch_row["bits"] == [2, 3, 4, 8]
    assert torch_row["distribution"] == "gptq-backends" and torch_row["reasons"] == []
    example = rows["example"]
    assert example["status"] == "available" and example["bits"] == [4, 8]
    assert example["distribution"] == "gptq-backend-example" and example["priority"] == -10
    for row in rows.values():  # unavailable backends say why
        assert (row["status"] == "available") == (row["reasons"] == []), row["name"]


def test_list_table(capsys):
    code, out = run(capsys, "backends", "list", "--device", "cpu")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "backends for cpu (CPU):"
    assert lines[1].split() == ["name", "distribution", "status", "kinds", "bits", "groups",
                                "prio", "here"]
    torch_line = next(line for line in lines if line.startswith("torch "))
    assert "gptq-backends" in torch_line and "available" in torch_line
    assert "2,3,4,8" in torch_line and torch_line.endswith("usable")
    example_line = next(line for line in lines if line.startswith("example "))
    assert "4,8" in example_line


@pytest.fixture
def example_disabled(monkeypatch):
    """The process-wide registry discovered again with GPTQ_DISABLED_BACKENDS=example."""
    monkeypatch.setenv("GPTQ_DISABLED_BACKENDS", "example")
    get_registry(refresh=True)
    yield
    monkeypatch.delenv("GPTQ_DISABLED_BACKENDS")
    get_registry(refresh=True)


def test_list_table_shows_disabled_backends(capsys, example_disabled):
    code, out = run(capsys, "backends", "list", "--device", "cpu")
    assert code == 0
    example_line = next(line for line in out.splitlines() if line.startswith("example "))
    assert example_line.split()[1:4] == ["gptq-backend-example", get_registry().disabled[
        "example"].version, "disabled"]
    assert example_line.endswith("disabled by GPTQ_DISABLED_BACKENDS")


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gptq-core {__version__}"
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "backends" in capsys.readouterr().out


def test_backends_without_subcommand_prints_help(capsys):
    code, out = run(capsys, "backends")
    assert code == 0 and "list" in out
