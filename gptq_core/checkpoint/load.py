"""Loading a GPTQ checkpoint (this project's or a peer's) into a normal transformers model.

Order of work, so that every problem is reported before weights are read and names its file
and tensor: read the configs; read the safetensors headers; build the model on the meta
device; swap the quantized linears for :class:`QuantLinear`; check every tensor's presence,
shape and dtype; read the data; check values; move to the device; bind every layer to a
backend (so a layer nothing can serve fails here, not in the first forward).
Nothing is unpickled and no checkpoint code runs unless ``trust_remote_code=True``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import QuantizeConfig
from ..device import default_device
from ..modules import is_linear_like
from ..errors import CheckpointError, GPTQError
from ..format import default_g_idx
from ..fusion import fuse_linears
from ..models.architecture import Architecture
from ..hub import resolve_model_dir
from ..placement import DeviceMap, bind_placed, dispatch, planned_main_device, resolve_device_map
from ..quant_linear import QuantLinear
from .configs import check_model_dir, read_json, read_quantize_config
from .files import GENERATION_CONFIG_FILE, QUANTIZE_CONFIG_FILE
from .inventory import TensorEntry, load_tensors, read_inventory, weight_files
from .manifest import verify_files
from .save import tied_weight_keys
from .skeleton import build_skeleton, load_config
from .validate import QUANT_TENSORS, check_entry, check_layer_values

#: Tensors old checkpoints carry that current transformers models compute instead.
IGNORED_UNEXPECTED = (r"(^|\.)rotary_emb\.inv_freq$", r"(^|\.)attn\.masked_bias$", r"(^|\.)attn\.bias$")
_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


#: Checkpoints at least this large show a progress bar while loading (``progress=None``) when
#: stderr is a terminal; tiny ones load too fast for a bar to mean anything.
PROGRESS_BYTES = 256 * 2**20


def _nbytes(entry: TensorEntry) -> int:
    dtype = entry.torch_dtype
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else 1
    count = 1
    for n in entry.shape:
        count *= n
    return count * size


def _progress(items, show: bool, desc: str, unit: str, total: int | None = None, **kwargs):
    """``items`` under a tqdm bar when ``show`` (and stderr is a terminal: tqdm's ``disable=None``),
    as ``gptq quantize`` shows its layers."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, disable=None if show else True, leave=False, **kwargs)


def _read_tensors(entries: list[TensorEntry], show: bool) -> dict[str, torch.Tensor]:
    """:func:`load_tensors` file by file, with a bar in bytes when ``show``."""
    by_file: dict[Path, list[TensorEntry]] = {}
    for e in entries:
        by_file.setdefault(e.file, []).append(e)
    out: dict[str, torch.Tensor] = {}
    total = sum(_nbytes(e) for e in entries)
    with _progress(None, show, "reading tensors", "B", total=total, unit_scale=True, unit_divisor=1024) as bar:
        for group in by_file.values():
            out.update(load_tensors(group))
            bar.update(sum(_nbytes(e) for e in group))
    return out


def resolve_dtype(torch_dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    """``"auto"``: float16 on accelerators, float32 on the CPU (where fp16 matmuls are slow)."""
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if str(torch_dtype).lower() in _DTYPES:
        return _DTYPES[str(torch_dtype).lower()]
    raise GPTQError(f"torch_dtype={torch_dtype!r} is unknown; use 'auto', float16, bfloat16 or float32")


def resolve_device(device: torch.device | str | None) -> torch.device:
    dev = torch.device(device) if device else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GPTQError(f"device={device!r} asked for CUDA but no CUDA GPU is available; use device='cpu'")
    return dev


def _model_basename(model_dir: Path) -> str | None:
    qfile = model_dir / QUANTIZE_CONFIG_FILE
    if not qfile.is_file():
        return None
    raw = read_json(qfile)
    name = raw.get("model_file_base_name") or raw.get("model_basename")
    return str(name) if name else None


def _quantized_names(model: nn.Module, inventory: dict[str, TensorEntry]) -> list[str]:
    names = sorted(k[: -len(".qweight")] for k in inventory if k.endswith(".qweight"))
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{inventory[name + '.qweight'].where()} quantizes a module '{name}' that the "
                f"model built from config.json does not have; the weights and config.json do "
                "not belong together"
            ) from None
        if not is_linear_like(module):
            raise CheckpointError(
                f"{inventory[name + '.qweight'].where()} quantizes '{name}', which is a "
                f"{type(module).__name__}, not a linear layer"
            )
    return names


def _prepare_architecture(
    model: nn.Module, inventory: dict[str, TensorEntry]
) -> tuple[dict[str, TensorEntry], Architecture | None]:
    """Let the architecture table reshape the skeleton (per-expert MoE linears, Conv1D as
    Linear) and map peers' tensor names to this model's; returns the inventory by model name
    and the architecture (None when unknown).
    """
    from ..models import get_architecture, model_key, prepare_model_for_quantization

    try:
        arch = get_architecture(model)
    except GPTQError:
        return inventory, None  # unknown architecture: the checkpoint's own tensor names decide
    prepare_model_for_quantization(model, arch)
    if not arch.checkpoint_renames:
        return inventory, arch
    return {model_key(k, arch): e for k, e in inventory.items()}, arch


def _drop_zero_biases(
    names: list[str], model: nn.Module, inventory: dict[str, TensorEntry], expected: dict
) -> list[str]:
    """Biases a peer wrote for bias-free layers (AutoGPTQ writes zeros): dropped if all zero."""
    dropped = []
    for name in names:
        key = f"{name}.bias"
        if key in inventory and key not in expected:
            value = load_tensors([inventory[key]])[inventory[key].name]
            if bool((value != 0).any()):
                raise CheckpointError(
                    f"{inventory[key].where()} is non-zero but the model built from config.json "
                    f"has no bias in '{name}'; the weights and config.json do not belong together"
                )
            dropped.append(key)
    return dropped


def _check_inventory(
    model: nn.Module,
    inventory: dict[str, TensorEntry],
    layers: dict[str, QuantLinear],
    ignored: set[str],
    ties: dict[str, str],
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Every expected tensor present with the right shape/dtype; returns (expected, tied)."""
    expected = dict(model.state_dict(keep_vars=True))
    patterns = [re.compile(p) for p in IGNORED_UNEXPECTED]
    patterns += [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = [
        k for k in inventory
        if k not in expected and k not in ignored and not any(p.search(k) for p in patterns)
    ]
    if unexpected:
        shown = ", ".join(f"'{k}' ({inventory[k].file.name})" for k in unexpected[:8])
        more = f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
        raise CheckpointError(
            f"the checkpoint holds tensors the model built from config.json does not have: "
            f"{shown}{more}; the weights and config.json do not belong together"
        )
    tied: set[str] = set()
    for target, source in ties.items():
        if target in expected and source in expected:
            if target not in inventory and source in inventory:
                tied.add(target)
            elif source not in inventory and target in inventory:
                tied.add(source)
    missing = []
    for key, tensor in expected.items():
        if key in inventory or key in tied:
            continue
        prefix, _, field = key.rpartition(".")
        if prefix in layers and field == "g_idx" and not layers[prefix].desc_act:
            continue  # very old checkpoints omit the default g_idx
        if tensor.device.type != "meta" and not isinstance(tensor, nn.Parameter):
            continue  # a buffer computed at construction
        missing.append(key)
    if missing:
        shown = ", ".join(f"'{k}'" for k in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        searched = ", ".join(sorted({e.file.name for e in inventory.values()}))
        raise CheckpointError(
            f"the checkpoint lacks tensors the model needs: {shown}{more} (searched {searched}); "
            "it is incomplete (a shard missing?) or was written for another model"
        )
    for key, entry in inventory.items():
        if key in expected:
            prefix, _, field = key.rpartition(".")
            layer = layers.get(prefix)
            check_entry(entry, expected[key], layer, field if layer is not None else None)
    return expected, tied


def _convert(key: str, value: torch.Tensor, expected: torch.Tensor, quantized: bool, dtype: torch.dtype) -> torch.Tensor:
    field = key.rpartition(".")[2]
    if quantized and field in QUANT_TENSORS:
        if field == "g_idx":
            return value.to(torch.int32)
        if field in ("scales", "bias"):
            return value.to(torch.float16)
        return value
    if value.is_floating_point():
        return value.to(dtype if isinstance(expected, nn.Parameter) else expected.dtype)
    return value.to(expected.dtype)


def _tie(model: nn.Module, ties: dict[str, str], tied: set[str]) -> None:
    for target, source in ties.items():
        if target in tied or source in tied:
            keep, lose = (source, target) if target in tied else (target, source)
            parent, _, attr = lose.rpartition(".")
            module = model.get_submodule(parent) if parent else model
            setattr(module, attr, model.get_parameter(keep))


def load_quantized(
    model_dir: str | Path,
    device: torch.device | str | None = "cpu",
    backend: str | None = "auto",
    torch_dtype: torch.dtype | str = "auto",
    trust_remote_code: bool = False,
    quantize_config: QuantizeConfig | None = None,
    backend_options: Mapping[str, Mapping[str, Any]] | None = None,
    fuse: bool = True,
    verify: bool = True,
    *,
    revision: str | None = None,
    device_map: DeviceMap | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Load a GPTQ checkpoint folder as a transformers causal LM whose linears are QuantLinear.

    ``backend`` is "auto" (the selector ranks every backend), a name, or "a,b" as an ordered
    preference. ``torch_dtype`` sets the activation dtype and that of the non-quantized
    weights ("auto": fp16 on GPUs, fp32 on the CPU). ``backend_options`` maps a backend name
    to its typed options (``{"marlin": {"dense_cache_mb": 512}}``; docs/DESIGN.md §12),
    checked before any weight is read. ``fuse`` serves the linears of each layer that read
    one input (q/k/v, gate/up; the architecture table's fusion groups) by one matmul over
    their concatenated weights (docs/DESIGN.md §11; ``gptq_core.fusion``); the module names,
    ``state_dict`` keys and saved checkpoint stay those of the separate layers.
    ``verify`` checks the weight files against the checkpoint's ``gptq_manifest.json`` (when
    it has one; peers' checkpoints do not); ``verify=False`` skips hashing for speed.
    ``model_dir`` may be a hub id (``org/name``) with a ``revision`` (``gptq_core.hub``).
    ``device_map`` ("auto", "balanced", a device, or {module: device}) with ``max_memory``
    places the model across devices, the CPU and ``offload_folder`` ("disk") instead of
    ``device`` (``gptq_core.placement``); fusion is then left off. ``progress`` shows a bar
    while reading tensors and binding layers (None: for checkpoints above
    :data:`PROGRESS_BYTES` on a terminal).
    Every layer is bound before returning (layers offloaded to disk: checked, bound per call).
    """
    from ..models import replace_with_quant_linear
    from ..selector import parse_backend_options

    options = parse_backend_options(backend_options)
    path = check_model_dir(resolve_model_dir(model_dir, revision))
    qcfg = quantize_config or read_quantize_config(path)
    if device_map is not None and device not in (None, "cpu"):
        raise GPTQError(f"device={device!r} and device_map={device_map!r} both place the model; pass one of them")
    if max_memory is not None and device_map is None:
        raise GPTQError("max_memory caps the devices of a device map; pass device_map='auto' with it")
    dev = resolve_device(device) if device_map is None else planned_main_device(device_map)
    config = load_config(path, trust_remote_code)
    files, weight_map = weight_files(path, _model_basename(path))
    inventory = read_inventory(files, weight_map)

    dtype = resolve_dtype(torch_dtype, dev)
    model = build_skeleton(config, dtype, trust_remote_code)
    inventory, arch = _prepare_architecture(model, inventory)
    names = _quantized_names(model, inventory)
    if not names:
        raise CheckpointError(
            f"{path} declares a GPTQ quantization_config but holds no '*.qweight' tensors"
        )
    ties = tied_weight_keys(model)
    replace_with_quant_linear(model, names, qcfg, backend=backend)
    layers = {n: model.get_submodule(n) for n in names}
    for name, layer in layers.items():
        if not isinstance(layer, QuantLinear):
            raise GPTQError(f"replace_with_quant_linear left '{name}' as {type(layer).__name__}")
        layer.zero_format = qcfg.zero_format

    expected = dict(model.state_dict(keep_vars=True))
    ignored = set(_drop_zero_biases(names, model, inventory, expected))
    expected, tied = _check_inventory(model, inventory, layers, ignored, ties)

    wanted = {k: e for k, e in inventory.items() if k in expected}
    show = progress if progress is not None else sum(_nbytes(e) for e in wanted.values()) >= PROGRESS_BYTES
    stored = _read_tensors(list(wanted.values()), show)
    tensors = {k: stored[e.name] for k, e in wanted.items()}
    state = {}
    for key, value in tensors.items():
        prefix = key.rpartition(".")[0]
        state[key] = _convert(key, value, expected[key], prefix in layers, dtype)
    for name, layer in layers.items():
        if f"{name}.g_idx" not in state:
            state[f"{name}.g_idx"] = default_g_idx(layer.in_features, layer.group_size)
    model.load_state_dict(state, strict=False, assign=True)
    _tie(model, ties, tied)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"after loading, these tensors still have no data: {left[:8]}")

    sources = {k: e.file.name for k, e in inventory.items()}
    for name, layer in layers.items():
        check_layer_values(name, layer, sources)
    if verify:  # after the checks above, whose errors name what is wrong more precisely
        verify_files(path, files)

    del stored, tensors, state, expected  # the modules hold what is needed now
    # A map is computed on the loaded model: packed layers count at their real sizes.
    placed = {"": str(dev)} if device_map is None else resolve_device_map(model, device_map, max_memory)
    model.eval()
    dispatch(model, placed, offload_folder)
    single = len(set(placed.values())) == 1 and "disk" not in placed.values()
    if fuse and arch is not None and single:
        fuse_linears(model, arch, layers)  # before bind: each fused layer binds once
    if single:
        for layer in _progress(layers.values(), show, "binding layers", "layer"):
            layer.bind(act_dtype=dtype, backend=backend, options=options)
    else:
        bind_placed(layers, dtype, backend, options)
    if device_map is not None:
        model.hf_device_map = dict(placed)
    if (path / GENERATION_CONFIG_FILE).is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    model.quantize_config = qcfg
    model.config.quantization_config = qcfg.to_dict()
    return model
