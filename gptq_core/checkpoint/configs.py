"""Reading a checkpoint's JSON files: ``config.json`` and the quantization settings.

Peers write the quantization settings in ``quantize_config.json`` (AutoGPTQ, GPTQModel), in
``config.json["quantization_config"]`` (transformers/optimum), or both. When both exist they
must agree on everything that changes how tensors are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import QuantizeConfig
from ..errors import CheckpointError, FormatError
from .files import CONFIG_FILE, QUANTIZE_CONFIG_FILE

#: Settings that decide how the tensors are read; the two config files must agree on these.
LAYOUT_FIELDS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` or a CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def check_model_dir(model_dir: str | Path) -> Path:
    """The folder as a Path, or a clear error when it is not a local checkpoint folder."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(
            f"{model_dir} is not a folder; gptq-core loads local checkpoint folders (download "
            "a hub model first, e.g. with `hf download ORG/NAME --local-dir DIR`)"
        )
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}; it is not a transformers model folder")
    return path


def read_quantize_config(model_dir: str | Path) -> QuantizeConfig:
    """The checkpoint's :class:`QuantizeConfig`, from whichever files hold it."""
    path = check_model_dir(model_dir)
    sources: list[tuple[str, dict[str, Any]]] = []
    qfile = path / QUANTIZE_CONFIG_FILE
    if qfile.is_file():
        sources.append((QUANTIZE_CONFIG_FILE, read_json(qfile)))
    embedded = read_json(path / CONFIG_FILE).get("quantization_config")
    if embedded is not None:
        sources.append((f'{CONFIG_FILE}["quantization_config"]', embedded))
    if not sources:
        raise CheckpointError(
            f"{path} is not a GPTQ checkpoint: neither {QUANTIZE_CONFIG_FILE} nor a "
            f"quantization_config in {CONFIG_FILE}; quantize it first with `gptq quantize`"
        )
    configs = []
    for source, raw in sources:
        try:
            configs.append((source, QuantizeConfig.from_dict(raw, source=f"{path.name}/{source}")))
        except FormatError as exc:
            raise CheckpointError(str(exc)) from None
    (first_src, first), rest = configs[0], configs[1:]
    for source, other in rest:
        for name in LAYOUT_FIELDS:
            if getattr(first, name) != getattr(other, name):
                raise CheckpointError(
                    f"{path}: {first_src} says {name}={getattr(first, name)!r} but {source} says "
                    f"{name}={getattr(other, name)!r}; make the two files agree"
                )
    return first
