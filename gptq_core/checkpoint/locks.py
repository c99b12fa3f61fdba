"""A lock file beside a folder a long run writes, so a second run to it stops at once.

``.NAME.gptq-lock`` sits beside the folder (which may not exist yet) and holds who took it:
pid, host and start time, which the refusal names. It is created complete in one step (a
hard link of a fully written file), so a reader never sees a half-written lock. A lock whose
process is gone from this host (SIGKILL, a crash) is stale and taken over; a lock from
another host cannot be checked and is reported with the path to delete.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, ExitStack
from pathlib import Path

from ..errors import GPTQError
from .files import pid_alive


class LockedError(GPTQError, RuntimeError):
    """Another run holds the lock on a folder this run would write."""


def lock_path(folder: str | os.PathLike) -> Path:
    target = Path(folder).absolute()
    return target.with_name(f".{target.name}.gptq-lock")


def _holder(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {"pid": int(data["pid"]), "host": str(data["host"]), "started": str(data["started"])}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return {"pid": -1, "host": "?", "started": "?"}  # unreadable: report, never take over


def _try_create(path: Path, me: dict) -> bool:
    staging = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    staging.write_text(json.dumps(me), encoding="utf-8")
    try:
        os.link(staging, path)
        return True
    except FileExistsError:
        return False
    finally:
        staging.unlink(missing_ok=True)


@contextmanager
def hold_lock(folder: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Hold the lock of ``folder`` for the body; raise :class:`LockedError` if a live run has it."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
    for _ in range(3):
        if _try_create(path, me):
            break
        holder = _holder(path)
        if holder is None:
            continue  # released meanwhile: try again
        if holder["host"] == me["host"] and holder["pid"] > 0 and not pid_alive(holder["pid"]):
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        raise LockedError(
            f"{what} {Path(folder)} is in use by another gptq run (pid {holder['pid']} on "
            f"{holder['host']}, started {holder['started']}); wait for it to finish, or delete "
            f"{path} if that run is gone"
        )
    else:
        raise LockedError(f"could not take the lock {path}; delete it if no gptq run uses {folder}")
    try:
        yield path
    finally:
        if _holder(path) == me:
            path.unlink(missing_ok=True)


@contextmanager
def hold_locks(folders: dict[str, str | os.PathLike]) -> Iterator[None]:
    """Hold the locks of several folders (``{what: folder}``), each once, in a fixed order."""
    with ExitStack() as stack:
        seen: set[Path] = set()
        for what, folder in folders.items():
            path = lock_path(folder)
            if path not in seen:
                seen.add(path)
                stack.enter_context(hold_lock(folder, what))
        yield
