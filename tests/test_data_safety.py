"""What the CLI and the library must never destroy or leave behind: the float model, a user's
folder given as work folder, temporary folders after a kill, and files others cannot read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gptq_core.cli.main import main

DATA = Path(__file__).resolve().parents[1] / "gptq_core" / "data"
STORIES = DATA / "stories260K"
QUANTIZE = ["--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "32",
            "--seed", "1", "--device", "cpu", "--no-progress"]


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


# ---------------------------------------------------------------- the work folder
def test_a_users_non_empty_folder_is_refused_as_work_folder_and_left_untouched(
    model_dir, calib, tmp_path, capsys
):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "progress.json").write_text('{"done": 99}')
    (mine / "weights.safetensors").write_bytes(b"precious")
    capsys.readouterr()
    assert quantize(model_dir, tmp_path / "out", calib, "--work-dir", str(mine)) == 2
    err = capsys.readouterr().err
    assert str(mine) in err and "not made by gptq-core" in err and "new or empty folder" in err, err
    assert snapshot(mine) == {"progress.json": b'{"done": 99}', "weights.safetensors": b"precious"}
    assert not (tmp_path / "out").exists()


def test_work_folder_that_is_a_file_is_a_clear_error(model_dir, calib, tmp_path, capsys):
    afile = tmp_path / "work.txt"
    afile.write_text("not a folder")
    capsys.readouterr()
    assert quantize(model_dir, tmp_path / "out", calib, "--work-dir", str(afile)) == 2
    err = capsys.readouterr().err
    assert f"work folder '{afile}' is a file" in err and len(err.strip().splitlines()) == 1, err
    assert afile.read_text() == "not a folder"


def test_the_library_refuses_a_users_folder_too(tmp_path):
    from gptq_core.errors import GPTQError
    from gptq_core.quantize.workdir import MARKER, WorkDir

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "layer_00000.safetensors").write_bytes(b"user data")
    with pytest.raises(GPTQError, match="not made by gptq-core"):
        WorkDir(mine, {"run": 1}, resume=False)
    assert (mine / "layer_00000.safetensors").read_bytes() == b"user data"
    fresh = WorkDir(tmp_path / "fresh", {"run": 1})
    assert (fresh.path / MARKER).is_file()
    WorkDir(tmp_path / "fresh", {"run": 2}, resume=False)  # ours: may be cleaned and reused


# ---------------------------------------------------------------- SIGTERM, SIGKILL and temporary folders
KILL_DURING_SAVE = """
import os, signal, sys
from gptq_core.checkpoint import save
real = save.write_configs
def write_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.{signal})
save.write_configs = write_then_die
from gptq_core.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def quantize_and_die(signal_name: str, model: Path, out: Path, calib: Path):
    import subprocess
    import sys

    code = KILL_DURING_SAVE.replace("{signal}", signal_name)
    argv = ["quantize", str(model), str(out), "--calibration", str(calib), *QUANTIZE]
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_sigterm_during_save_cleans_up_like_ctrl_c(model_dir, calib, tmp_path):
    out = tmp_path / "out"
    done = quantize_and_die("SIGTERM", model_dir, out, calib)
    assert done.returncode == 143, done.stderr
    assert "terminated (SIGTERM)" in done.stderr and "Traceback" not in done.stderr
    assert temporaries(tmp_path) == [] and not out.exists()
    assert (tmp_path / ".out.gptq-work" / "progress.json").is_file()  # resumable


def test_a_killed_saves_temporary_folder_is_swept_by_the_next_save(model_dir, calib, tmp_path):
    out = tmp_path / "out"
    done = quantize_and_die("SIGKILL", model_dir, out, calib)
    assert done.returncode == -9
    assert len(temporaries(tmp_path)) == 1 and not out.exists()
    assert quantize(model_dir, out, calib) == 0
    assert temporaries(tmp_path) == []
    assert (out / "model.safetensors").is_file() and not (out / ".gptq-partial").exists()


def test_only_our_dead_temporaries_are_swept(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    from gptq_core.checkpoint.files import PARTIAL_MARKER, atomic_directory

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    host = socket.gethostname()

    def make(name: str, pid: int | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
        if pid is not None:
            (folder / PARTIAL_MARKER).write_text(json.dumps({"pid": pid, "host": host}))
        return folder

    stale = make(".out.tmp-dead1", int(dead.stdout))
    running = make(".out.tmp-alive", os.getpid())  # a save still in progress
    users = make(".out.tmp-user", None)  # our pattern, but no marker: not provably ours
    other = make(".other.tmp-dead", int(dead.stdout))  # another output's
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "file.txt").write_text("x")
    assert not stale.exists()
    assert running.exists() and users.exists() and other.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["file.txt"]


# ---------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_and_work_folder_honour_the_umask(umask, model_dir, calib, tmp_path):
    import os
    import stat

    previous = os.umask(umask)
    try:
        assert quantize(model_dir, tmp_path / "out", calib, "--keep-work-dir") == 0
    finally:
        os.umask(previous)
    written = [tmp_path / "out", *(tmp_path / "out").rglob("*"),
               tmp_path / ".out.gptq-work", *(tmp_path / ".out.gptq-work").rglob("*")]
    assert any(p.name == "model.safetensors" for p in written)
    assert any(p.name.startswith("layer_") for p in written)
    for path in written:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, f"{path}: {oct(path.stat().st_mode)}"


# ---------------------------------------------------------------- one run per output
def test_a_second_run_to_a_locked_output_stops_at_once_naming_the_holder(model_dir, calib, tmp_path, capsys):
    import os
    import socket

    from gptq_core.checkpoint.locks import hold_lock

    out = tmp_path / "out"
    with hold_lock(out):  # a run in progress (this process: alive)
        capsys.readouterr()
        assert quantize(model_dir, out, calib) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()} on {socket.gethostname()}, started " in err, err
        assert "in use by another gptq run" in err and len(err.strip().splitlines()) == 1
        assert not out.exists() and not (tmp_path / ".out.gptq-work").exists()
    work = tmp_path / "shared-work"
    with hold_lock(work, "work folder"):
        assert quantize(model_dir, tmp_path / "other", calib, "--work-dir", str(work)) == 2
        assert "work folder" in capsys.readouterr().err
    assert quantize(model_dir, out, calib) == 0  # released
    assert not (tmp_path / ".out.gptq-lock").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(model_dir, calib, tmp_path):
    import json
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    lock = tmp_path / ".out.gptq-lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                "started": "2026-01-01 00:00:00 UTC"}))
    assert quantize(model_dir, tmp_path / "out", calib) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and not lock.exists()


def _unwritable_folder() -> Path | None:
    """A folder of a file system that takes no new files even for root (sysfs), if any."""
    sys_dir = Path("/sys")
    probe = sys_dir / ".gptq-probe"
    try:
        probe.write_bytes(b"0")
    except OSError:
        return sys_dir
    probe.unlink()
    return None


def test_an_unwritable_output_fails_before_any_work(capsys):
    folder = _unwritable_folder()
    if folder is None:
        pytest.skip("no read-only file system on this machine")
    code = main(["quantize", str(STORIES), str(folder / "gptq-out"), "--calibration",
                 str(DATA / "text" / "tinystories-sample.txt"), "--nsamples", "2", "--seqlen", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "cannot be written" in err[0] and "writable file system" in err[0]
