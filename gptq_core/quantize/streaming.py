"""Quantizing a float model larger than host memory: its weights read layer by layer (DESIGN.md §6).

:func:`load_streamed_model` builds the model with every parameter on the meta device
(nothing allocated), loads only the modules outside the decoder layers (embeddings, final
norm, head; rotary buffers are computed at construction) from the safetensors shards, and
returns a :class:`LayerStream` beside it. The driver takes :meth:`LayerStream.source` as
its ``layer_source``: just before layer ``i`` is worked on, only that layer's tensors are
read from the shards (``safe_open``) onto the device; once its packed result is kept, the
weights of its quantized linears go back to the meta device (the small rest, norms and
biases, stays on the CPU for saving). Host memory then holds one layer's float weights at
a time, plus the packed results and the calibration activations.

Checkpoint tensor names are mapped to module names by transformers' own renamings (the
``base_model_prefix`` and per-family key renames); a checkpoint whose tensors transformers
merges or splits while loading (fused MoE experts from per-expert tensors) and
mixture-of-experts models are refused with the fix: quantize without streaming.
"""

from __future__ import annotations

import ctypes
import logging
import re
import resource
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.inventory import TensorEntry, load_tensors, read_inventory, weight_files
from ..checkpoint.load import IGNORED_UNEXPECTED, resolve_dtype
from ..checkpoint.save import tied_weight_keys
from ..checkpoint.skeleton import build_skeleton, load_config
from ..errors import CheckpointError, GPTQError
from ..modules import is_conv1d

logger = logging.getLogger("gptq_core.quantize")

#: What to do instead when a model cannot be streamed.
NO_STREAM_HINT = "quantize it without stream_weights (--stream-weights), which loads the whole float model"

#: ``(layer index, layer) -> names (relative to the layer) of the linears the driver quantizes``.
QuantizedNames = Callable[[int, nn.Module], Iterable[str]]

#: The driver's ``layer_source`` (``gptq_core.quantize.driver.LayerSource``, spelt out here
#: because the driver imports this module).
LayerSource = Callable[[int, nn.Module, torch.device], AbstractContextManager[None]]


def peak_host_memory_bytes() -> int | None:
    """The process's peak resident set size so far (``getrusage`` ru_maxrss), or None where
    the platform has no such figure; Linux reports KiB, macOS bytes."""
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (AttributeError, OSError):
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _float_dtype(config, inventory: dict[str, TensorEntry], torch_dtype: torch.dtype | str) -> torch.dtype:
    """The dtype transformers' ``from_pretrained`` would load in: ``torch_dtype``, or for "auto"
    the config's dtype, else the first floating tensor's, else float32."""
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype != "auto":
        return resolve_dtype(torch_dtype, torch.device("cpu"))
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for entry in inventory.values():
        if entry.torch_dtype is not None and entry.torch_dtype.is_floating_point:
            return entry.torch_dtype
    return torch.float32


