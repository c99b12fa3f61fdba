"""Model folders from the Hugging Face Hub: a hub id (``org/name``) with a ``revision`` becomes a
local snapshot folder through ``huggingface_hub.snapshot_download``.

The hub's own cache is used (``HF_HOME`` / ``HF_HUB_CACHE``), and so are its switches:
``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) reads only what is cached. A local folder
always wins over a hub id of the same spelling. Only the files a GPTQ checkpoint needs are
fetched: configs, safetensors weights and their index, tokenizer files (never pickles).
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError

#: Files fetched from a hub repository: what ``load_quantized`` and the tokenizer read.
HUB_PATTERNS: tuple[str, ...] = (
    "*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.py",
)

#: A hub repository id: ``name`` or ``org/name`` (letters, digits, ``-``, ``_``, ``.``).
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def download_hint(repo_id: str, revision: str | None) -> str:
    """The command that puts ``repo_id`` in the local cache (``hf``, the hub's current CLI)."""
    rev = f" --revision {revision}" if revision else ""
    return f"`hf download {repo_id}{rev}`"


def looks_like_repo_id(name: str) -> bool:
    """Whether ``name`` is spelled like a hub id (``org/name``), not a file system path."""
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.startswith((".", "/", "~"))


def resolve_model_dir(
    model: str | Path,
    revision: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local folder of ``model``: the folder itself, or the cached snapshot of a hub id.

    ``revision`` (a branch, tag or commit hash; default ``main``) applies to hub ids only; a
    local folder with a revision is an error rather than a silent ignore. Every failure is one
    :class:`CheckpointError` line naming the id, the revision and the fix.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(
                f"revision={revision!r} was given but {model} is a local folder; a revision "
                "selects a version of a hub id (org/name), so leave it out for a folder"
            )
        return path
    text = str(model)
    if path.exists():
        raise CheckpointError(f"{model} is a file; give the checkpoint folder or a hub id (org/name)")
    if not looks_like_repo_id(text):
        raise CheckpointError(
            f"{model} is not a folder, nor a hub id (org/name); check the path"
        )
    return _snapshot(text, revision, cache_dir, local_files_only, token)


def _snapshot(
    repo_id: str, revision: str | None, cache_dir: str | Path | None, local_files_only: bool,
    token: str | bool | None,
) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # a dependency of transformers, so present unless broken
        raise CheckpointError(
            f"{repo_id} is not a local folder and huggingface_hub cannot be imported to fetch it; "
            "`pip install huggingface_hub` or give a local folder"
        ) from None
    from huggingface_hub import constants

    rev = revision or "main"
    where = f"hub id '{repo_id}' at revision '{rev}'"
    # HF_HUB_OFFLINE means the cache only; snapshot_download still lists a commit's files
    # online unless told, so the switch is passed on explicitly.
    offline = local_files_only or bool(constants.HF_HUB_OFFLINE)
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir),
            allow_patterns=list(HUB_PATTERNS), local_files_only=offline, token=token,
        )
    except RevisionNotFoundError:
        raise CheckpointError(
            f"{where}: the repository has no such revision; give a branch, tag or commit hash it has"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{where}: no such repository on the hub (or it is private: log in with `hf auth login`); "
            "check the id, or give a local folder"
        ) from None
    except (LocalEntryNotFoundError, EntryNotFoundError):
        raise CheckpointError(
            f"{where} is not in the local cache and the hub cannot be reached (offline: "
            f"HF_HUB_OFFLINE or no network); fetch it first with {download_hint(repo_id, revision)}, "
            "or give a local folder"
        ) from None
    except ValueError as exc:  # a malformed id or revision
        raise CheckpointError(f"{where}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:  # connection failures and incomplete snapshots
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{where} could not be fetched ({first}); fetch it with {download_hint(repo_id, revision)}"
        ) from None
    return Path(folder)
