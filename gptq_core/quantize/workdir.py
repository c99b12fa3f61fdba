"""The quantizer's work folder: per-layer results, the hidden states to go on from, the log.

Layout (every file written to a temporary name and renamed into place, so a crash never
leaves a half-written file; ``progress.json`` is written last and is the commit point)::

    fingerprint.json          what this run is (config, calibration data, model digest)
    layer_00003.safetensors   packed tensors of every quantized linear of layer 3
    hidden_00003.safetensors  outputs of (quantized) layer 3 for every calibration batch
    progress.json             {"done": 4}: layers 0..3 are finished
    quantize_log.jsonl        one JSON line per quantized linear
    .gptq-work                marker: this folder was made by gptq-core

The tool uses (and cleans) only a folder it made itself: an absent or empty folder gets the
marker; a non-empty folder without it belongs to the user and is refused, untouched.

On a restart with the same folder and a matching fingerprint the driver skips finished
layers and continues from the saved hidden states, which gives byte-identical results.

Resumable after a crash (DESIGN.md §6) must not cost speed: writing a layer's state (two
hidden-state sets of ~2 GB each per layer of a 7B model with the float target) took about half
of each layer's time when done in line (NOTES/quantizer.md), so
:meth:`WorkDir.commit` only copies what it saves to host memory and a background thread writes
the files, then the progress record, in order; one write is in flight at most (the next commit
waits for it), and :meth:`WorkDir.flush` waits for it and reports its error. The files on disk
follow the same order as an in-line write, so a crash at any moment resumes from the last layer
whose files are complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint.files import honour_umask
from ..errors import CheckpointError, GPTQError
from ..format import PackedWeight

FINGERPRINT = "fingerprint.json"
PROGRESS = "progress.json"
LOG = "quantize_log.jsonl"
MARKER = ".gptq-work"
_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
_FIELDS = ("bits", "group_size", "in_features", "out_features", "sym", "desc_act", "zero_format")

logger = logging.getLogger("gptq_core.quantize")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata)
    honour_umask(tmp)  # safetensors writes 0600
    os.replace(tmp, path)


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that nothing else holds: the caller may reuse or change ``t``
    (on its device, or in place on the CPU: a layer may write into its input) while the copy
    waits for the background writer."""
    return t.detach().to("cpu", copy=True).contiguous()