def _model_names(model: nn.Module, inventory: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """The inventory keyed by the model's own tensor names, through transformers' renamings."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # an older transformers: names are taken as they are
        return dict(inventory)
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    out: dict[str, TensorEntry] = {}
    for key, entry in inventory.items():
        name, converted = rename_source_key(key, renamings, converters, prefix, meta)
        if converted is not None:
            raise GPTQError(
                f"{entry.where()} is converted (merged or split) by transformers while loading, "
                f"so its layers cannot be read one at a time; {NO_STREAM_HINT}"
            )
        out[name] = entry
    return out


class LayerStream:
    """Where each float tensor of a meta-device model lives in its safetensors shards, and
    how to bring one decoder layer in and out of memory."""

    def __init__(self, model: nn.Module, model_dir: Path, layers_prefix: str) -> None:
        files, weight_map = weight_files(model_dir)
        self.model_dir = model_dir
        self.layers_prefix = layers_prefix
        self.entries = _model_names(model, read_inventory(files, weight_map))
        #: Conv1D modules (weight [in, out]) that the quantizer turns into nn.Linear ([out, in]).
        self.conv1d = {name for name, m in model.named_modules() if is_conv1d(m)}
        self.ties = tied_weight_keys(model)
        self._check(model)

    # ---------------------------------------------------------------- checks
    def _check(self, model: nn.Module) -> None:
        """Every tensor the model needs is in the shards with its shape, before any is read."""
        expected = dict(model.state_dict(keep_vars=True))
        patterns = [re.compile(p) for p in IGNORED_UNEXPECTED]
        patterns += [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
        unexpected = [k for k in self.entries if k not in expected and not any(p.search(k) for p in patterns)]
        if unexpected:
            shown = ", ".join(f"'{self.entries[k].name}'" for k in unexpected[:4])
            raise GPTQError(
                f"the float checkpoint in {self.model_dir} names tensors the model has no place for "
                f"({shown}{', ...' if len(unexpected) > 4 else ''}): its names differ from the "
                f"modules' in a way transformers renames while loading; {NO_STREAM_HINT}"
            )
        for key in list(self.entries):
            if key not in expected:
                del self.entries[key]  # computed by the model (rotary inv_freq, masks)
        missing = []
        for key, tensor in expected.items():
            if key in self.entries or self._tied_to(key) is not None:
                continue
            if tensor.device.type != "meta" and not isinstance(tensor, nn.Parameter):
                continue  # a buffer computed at construction
            missing.append(key)
        if missing:
            raise CheckpointError(
                f"the float checkpoint in {self.model_dir} lacks tensors the model needs: "
                f"{', '.join(repr(k) for k in missing[:4])}{', ...' if len(missing) > 4 else ''}; "
                "it is incomplete (a shard missing?) or belongs to another config.json"
            )
        for key, entry in self.entries.items():
            shape = tuple(expected[key].shape)
            if entry.shape != shape:
                raise CheckpointError(
                    f"{entry.where()} has shape {list(entry.shape)} but the model built from "
                    f"config.json expects {list(shape)}; the weights and config.json do not belong together"
                )

    def _tied_to(self, key: str) -> str | None:
        """The stored tensor that ``key`` is tied to, when ``key`` itself is not stored."""
        for target, source in self.ties.items():
            if key == target and source in self.entries:
                return source
            if key == source and target in self.entries:
                return target
        return None

    def _in_layer(self, key: str) -> bool:
        return key.startswith(self.layers_prefix + ".")

    # ---------------------------------------------------------------- loading
    def _read(self, keys: list[str], root: nn.Module, strip: str = "") -> dict[str, torch.Tensor]:
        """The stored tensors of ``keys`` as ``root`` (the model, or the layer at ``strip``)
        holds them: its dtypes, and Conv1D weights transposed where an nn.Linear replaced them."""
        expected = dict(root.state_dict(keep_vars=True))
        stored = load_tensors([self.entries[k] for k in keys])
        state: dict[str, torch.Tensor] = {}
        for key in keys:
            value = stored.pop(self.entries[key].name)
            local = key[len(strip):]
            target = expected[local]
            module, _, field = local.rpartition(".")
            was_conv1d = key.rpartition(".")[0] in self.conv1d
            if was_conv1d and field == "weight" and not is_conv1d(root.get_submodule(module)):
                value = value.t()  # the Conv1D became an nn.Linear (prepare_model_for_quantization)
            # Always an own contiguous copy: safetensors' tensors view the shard's mmap, and
            # one kept view (a norm) would keep every page of the shard that was read resident.
            state[local] = value.to(target.dtype, copy=True, memory_format=torch.contiguous_format)
        return state

    def load_outside(self, model: nn.Module) -> None:
        """Read every tensor outside the decoder layers (embeddings, norm, head) and tie weights."""
        keys = [k for k in self.entries if not self._in_layer(k)]
        model.load_state_dict(self._read(keys, model), strict=False, assign=True)
        for target, source in self.ties.items():  # as transformers ties them: the source wins
            if self._in_layer(target) or self._in_layer(source):
                continue
            keep, lose = (source, target) if source in self.entries else (target, source)
            if keep in self.entries:
                parent, _, attr = lose.rpartition(".")
                module = model.get_submodule(parent) if parent else model
                setattr(module, attr, model.get_parameter(keep))
        left = [n for n, t in (*model.named_parameters(), *model.named_buffers())
                if t.device.type == "meta" and not self._in_layer(n)]
        if left:
            raise CheckpointError(f"outside the decoder layers these tensors still have no data: {left[:4]}")

    @contextmanager
    def layer(self, index: int, layer: nn.Module, device: torch.device, quantized: Iterable[str]) -> Iterator[None]:
        """Layer ``index`` read from the shards onto ``device`` for the block; afterwards the
        weights of its ``quantized`` linears go back to meta and the rest to the CPU."""
        prefix = f"{self.layers_prefix}.{index}."
        keys = [k for k in self.entries if k.startswith(prefix)]
        layer.load_state_dict(self._read(keys, layer, strip=prefix), strict=False, assign=True)
        left = [n for n, t in (*layer.named_parameters(), *layer.named_buffers()) if t.device.type == "meta"]
        if left:
            raise CheckpointError(f"decoder layer {index}: no stored data for {left[:4]}")
        layer.to(device)
        try:
            yield
        finally:
            release_layer(layer, quantized)

    def source(self, quantized: QuantizedNames) -> LayerSource:
        """The driver's ``layer_source``: this stream, releasing the linears ``quantized`` names."""

        def source(index: int, layer: nn.Module, device: torch.device) -> AbstractContextManager[None]:
            return self.layer(index, layer, device, list(quantized(index, layer)))

        return source


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Without it glibc keeps a released layer's pages, fragmented by the small packed tensors
    allocated between them, and the resident set grows by about one layer per layer
    (NOTES/quantizer.md, "Streaming float weights").
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else False
            _LIBC.malloc_trim  # noqa: B018 - musl and others lack it
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def release_layer(layer: nn.Module, quantized: Iterable[str]) -> None:
    """The weights of the ``quantized`` linears to the meta device (their packed results are
    kept), every other tensor of ``layer`` to the CPU, the freed memory back to the OS."""
    cpu = torch.device("cpu")
    for name in quantized:
        module = layer.get_submodule(name)
        weight = module.weight
        module._parameters["weight"] = nn.Parameter(weight.to("meta"), requires_grad=weight.requires_grad)
    for module in layer.modules():
        for key, p in module._parameters.items():
            if p is not None and p.device.type not in ("meta", "cpu"):
                module._parameters[key] = nn.Parameter(p.detach().to(cpu), requires_grad=p.requires_grad)
        for key, b in module._buffers.items():
            if b is not None and b.device.type not in ("meta", "cpu"):
                module._buffers[key] = b.to(cpu)
    return_freed_memory()


def load_streamed_model(
    model_dir: Path, torch_dtype: torch.dtype | str = "auto", trust_remote_code: bool = False
) -> tuple[nn.Module, LayerStream]:
    """The float model of ``model_dir`` with only the modules outside its decoder layers in
    memory, and the :class:`LayerStream` that reads each layer when the driver needs it."""
    from transformers import GenerationConfig

    from ..models import get_architecture

    config = load_config(model_dir, trust_remote_code)
    files, weight_map = weight_files(model_dir)
    dtype = _float_dtype(config, read_inventory(files, weight_map), torch_dtype)
    model = build_skeleton(config, dtype, trust_remote_code)
    arch = get_architecture(model)
    if arch.moe is not None:
        raise GPTQError(
            f"{model_dir} is a mixture-of-experts model ({arch.name}); its fused experts are not "
            f"streamed layer by layer; {NO_STREAM_HINT}"
        )
    stream = LayerStream(model, model_dir, arch.layers)
    stream.load_outside(model)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    model.eval()
    return model, stream
