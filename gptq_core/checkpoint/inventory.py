"""Which tensors a checkpoint folder holds, in which file, with which shape: read from headers.

Only safetensors headers are read here (no tensor data), so every consistency check runs
before a byte of weights is loaded, and every error names the file and the tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .files import PICKLE_PATTERNS, WEIGHTS_FILE, WEIGHTS_INDEX_FILE

#: safetensors dtype names -> torch dtypes (the ones a GPTQ checkpoint may hold).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint as its file header describes it."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self.dtype)

    def where(self) -> str:
        return f"tensor '{self.name}' in {self.file.name}"


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); the download or copy is "
            "probably incomplete or corrupt: fetch or write the checkpoint again"
        ) from None


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("weight_map is empty or not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{index_path} is not a valid safetensors index ({exc}); it must be JSON with a "
            "'weight_map' object mapping tensor names to shard files"
        ) from None
    return {str(k): str(v) for k, v in weight_map.items()}


def weight_files(model_dir: Path, basename: str | None = None) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint and, when sharded, its index's weight map.

    Looks for ``model.safetensors.index.json``, then ``model.safetensors``, then the
    ``model_basename`` a peer recorded, then a single ``*.safetensors`` file.
    """
    indexes = [model_dir / WEIGHTS_INDEX_FILE]
    if basename:
        indexes.append(model_dir / f"{basename}.safetensors.index.json")
    indexes += sorted(p for p in model_dir.glob("*.safetensors.index.json") if p not in indexes)
    for index_path in indexes:
        if index_path.is_file():
            weight_map = _read_index(index_path)
            files = []
            for name in sorted(set(weight_map.values())):
                path = model_dir / name
                if not path.is_file():
                    raise CheckpointError(
                        f"{index_path.name} lists shard {name}, which is missing from {model_dir}; "
                        "copy every shard of the checkpoint"
                    )
                files.append(path)
            return files, weight_map
    candidates = [model_dir / WEIGHTS_FILE]
    if basename:
        candidates.append(model_dir / f"{basename}.safetensors")
    for path in candidates:
        if path.is_file():
            return [path], None
    found = sorted(model_dir.glob("*.safetensors"))
    if len(found) == 1:
        return found, None
    if found:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(
            f"{model_dir} holds several safetensors files ({names}) but no "
            f"{WEIGHTS_INDEX_FILE}; add the index or set model_basename in quantize_config.json"
        )
    pickles = sorted({p.name for pat in PICKLE_PATTERNS for p in model_dir.glob(pat)})
    if pickles:
        raise CheckpointError(
            f"{model_dir} holds only pickle weight files ({', '.join(pickles)}); unpickling can "
            "run arbitrary code, so gptq-core loads safetensors only: convert the checkpoint to "
            "safetensors where you trust it (torch.load + safetensors.torch.save_file)"
        )
    raise CheckpointError(f"{model_dir} holds no weights (no *.safetensors file)")


def read_inventory(files: Iterable[Path], weight_map: dict[str, str] | None) -> dict[str, TensorEntry]:
    """Every tensor's header entry, checking the index against the files it names."""
    inventory: dict[str, TensorEntry] = {}
    for path in files:
        with _open(path) as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                if weight_map is not None and weight_map.get(name) != path.name:
                    continue  # the index names another file (or none): not part of the model
                if name in inventory:
                    raise CheckpointError(
                        f"tensor '{name}' is stored twice, in {inventory[name].file.name} and "
                        f"{path.name}; the checkpoint is inconsistent"
                    )
                inventory[name] = TensorEntry(name, path, tuple(sl.get_shape()), sl.get_dtype())
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in inventory:
                raise CheckpointError(
                    f"the index says tensor '{name}' is in {file}, but that file does not hold "
                    "it; the shards and the index do not belong together"
                )
    return inventory


def load_tensors(entries: Iterable[TensorEntry]) -> dict[str, torch.Tensor]:
    """Read the data of ``entries`` (grouped by file), on the CPU."""
    by_file: dict[Path, list[str]] = {}
    for e in entries:
        by_file.setdefault(e.file, []).append(e.name)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with _open(path) as fh:
            for name in names:
                try:
                    out[name] = fh.get_tensor(name)
                except Exception as exc:
                    raise CheckpointError(
                        f"tensor '{name}' in {path.name} could not be read ({exc}); the file is corrupt"
                    ) from None
    return out
