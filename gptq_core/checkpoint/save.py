"""Writing a quantized model as a GPTQ checkpoint (docs/DESIGN.md §2), atomically.

The folder holds safetensors weights (sharded with ``model.safetensors.index.json`` above
``max_shard_size``), ``config.json`` with ``quantization_config``, ``quantize_config.json``,
``generation_config.json`` and the tokenizer files, as AutoGPTQ, GPTQModel and
transformers/optimum write them, so each of them (and vLLM/TGI) can read it.
"""

from __future__ import annotations

import copy
import logging
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import QuantizeConfig
from ..errors import CheckpointError, FormatError, GPTQError
from ..format import PackedWeight
from ..quant_linear import QuantLinear
from .files import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    QUANTIZE_CONFIG_FILE,
    TOKENIZER_FILES,
    WEIGHTS_INDEX_FILE,
    atomic_directory,
    parse_size,
    plan_shards,
    shard_names,
)
from .manifest import write_manifest

logger = logging.getLogger("gptq_core")

DEFAULT_MAX_SHARD_SIZE = "4GB"
_QUANT_SUFFIXES = ("weight", "bias", "qweight", "qzeros", "scales", "g_idx")


def written_config(config: QuantizeConfig, packed: Mapping[str, PackedWeight]) -> QuantizeConfig:
    """The config as written: ``desc_act`` false when every ``g_idx`` is ``k // group_size``.

    Act-order with static groups (or with one group) quantizes in a permuted order yet stores
    every column in its natural group, so nothing a reader sees is reordered; ``desc_act: true``
    would only make vLLM refuse the checkpoint (docs/COMPATIBILITY.md).
    """
    from ..compat import natural_g_idx

    if not config.desc_act or not packed:
        return config
    if all(natural_g_idx(pw.g_idx, pw.group_size) for pw in packed.values()):
        logger.info("desc_act written as false: every g_idx is in natural order (act-order with "
                    "static groups reorders nothing a reader sees)")
        return config.replace(desc_act=False)
    return config


def warn_if_vllm_refuses(config: QuantizeConfig, packed: Mapping[str, PackedWeight], out_dir: str | Path) -> None:
    """One warning line when vLLM will refuse the checkpoint, with its reasons
    (rules in gptq_core/compat/rules.py, docs/COMPATIBILITY.md)."""
    from ..compat import vllm_verdict

    verdict = vllm_verdict(config, packed)
    if not verdict.loads:
        reasons = "; ".join(
            f"{r.reason} ({r.found.split('; ')[0]}{', ...' if '; ' in r.found else ''})" for r in verdict.reasons
        )
        logger.warning("vLLM %s will refuse %s: %s; `gptq check %s` lists every reader and the fix",
                       verdict.reader.version, out_dir, reasons, out_dir)


def tied_weight_keys(model: nn.Module) -> dict[str, str]:
    """``{tied parameter: the parameter it is tied to}`` as transformers declares it."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if callable(expand):
        try:
            return dict(expand(all_submodels=True))
        except Exception:  # noqa: BLE001 - an odd model: fall back to storage sharing
            return {}
    keys = getattr(model, "_tied_weights_keys", None)
    return dict(keys) if isinstance(keys, Mapping) else {}


def packed_weights_of(model: nn.Module, packed: Mapping[str, PackedWeight] | None) -> dict[str, PackedWeight]:
    """``packed`` plus the weights of any :class:`QuantLinear` already in ``model``."""
    found = {name: m.packed() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    found.update(packed or {})
    return found


def _checked_packed(name: str, pw: PackedWeight, config: QuantizeConfig, model: nn.Module) -> PackedWeight:
    for field in ("bits", "group_size", "sym"):
        if getattr(pw, field) != getattr(config, field):
            raise CheckpointError(
                f"layer '{name}' was quantized with {field}={getattr(pw, field)!r} but the config "
                f"to save says {field}={getattr(config, field)!r}; a checkpoint has one setting "
                "for every layer: save with the config the model was quantized with"
            )
    if pw.bias is None:
        module = model.get_submodule(name) if name else model
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.device.type != "meta":
            pw = pw.replace(bias=bias.detach().to("cpu", torch.float16).contiguous())
    try:
        return pw.to("cpu").to_format(config.zero_format)
    except FormatError as exc:
        raise CheckpointError(f"layer '{name}': {exc}") from None


def quantized_state_dict(
    model: nn.Module,
    packed: Mapping[str, PackedWeight],
    config: QuantizeConfig,
    dtype: torch.dtype | None = torch.float16,
) -> dict[str, torch.Tensor]:
    """The tensors to write: packed layers, then the rest in ``dtype``, tied copies dropped."""
    state = model.state_dict()
    for name in packed:
        for suffix in _QUANT_SUFFIXES:
            state.pop(f"{name}.{suffix}" if name else suffix, None)
    ties = tied_weight_keys(model)
    for target, source in ties.items():
        if target in state and source in state and state[target].data_ptr() == state[source].data_ptr():
            del state[target]  # written once, under the name the model ties the other one to
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if t.device.type == "meta":
            raise CheckpointError(
                f"tensor '{key}' has no data (meta device); load or quantize the model fully "
                "before saving"
            )
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t
    for name, pw in packed.items():
        pw = _checked_packed(name, pw, config, model)
        prefix = f"{name}." if name else ""
        for field in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            value = getattr(pw, field)
            if value is not None:
                out[prefix + field] = value
    seen: set[int] = set()
    for key, t in out.items():  # safetensors refuses shared storage: make every tensor its own
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        out[key] = t.clone().contiguous() if ptr in seen else t.contiguous()
        if ptr != -1:
            seen.add(ptr)
    return out


def checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors renamed to the names peers' checkpoints use for this family (usually the same)."""
    from ..models import checkpoint_key, get_architecture

    try:
        arch = get_architecture(model)
    except GPTQError:
        return tensors
    if not arch.checkpoint_renames:
        return tensors
    return {checkpoint_key(k, arch): t for k, t in tensors.items()}


