"""Placing a loaded model across devices: ``device_map`` and ``max_memory`` through accelerate.

``device_map`` is what transformers takes: ``"auto"`` (= ``"balanced"``), ``"balanced"``,
``"balanced_low_0"``, ``"sequential"``, a device (``"cpu"``, ``"cuda:1"``, ``0``), or a dict
from module name (``""`` for the whole model) to a device, ``"cpu"`` or ``"disk"``.
``max_memory`` caps each device (``{0: "20GiB", "cpu": "64GiB"}``) for the computed maps.

How each place is served (docs/DESIGN.md §4: the selector binds every layer on its device):

- a GPU: the layer's tensors live there and it is bound there (marlin, triton, ...);
- ``"cpu"``: the layer runs on the CPU, bound to a CPU backend (not streamed to a GPU);
- ``"disk"``: accelerate's hooks keep the tensors in ``offload_folder`` and bring them to the
  CPU for each forward; the layer is bound for that call and unbound after it, so nothing of
  it stays in memory between calls.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from .errors import GPTQError
from .quant_linear import QuantLinear

logger = logging.getLogger("gptq_core")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids go: its input embedding's device, else its first parameter's,
    else the CPU. An embedding offloaded to disk (its weight on ``meta``, brought to the CPU by
    accelerate's hook for each call) takes them on the CPU."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):  # transformers' default for models without one
        embedding = None
    weight = getattr(embedding, "weight", None)
    if weight is None:
        weight = next(model.parameters(), None)
    if weight is None or weight.device.type == "meta":
        return torch.device("cpu")
    return weight.device


#: A device map as transformers and accelerate take it.
DeviceMap = Union[str, int, torch.device, Mapping[str, Union[str, int, torch.device]]]

#: Named strategies: each computes a dict map from the model's sizes and ``max_memory``.
STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")

ACCELERATE_HINT = "`pip install 'gptq-core[accelerate]'` (or `pip install accelerate`)"


def _accelerate():
    try:
        import accelerate
    except ImportError:
        raise GPTQError(f"device_map and max_memory need accelerate; {ACCELERATE_HINT}") from None
    return accelerate


def _place(value: str | int | torch.device, key: str) -> str:
    """One device map value as accelerate writes it: "cpu", "disk", or a torch device string."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int):
        value = f"cuda:{value}"
    text = str(value)
    if text in ("cpu", "disk"):
        return text
    if text == "meta":
        raise GPTQError(
            f"device_map[{key!r}] = 'meta' keeps no weights anywhere; use 'disk' (with "
            "offload_folder) to keep them out of memory"
        )
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise GPTQError(
            f"device_map[{key!r}] = {value!r} is not a device; use 'cpu', 'disk', 'cuda:N' or an int N"
        ) from None
    kind = getattr(torch, dev.type, None)
    if not (hasattr(kind, "is_available") and kind.is_available()):
        raise GPTQError(f"device_map[{key!r}] = {value!r}: no {dev.type} device on this machine; use 'cpu'")
    if dev.index is not None and hasattr(kind, "device_count") and dev.index >= kind.device_count():
        raise GPTQError(
            f"device_map[{key!r}] = {value!r}: this machine has {kind.device_count()} {dev.type} device(s)"
        )
    return str(dev)


def resolve_device_map(
    model: nn.Module,
    device_map: DeviceMap,
    max_memory: Mapping[int | str, int | str] | None = None,
) -> dict[str, str]:
    """``device_map`` as a dict from module name to "cpu", "disk" or a device string.

    Named strategies are computed by accelerate from the module sizes (packed tensors count
    at their real int32/fp16 size) and ``max_memory``; decoder layers are never split
    (``model._no_split_modules``). A dict is checked to cover every tensor of the model.
    """
    if max_memory is not None and not isinstance(device_map, str):
        raise GPTQError("max_memory caps the devices of a computed map; pass device_map='auto' with it")
    if isinstance(device_map, (int, torch.device)) or (
        isinstance(device_map, str) and device_map not in STRATEGIES
    ):
        return {"": _place(device_map, "")}
    accelerate = _accelerate()
    from accelerate.utils import check_device_map, get_balanced_memory, get_max_memory

    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        try:
            if device_map == "sequential":
                budget = get_max_memory(dict(max_memory) if max_memory else None)
            else:
                budget = get_balanced_memory(
                    model, dict(max_memory) if max_memory else None,
                    no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0",
                )
            computed = accelerate.infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
        except (ValueError, KeyError) as exc:
            raise GPTQError(f"device_map={device_map!r} with max_memory={max_memory!r}: {exc}") from None
        return {k: _place(v, k) for k, v in computed.items()}
    if not isinstance(device_map, Mapping) or not device_map:
        raise GPTQError(
            f"device_map={device_map!r} is not a device map; use 'auto', a device, or a dict "
            "{module name: device}"
        )
    placed = {str(k): _place(v, str(k)) for k, v in device_map.items()}
    try:
        check_device_map(model, placed)
    except ValueError as exc:
        raise GPTQError(f"device_map does not cover the model: {exc}") from None
    return placed


