"""What the CLI and the library must never destroy or leave behind: the float model, a user's
folder given as work folder, temporary folders after a kill, and files others cannot read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gptq_core.cli.main import main
from gptq_core.threads import single_thread

DATA = Path(__file__).resolve().parents[1] / "gptq_core" / "data"
STORIES = DATA / "stories260K"
QUANTIZE = ["--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "32",
            "--seed", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture
def calib(tmp_path) -> Path:
    text = (DATA / "text" / "tinystories-sample.txt").read_text(encoding="utf-8")
    path = tmp_path / "calib.txt"
    path.write_text(text[:20000], encoding="utf-8")
    return path


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A private copy of the float stories260K folder (the tests try to destroy it)."""
    target = tmp_path / "float" / "stories260K"
    shutil.copytree(STORIES, target)
    return target


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def quantize(model: Path, out: Path, calib: Path, *extra: str) -> int:
    return main(["quantize", str(model), str(out), "--calibration", str(calib), *QUANTIZE, *extra])


# ---------------------------------------------------------------- output = input, output = work folder
@pytest.mark.parametrize("where", ["same", "inside", "parent", "work"])
def test_output_overlapping_input_or_work_folder_is_refused_before_writing(
    where, model_dir, calib, tmp_path, capsys
):
    extra: list[str] = ["--overwrite"]
    if where == "same":
        out, words = model_dir, "is the model dir"
    elif where == "inside":
        out, words = model_dir / "quantized", "lies inside the model dir"
    elif where == "parent":
        out, words = model_dir.parent, "contains the model dir"
    else:
        out, words = tmp_path / "out", "is the work dir"
        extra += ["--work-dir", str(out)]
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert quantize(model_dir, out, calib, *extra) == 2
    err = capsys.readouterr().err
    assert words in err and "choose" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "out").exists()