def write_weights(tensors: Mapping[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> list[str]:
    """Write ``tensors`` as one file or as shards plus the index; return the file names."""
    limit = parse_size(max_shard_size)
    sizes = [(k, t.numel() * t.element_size()) for k, t in tensors.items()]
    shards = plan_shards(sizes, limit)
    names = shard_names(len(shards))
    for file, keys in zip(names, shards):
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(n for _, n in sizes)},
            "weight_map": {k: file for file, keys in zip(names, shards) for k in sorted(keys)},
        }
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        (folder / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _source_dir(model: nn.Module, source_dir: str | Path | None) -> Path | None:
    if source_dir is not None:
        return Path(source_dir)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    path = Path(name) if name else None
    return path if path is not None and path.is_dir() else None


def write_configs(model: nn.Module, config: QuantizeConfig, folder: Path, dtype: torch.dtype | None) -> None:
    """``config.json`` (with ``quantization_config``) and ``quantize_config.json``."""
    qdict = config.to_dict()
    (folder / QUANTIZE_CONFIG_FILE).write_text(json.dumps(qdict, indent=2) + "\n")
    model_config = getattr(model, "config", None)
    if model_config is None:
        raise CheckpointError("the model has no transformers config; only transformers models can be saved")
    cfg = copy.deepcopy(model_config)
    cfg.quantization_config = qdict
    cfg.architectures = [type(model).__name__]
    if getattr(cfg, "auto_map", None) and type(model).__module__.startswith("transformers."):
        # The model was built by transformers' own class, and the custom code auto_map names is
        # not copied: left in, it would make trust_remote_code loads look for missing files.
        logger.warning("config.auto_map dropped: the model was built by transformers' class %s, "
                       "and the custom code auto_map names is not part of the checkpoint",
                       type(model).__name__)
        del cfg.auto_map
    if dtype is not None:
        cfg.dtype = dtype
    cfg.save_pretrained(str(folder))


def save_quantized(
    model: nn.Module,
    packed: Mapping[str, PackedWeight] | None,
    config: QuantizeConfig,
    out_dir: str | Path,
    tokenizer=None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    *,
    overwrite: bool = False,
    torch_dtype: torch.dtype | None = torch.float16,
    source_dir: str | Path | None = None,
    extra_files: Mapping[str, str | Path | bytes] | None = None,
) -> Path:
    """Write ``model`` with its quantized layers ``packed`` (full module name -> weight).

    Layers already swapped for :class:`QuantLinear` are saved too, so a loaded checkpoint can be
    saved again with ``packed=None``. Non-quantized tensors are written in ``torch_dtype``
    (fp16, as the peers do; None keeps the model's). Tokenizer files come from ``tokenizer``
    or from ``source_dir`` (default: the folder the model was loaded from). ``extra_files``
    maps a file name in the checkpoint to a path to copy or bytes to write (e.g. the
    quantization log). ``gptq_manifest.json`` records every weight file's size and sha256 for
    the loader to verify (``gptq_core.checkpoint.manifest``). The folder appears complete or not at all; an existing non-empty
    ``out_dir`` is replaced only with ``overwrite=True``. ``desc_act`` is written as false when
    every ``g_idx`` is in natural order (:func:`written_config`), and a warning names what vLLM
    will refuse (:func:`warn_if_vllm_refuses`).
    """
    layers = packed_weights_of(model, packed)
    if not layers:
        raise CheckpointError(
            "nothing to save: the model has no quantized layers and no packed weights were given; "
            "quantize it first"
        )
    config = written_config(config, layers)
    tensors = checkpoint_names(model, quantized_state_dict(model, layers, config, torch_dtype))
    source = _source_dir(model, source_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        weight_names = write_weights(tensors, tmp, max_shard_size)
        write_configs(model, config, tmp, torch_dtype)
        if source is not None and (source / GENERATION_CONFIG_FILE).is_file():
            shutil.copyfile(source / GENERATION_CONFIG_FILE, tmp / GENERATION_CONFIG_FILE)
        elif getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        elif source is not None:
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
        write_manifest(tmp, weight_names)  # last: it vouches for the files as written
    warn_if_vllm_refuses(config, layers, out_dir)
    return Path(out_dir)