def tensor_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def samples_digest(batches: list[dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            t = batch[key].contiguous().cpu()
            h.update(f"{key}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def check_work_dir(path: str | os.PathLike) -> Path:
    """Refuse ``path`` as a work folder if it is a file or a user's non-empty folder."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise GPTQError(
            f"work folder '{folder}' is a file; give the path of a folder (it is created if absent)"
        )
    if folder.is_dir() and not (folder / MARKER).is_file() and any(folder.iterdir()):
        raise GPTQError(
            f"work folder '{folder}' is not empty and was not made by gptq-core (no {MARKER} "
            "marker), so it is left untouched; give a new or empty folder"
        )
    return folder


def claim_work_dir(path: str | os.PathLike) -> Path:
    """Create (or accept) ``path`` as a work folder and mark it ours; refuse a user's folder."""
    folder = check_work_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if not marker.is_file():
        _atomic_write_text(marker, "gptq-core work folder: resumable quantization state\n")
    return folder


class WorkDir:
    """One run's state in a folder; ``done`` layers are finished and can be skipped."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any], resume: bool = True) -> None:
        self.path = claim_work_dir(path)
        self._writer: threading.Thread | None = None  # the write in flight (one at most)
        self._error: BaseException | None = None  # what stopped it, until reported
        fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        fp_file = self.path / FINGERPRINT
        if fp_file.exists() and resume:
            try:
                old = json.loads(fp_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                old = None
            if old != fingerprint:
                diff = sorted(
                    k for k in set(fingerprint) | set(old or {})
                    if (old or {}).get(k) != fingerprint.get(k)
                )
                raise GPTQError(
                    f"work_dir '{self.path}' holds a quantization run that differs from this one "
                    f"in {', '.join(diff)}; use another work_dir, or resume=False to start over "
                    "(its contents are then replaced)"
                )
        else:
            self.clear()
            _atomic_write_text(fp_file, json.dumps(fingerprint, indent=1, sort_keys=True))
        self._done = self._read_done()

    @property
    def done(self) -> int:
        """Finished layers as recorded on disk. Waits for a write in flight (and raises its
        error), so no reader counts a layer whose files are not complete yet."""
        self.flush()
        return self._done

    # ------------------------------------------------------------------ state
    def clear(self) -> None:
        """Remove every file a run writes here (and nothing else)."""
        for f in self.path.iterdir():
            name = f.name
            if name in (FINGERPRINT, PROGRESS, LOG) or (
                name.startswith(("layer_", "hidden_")) and ".safetensors" in name
            ) or name.endswith(".tmp"):
                f.unlink()

    def _read_done(self) -> int:
        p = self.path / PROGRESS
        if not p.exists():
            return 0
        try:
            return int(json.loads(p.read_text(encoding="utf-8"))["done"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{p} is corrupt; delete the work_dir or pass resume=False to start over"
            ) from None

    def _layer_file(self, index: int) -> Path:
        return self.path / f"layer_{index:05d}.safetensors"

    def _hidden_file(self, index: int) -> Path:
        return self.path / f"hidden_{index:05d}.safetensors"

    # ------------------------------------------------------------------ commit one layer
    def commit(self, index: int, packed: dict[str, PackedWeight], hidden: list[torch.Tensor]) -> None:
        """Record layer ``index`` as finished: its packed weights and its outputs.

        Returns once they are copied to host memory (the caller may reuse the tensors); a
        background thread writes the files, then ``progress.json``, then deletes the previous
        layer's hidden states. The previous layer's write is waited for first (and its error
        raised), so at most one layer's copies are held."""
        self.flush()
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, dict[str, Any]] = {}
        for name, pw in packed.items():
            meta[name] = {f: getattr(pw, f) for f in _FIELDS}
            for t in _TENSORS:
                value = getattr(pw, t)
                if value is not None:
                    tensors[f"{name}.{t}"] = host_copy(value)
        states = {f"batch_{b:05d}": host_copy(h) for b, h in enumerate(hidden)}
        # not a daemon: the interpreter waits for it at exit instead of killing it mid-write
        writer = threading.Thread(target=self._write, args=(index, tensors, meta, states),
                                  name=f"gptq-work-layer-{index}", daemon=False)
        writer.start()
        self._writer = writer

    def _write(self, index: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
               states: dict[str, torch.Tensor]) -> None:
        """The writer thread: the files in the order that makes ``progress.json`` the commit point."""
        try:
            _atomic_save(tensors, self._layer_file(index), {"modules": json.dumps(meta)})
            _atomic_save(states, self._hidden_file(index), {})
            _atomic_write_text(self.path / PROGRESS, json.dumps({"done": index + 1}))
            self._done = index + 1
            old = self._hidden_file(index - 1)
            if old.exists():
                old.unlink()
        except BaseException as exc:  # reported by flush() in the caller's thread
            self._error = exc

    def flush(self, raise_error: bool = True) -> None:
        """Wait for the write in flight. Its failure (e.g. a full disk) raises one GPTQError
        line naming the folder; with ``raise_error=False`` (the caller is already failing for
        another reason, which must not be masked) it is logged instead."""
        writer = self._writer
        if writer is not None:
            writer.join()
            self._writer = None
        error, self._error = self._error, None
        if error is None:
            return
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        message = (f"could not write the work folder '{self.path}' ({reason}); it holds {self._done} finished "
                   "layers: free disk space (or fix the folder) and run again to resume from there")
        if not raise_error:
            logger.error("%s", message)
            return
        raise GPTQError(message) from None

    # ------------------------------------------------------------------ read back
    def load_layer(self, index: int) -> dict[str, PackedWeight]:
        self.flush()  # never read a file the writer is still writing
        path = self._layer_file(index)
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as fh:
                meta = json.loads(fh.metadata()["modules"])
        except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"{path} is missing or corrupt ({exc}); delete the work_dir or pass resume=False"
            ) from None
        out = {}
        for name, fields in meta.items():
            parts = {t: tensors.get(f"{name}.{t}") for t in _TENSORS}
            out[name] = PackedWeight(**parts, **fields)
        return out

    def load_hidden(self, index: int, count: int) -> list[torch.Tensor]:
        self.flush()
        path = self._hidden_file(index)
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(
                f"{path} is missing or corrupt ({exc}); delete the work_dir or pass resume=False"
            ) from None
        if len(tensors) != count:
            raise CheckpointError(f"{path} holds {len(tensors)} batches, this run has {count}")
        return [tensors[f"batch_{b:05d}"] for b in range(count)]

    # ------------------------------------------------------------------ log
    def log_path(self) -> Path:
        return self.path / LOG

    def trim_log(self, layers_kept: int) -> list[dict[str, Any]]:
        """Keep the log lines of finished layers only (a crash may leave a partial layer)."""
        path = self.log_path()
        if not path.exists():
            return []
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("layer", layers_kept) < layers_kept:
                kept.append(rec)
        _atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append_log(self, record: dict[str, Any]) -> None:
        with open(self.log_path(), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
