"""The checkpoint manifest: size and sha256 of every weight file, so corrupt bytes are caught.

``gptq_manifest.json`` is written last into the temporary folder of a save (docs/DESIGN.md §2)
and checked on load. Peers' readers (transformers, AutoGPTQ, GPTQModel, vLLM) open only the
config files, the safetensors index and the shards, so they ignore it; checkpoints without it
(the peers') load unchecked. Besides each file's digest it holds one digest per tensor
(dtype, shape and bytes), which lets an error name the damaged tensors and lets a file that a
tool rewrote (adding a tensor, changing metadata) pass as long as every tensor it vouches for
is intact: the ordinary header and value checks judge the rest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import CheckpointError

MANIFEST_FILE = "gptq_manifest.json"
MANIFEST_FORMAT = "gptq-core-manifest/1"
_CHUNK = 16 * 2**20


def _read_into(fh, count: int, *hashes) -> None:
    while count > 0:
        block = fh.read(min(count, _CHUNK))
        if not block:
            raise EOFError("file ends inside a tensor")
        for h in hashes:
            h.update(block)
        count -= len(block)


def file_digest(path: Path) -> str:
    """sha256 of a whole file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def tensor_digests(path: Path) -> dict[str, str]:
    """``{tensor: sha256 of its dtype, shape and bytes}`` of one safetensors file."""
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(length))
            base = 8 + length
            entries = sorted(
                (v["data_offsets"][0], v["data_offsets"][1], k, v["dtype"], v["shape"])
                for k, v in header.items() if k != "__metadata__"
            )
            out = {}
            for start, end, name, dtype, shape in entries:
                h = hashlib.sha256(f"{dtype}:{list(shape)}:".encode())
                fh.seek(base + start)
                _read_into(fh, end - start, h)
                out[name] = h.hexdigest()
            return out
    except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); the download or copy is "
            "probably incomplete or corrupt: fetch or write the checkpoint again"
        ) from None


def write_manifest(folder: Path, files: Iterable[str]) -> Path:
    """Record size, sha256 and per-tensor digests of ``files`` (names inside ``folder``)."""
    entries = {}
    for name in files:
        path = folder / name
        entries[name] = {
            "size": path.stat().st_size,
            "sha256": file_digest(path),
            "tensors": tensor_digests(path),
        }
    target = folder / MANIFEST_FILE
    target.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1) + "\n")
    return target


def read_manifest(folder: Path) -> dict[str, dict] | None:
    """The manifest's ``files`` table, or None when the checkpoint has none (a peer's)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if data.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        for entry in files.values():
            int(entry["size"]), str(entry["sha256"]), dict(entry["tensors"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path} is not a valid checkpoint manifest ({exc}); delete it to load the "
            "checkpoint unchecked, or pass verify=False"
        ) from None
    return files


def verify_files(folder: Path, files: Iterable[Path]) -> None:
    """Check every weight file against the manifest (if any); raise naming the damaged file."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    for path in files:
        entry = manifest.get(path.name)
        if entry is None:
            raise CheckpointError(
                f"{path.name} is not listed in {MANIFEST_FILE}, so the manifest belongs to "
                f"other weights; save the checkpoint again, delete {MANIFEST_FILE}, or pass "
                "verify=False"
            )
        if path.stat().st_size == entry["size"] and file_digest(path) == entry["sha256"]:
            continue
        found = tensor_digests(path)
        bad = sorted(k for k, digest in entry["tensors"].items() if found.get(k) != digest)
        if not bad:
            continue  # rewritten, but every tensor the manifest vouches for is intact
        shown = ", ".join(f"'{k}'" for k in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise CheckpointError(
            f"{path.name} does not match its checksum in {MANIFEST_FILE} (tensors {shown} "
            "differ): the file was damaged in download, copy or storage; fetch or write the "
            "checkpoint again, or pass verify=False to load it anyway"
        )
