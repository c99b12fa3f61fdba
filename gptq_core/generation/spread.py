"""What a device map does to a decode step, for ``gptq bench generate --device-map``.

Per device: the decoder layers, other modules, weight bytes and backends a map put there
(:func:`placement_of`); and the single-device reference a spread step is judged against
(docs/DESIGN.md §9, §4): one decoder layer's eager decode step timed alone on its device, times
the number of layers, plus the step without its layers (:func:`time_layer_sum`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..quantize.capture import nested_to


def sync(device: torch.device | list[torch.device]) -> None:
    """Wait for the CUDA devices among ``device`` (host clocks time device work only after it)."""
    for dev in device if isinstance(device, list) else [device]:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)


@dataclass
class DevicePlacement:
    """What a device map put on one device: decoder layers, other placed modules, weights,
    and for the quantized model how many linears each backend serves there."""

    device: str
    layers: list[int]
    modules: list[str]
    weights_gb: float
    backends: dict[str, int] = field(default_factory=dict)


@dataclass
class LayerSum:
    """The single-device reference of one decode step (docs/DESIGN.md §9): a decoder layer's
    eager decode step timed alone on its device (``layer_ms``), ``layers`` times, plus the rest
    of the step run without the layers (``head_ms``: embeddings, rotary, norm, head)."""

    batch: int
    device: str
    layers: int
    layer_ms: float
    head_ms: float

    @property
    def total_ms(self) -> float:
        return self.layers * self.layer_ms + self.head_ms

    def ratio(self, ms_per_step: float | None) -> float | None:
        """A measured step against the sum: 1.0 means spreading costs nothing."""
        if ms_per_step is None or self.total_ms <= 0:
            return None
        return ms_per_step / self.total_ms


def _place_of(name: str, placed: dict[str, str]) -> str:
    """The device of module ``name`` under a device map: its longest covering key's."""
    best = None
    for key in placed:
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    return placed[best] if best is not None else "?"


def placement_of(model: nn.Module) -> list[DevicePlacement]:
    """Per device of ``model.hf_device_map``: the decoder layers placed there, the other
    mapped modules, the weight bytes held there and, for QuantLinear layers, how many each
    backend serves ("per call" for layers offloaded to disk, bound at each forward)."""
    from ..models import decoder_layers, get_architecture
    from ..placement import is_offloaded
    from ..quant_linear import QuantLinear

    placed = {str(k): str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
    if not placed:
        placed = {"": str(next(model.parameters()).device)}
    arch = get_architecture(model)
    out: dict[str, DevicePlacement] = {}

    def at(name: str) -> DevicePlacement:
        dev = _place_of(name, placed)
        return out.setdefault(dev, DevicePlacement(dev, [], [], 0.0))

    for i in range(len(decoder_layers(model, arch))):
        at(f"{arch.layers}.{i}").layers.append(i)
    if len(placed) > 1:
        for key in placed:
            if not key.startswith(arch.layers + "."):
                at(key).modules.append(key.rpartition(".")[2] or "(rest)")
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) not in seen:  # tied weights count once
            seen.add(id(tensor))
            at(name).weights_gb += tensor.numel() * tensor.element_size() / 2**30
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            served = ("per call" if is_offloaded(module) else
                      module.binding.backend.name if module.binding is not None else "unbound")
            backends = at(name).backends
            backends[served] = backends.get(served, 0) + 1
    return sorted(out.values(), key=lambda p: (p.layers[:1] or [1 << 30], p.device))


def _unhooked(module: nn.Module) -> Callable:
    """``module``'s own forward without accelerate's device-alignment hook (whose argument walk
    is part of the multi-device cost, not of the layer's), unless its tensors are offloaded
    and the hook must bring them in."""
    from ..placement import is_offloaded
    from ..quant_linear import QuantLinear

    offloaded = any(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()]) or any(
        is_offloaded(m) for m in module.modules() if isinstance(m, QuantLinear))
    old = getattr(module, "_old_forward", None)
    return old if old is not None and not offloaded else module


@torch.no_grad()
def time_layer_sum(model: nn.Module, ids: torch.Tensor, steps: int, devices: list[torch.device],
                   repeats: int) -> LayerSum:
    """:class:`LayerSum` of ``model`` for the prompts ``ids``: the first decoder layer replays
    the inputs it got in a real decode step ``steps`` times (its cache growing one position a
    call, as in decode; one query row needs no mask), and the step without layers (the layer
    list emptied for the call) runs ``steps`` times; medians over ``repeats``."""
    from ..models import decoder_layers, get_architecture

    arch = get_architecture(model)
    layers = decoder_layers(model, arch)
    first = layers[0]
    captured: dict[str, object] = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, dict(kwargs)

    def timed(fn) -> float:
        sync(devices)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(devices)
        return (time.perf_counter() - start) / steps * 1e3

    layer_ms, head_ms = [], []
    forward = _unhooked(first)
    dev = next((p.device for p in first.parameters() if p.device.type != "meta"), torch.device("cpu"))
    for _ in range(repeats):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # prefill: the cache to decode on
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(input_ids=token, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        finally:
            handle.remove()
        # On the layer's device, as accelerate's hook would put them (the rotary embeddings may
        # come from another GPU); moved once, outside the timing.
        args, kwargs = nested_to(captured["args"], dev), nested_to({**captured["kwargs"], "attention_mask": None}, dev)
        layer_ms.append(timed(lambda: forward(*args, **kwargs)))
        del out, args, kwargs
        captured.clear()
        parent_name, _, child = arch.layers.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, nn.ModuleList())
        try:
            model(input_ids=token, use_cache=False, logits_to_keep=1)  # warm
            head_ms.append(timed(lambda: model(input_ids=token, use_cache=False, logits_to_keep=1)))
        finally:
            setattr(parent, child, layers)
    return LayerSum(int(ids.shape[0]), str(dev), len(layers), statistics.median(layer_ms), statistics.median(head_ms))