def planned_main_device(device_map: DeviceMap) -> torch.device:
    """The device the model's float tensors are sized for before the map is computed: the
    first accelerator a dict or device names, the first GPU for a named strategy when there
    is one, else the CPU (it decides ``torch_dtype="auto"``: fp16 on GPUs, fp32 on the CPU)."""
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    places = device_map.items() if isinstance(device_map, Mapping) else [("", device_map)]
    for key, value in places:
        place = _place(value, str(key))
        if place not in ("cpu", "disk"):
            return torch.device(place)
    return torch.device("cpu")


def dispatch(model: nn.Module, device_map: Mapping[str, str], offload_folder: str | Path | None = None) -> None:
    """Move or offload every module of ``model`` as ``device_map`` says (accelerate's hooks).

    CPU modules run on the CPU (``main_device="cpu"``: they are not streamed to a GPU), and
    disk modules run on the CPU with their tensors read from ``offload_folder`` per call.
    Buffers are offloaded too, because every tensor of a :class:`QuantLinear` is a buffer.
    """
    places = set(device_map.values())
    if places == {"disk"}:
        raise GPTQError(
            "device_map puts the whole model on 'disk' (max_memory leaves no room anywhere?); keep "
            "at least the embeddings on a device or 'cpu', e.g. raise max_memory['cpu']"
        )
    if "disk" in places and offload_folder is None:
        disk = [k for k, v in device_map.items() if v == "disk"]
        raise GPTQError(
            f"device_map puts {', '.join(disk[:4])}{' ...' if len(disk) > 4 else ''} on 'disk'; "
            "pass offload_folder= (a folder for the offloaded tensors)"
        )
    if len(places) == 1 and "disk" not in places:
        model.to(next(iter(places)))
        return
    _accelerate()
    from accelerate import dispatch_model

    if offload_folder is not None:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
    dispatch_model(
        model, dict(device_map), main_device="cpu" if places & {"cpu", "disk"} else None,
        offload_dir=None if offload_folder is None else str(offload_folder), offload_buffers=True,
    )


def is_offloaded(layer: QuantLinear) -> bool:
    """Whether accelerate keeps this layer's tensors elsewhere between calls (meta here)."""
    return layer.qweight.device.type == "meta"


def attach_bind_per_call(layer: QuantLinear) -> None:
    """Bind an offloaded layer for each call and unbind it after: accelerate's hook puts its
    tensors in place just before the call (and back to meta after), so a prepared weight kept
    between calls would hold the tensors in memory, or be stale."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class BindPerCall(ModelHook):
        """Forget the prepared weight around each call; ``forward`` binds on its first use."""

        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any):
            module.unbind()
            return args, kwargs

        def post_forward(self, module: nn.Module, output: Any) -> Any:
            module.unbind()
            return output

    add_hook_to_module(layer, BindPerCall(), append=True)


def bind_placed(
    layers: Mapping[str, QuantLinear],
    act_dtype: torch.dtype,
    backend: str | None,
    options: Mapping[str, Any] | None,
) -> None:
    """Bind each layer on the device it landed on; offloaded ones bind per call, on the CPU,
    after a check now that some backend there accepts them (a layer nothing serves fails at
    load, not in the first forward)."""
    from . import selector
    from .device import DeviceInfo

    for layer in layers.values():
        if is_offloaded(layer):
            layer.backend = backend
            chosen = selector.plan(layer.spec(act_dtype), DeviceInfo.of(torch.device("cpu")), backend)
            if not chosen.ranked:
                raise chosen.no_backend_error()
            if options is not None:
                layer.backend_options = options
            attach_bind_per_call(layer)
        else:
            layer.bind(act_dtype=act_dtype, backend=backend, options=options)
