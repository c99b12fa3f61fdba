"""File names of a checkpoint folder, shard planning, and the atomic write of a whole folder.

A checkpoint is written into a temporary folder beside its target and renamed into place only
once every file is complete, so a crash leaves either the old folder or the new one, never a
half-written mix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointError

CONFIG_FILE = "config.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model-{index:05d}-of-{total:05d}.safetensors"
#: Files a tokenizer may consist of; copied from the source model folder when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
#: Pickle-based weight files: never opened unless the caller trusts the checkpoint.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"2GB"``, ``"500MiB"`` or a byte count -> bytes (transformers' spelling of shard sizes)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if match is None:
            raise CheckpointError(
                f"max_shard_size={size!r} is not a size; use bytes or e.g. '2GB', '500MB', '1GiB'"
            )
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {size!r}")
    return value


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Split tensors (name, bytes), in order, into shards of at most ``max_bytes``.

    A tensor larger than the limit gets a shard of its own (as transformers does).
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """File names for ``count`` shards: ``model.safetensors`` alone, else numbered shards."""
    if count == 1:
        return [WEIGHTS_FILE]
    return [SHARD_PATTERN.format(index=i + 1, total=count) for i in range(count)]


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty folder (or a file) unless ``overwrite`` is set."""
    if not out_dir.exists():
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    if not overwrite:
        what = "folder" if out_dir.is_dir() else "file"
        raise CheckpointError(
            f"{out_dir} already exists and is a non-empty {what}; choose another output folder "
            "or pass overwrite=True (--overwrite) to replace it"
        )


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> None:
    """Refuse, before hours of quantization, a ``folder`` whose nearest existing parent cannot
    take a file (a read-only or full file system, no permission): one line naming it."""
    parent = Path(folder).absolute()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return  # a file in the way: the folder checks name that problem
    probe = parent / f".gptq-write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"0")
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CheckpointError(
            f"the {what} {folder} cannot be written ({parent}: {reason}); choose a folder on a "
            "writable file system with free space"
        ) from None
    finally:
        probe.unlink(missing_ok=True)


def check_apart(
    out_dir: str | os.PathLike, *, what: str = "output folder", **others: str | os.PathLike | None
) -> None:
    """Refuse a folder the run writes (``what``) that is, contains or lies inside another one.

    ``others`` names the folders by their role (``model_dir=..., work_dir=...``): replacing
    the output would otherwise delete the float model or the run's progress.
    """
    out = Path(out_dir).resolve()
    for role, other in others.items():
        if other is None:
            continue
        theirs = Path(other).resolve()
        name = role.replace("_", " ")
        if out == theirs:
            relation = f"is the {name}"
        elif theirs.is_relative_to(out):
            relation = f"contains the {name} {theirs}"
        elif out.is_relative_to(theirs):
            relation = f"lies inside the {name} {theirs}"
        else:
            continue
        raise CheckpointError(
            f"{what} {out} {relation}; writing there could destroy it: choose a {what} outside it"
        )


#: Written first into every temporary folder of a save: proves the folder is ours and says
#: which process made it, so a later save may remove it once that process is gone.
PARTIAL_MARKER = ".gptq-partial"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temporaries(out: Path) -> list[Path]:
    """Remove temporary folders of earlier saves of ``out`` whose process died (SIGKILL).

    Only folders named by :func:`atomic_directory`'s pattern that hold its marker, written on
    this host by a process that no longer exists, are removed; anything else is left alone.
    """
    removed = []
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            owner = json.loads((tmp / PARTIAL_MARKER).read_text(encoding="utf-8"))
            mine = owner["host"] == socket.gethostname() and not pid_alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no marker (not ours) or unreadable: leave it
        if mine and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes plain ``open``/``mkdir`` would.

    ``tempfile.mkdtemp`` makes 0700 and safetensors writes 0600, which would hide a checkpoint
    from the other users of a shared machine whatever their umask says.
    """
    mask = current_umask()
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success move it into place atomically.

    On any error (or Ctrl-C) the temporary folder is removed and ``out_dir`` is untouched;
    one left by a killed process is removed by the next save of the same ``out_dir``.
    """
    out = Path(out_dir).absolute()
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        marker = {"pid": os.getpid(), "host": socket.gethostname()}
        (tmp / PARTIAL_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        yield tmp
        honour_umask(tmp)
        _fsync_tree(tmp)
        check_target(out, overwrite)  # it may have appeared while we were writing
        trash = None
        if out.exists() and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif out.exists():
            trash = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(trash)
        try:
            tmp.rename(out)
        except BaseException:
            if trash is not None:
                trash.rename(out)
            raise
        (out / PARTIAL_MARKER).unlink(missing_ok=True)  # only now: a kill before the rename leaves it for the sweep
        if trash is not None:
            if trash.is_dir():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
