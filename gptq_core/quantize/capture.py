"""Capture what each decoder layer is called with, without running any decoder layer.

For every calibration batch the model is run once with each decoder layer's ``forward``
temporarily replaced by a recorder: the recorder of layer 0 keeps the hidden states it gets
(the inputs GPTQ starts from), every recorder keeps the other arguments its layer gets
(attention mask, position embeddings, position ids, alibi, ...), passes the hidden states
through, and the last one raises a private exception that stops the forward. Recording every
layer, not just the first, matters for models whose layers get different arguments (Gemma 2/3
and Qwen sliding-window layers: a different mask and rotary embedding per layer type).
Caches are disabled (``use_cache=False``, no past key values). A layer that the model never
reaches during capture reuses the arguments of the closest earlier recorded layer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError, GPTQError
from ..placement import input_device

logger = logging.getLogger("gptq_core.quantize")

#: Keyword arguments that carry a KV cache: always passed as None during quantization.
CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


class _Captured(Exception):
    """Raised by the last recorder to stop the model's forward pass."""


@dataclass
class LayerCall:
    """The arguments a layer was called with, besides its hidden states."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_key: str | None = None  # name of the hidden-states keyword, when not positional

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``layer`` on ``hidden`` with these arguments; its hidden-state output."""
        if self.hidden_key is None:
            out = layer(hidden, *self.args, **self.kwargs)
        else:
            out = layer(*self.args, **{self.hidden_key: hidden}, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def to(self, device: torch.device, memo: dict[int, Any] | None = None) -> LayerCall:
        """The same call with every tensor argument on ``device`` (``memo`` shares copies)."""
        memo = {} if memo is None else memo
        return LayerCall(nested_to(self.args, device, memo), nested_to(self.kwargs, device, memo), self.hidden_key)


@dataclass
class CapturedInputs:
    """Per batch: the hidden states entering layer 0 and every layer's call arguments."""

    hidden: list[torch.Tensor]  # [batch]
    calls: list[list[LayerCall]]  # [layer][batch]
    masks: list[torch.Tensor | None]  # [batch] token masks (1 = real token) or None


def nested_to(obj: Any, device: torch.device, memo: dict[int, Any] | None = None) -> Any:
    """``obj`` with every tensor inside tuples, lists and dicts moved to ``device`` (shared once)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(nested_to(v, device, memo) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(nested_to(v, device, memo) for v in obj)
    if isinstance(obj, dict):
        return {k: nested_to(v, device, memo) for k, v in obj.items()}
    return obj


def _nested_equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_nested_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==
        return False


def _clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    for key in CACHE_KWARGS:
        if key in out:
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def run_model(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """Call ``model`` on a calibration batch, without KV cache when the model has one."""
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        return model(**batch, use_cache=False)
    return model(batch["input_ids"])


@contextmanager
def _recorders(layers: nn.ModuleList, sink: list[dict[int, LayerCall]], first: list) -> Iterator[None]:
    """Replace each layer's ``forward`` by a recorder for the duration of the block."""
    last = len(layers) - 1

    def make(index: int):
        def forward(*args, **kwargs):
            if args:
                hidden, rest, key = args[0], tuple(args[1:]), None
            elif "hidden_states" in kwargs:
                kwargs = dict(kwargs)
                hidden, rest, key = kwargs.pop("hidden_states"), (), "hidden_states"
            else:
                raise GPTQError(
                    f"decoder layer {index} was called without hidden states (positional or "
                    "'hidden_states='); the quantization driver cannot follow this model"
                )
            if index == 0:
                first.append(hidden)
            sink[-1][index] = LayerCall(rest, _clean_kwargs(kwargs), key)
            if index == last:
                raise _Captured
            return hidden

        return forward

    saved = []
    for index, layer in enumerate(layers):
        saved.append(layer.__dict__.get("forward"))
        layer.forward = make(index)
    try:
        yield
    finally:
        for layer, old in zip(layers, saved):
            if old is None:
                del layer.forward
            else:
                layer.forward = old


def capture_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: Sequence[dict[str, torch.Tensor]]
) -> CapturedInputs:
    """Run ``model`` on every batch with recorders in place of its decoder layers."""
    device = input_device(model)
    first: list[torch.Tensor] = []
    per_batch: list[dict[int, LayerCall]] = []
    with _recorders(layers, per_batch, first), torch.no_grad():
        for number, batch in enumerate(batches):
            per_batch.append({})
            before = len(first)
            try:
                run_model(model, {k: v.to(device) for k, v in batch.items()})
            except _Captured:
                pass
            if len(first) != before + 1:
                raise GPTQError(
                    f"calibration batch {number} never reached decoder layer 0 of the given "
                    "layers; pass the model's decoder-layer ModuleList (e.g. model.model.layers)"
                )
    n_layers = len(layers)
    calls: list[list[LayerCall]] = [[] for _ in range(n_layers)]
    for rec in per_batch:
        for i in range(n_layers):
            j = max((k for k in rec if k <= i), default=0)
            if j != i and len(calls[i]) == 0:
                logger.debug("decoder layer %d was not reached during capture; reusing layer %d's arguments", i, j)
            call = rec[j]
            first_call = calls[i][0] if calls[i] else None
            if first_call is not None and _nested_equal(
                (call.args, call.kwargs, call.hidden_key),
                (first_call.args, first_call.kwargs, first_call.hidden_key),
            ):
                call = first_call  # share one copy of identical masks / embeddings
            calls[i].append(call)
    masks = []
    for batch in batches:
        mask = batch.get("attention_mask")
        masks.append(None if mask is None or bool(mask.all()) else mask.bool())
    return CapturedInputs(hidden=first, calls=calls, masks=masks)


def make_batches(samples: Any, batch_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """Calibration samples -> model batches ``{"input_ids": [b, L], "attention_mask": ...}``.

    ``samples`` is a LongTensor [n, L] (what :func:`prepare_calibration` returns), a list of
    LongTensors [L] or [1, L], or a list of dicts with ``input_ids`` (and ``attention_mask``).
    Consecutive samples of equal length are stacked ``batch_size`` at a time.
    """
    if batch_size <= 0:
        raise CalibrationError(f"batch_size must be positive, got {batch_size}")
    if isinstance(samples, torch.Tensor):
        if samples.dim() == 1:
            samples = samples[None]
        if samples.dim() != 2:
            raise CalibrationError(f"samples must be a [n, seqlen] tensor, got {tuple(samples.shape)}")
        samples = list(samples)
    items: list[dict[str, torch.Tensor]] = []
    for number, s in enumerate(samples):
        d = dict(s) if isinstance(s, dict) else {"input_ids": s}
        if "input_ids" not in d:
            raise CalibrationError(f"calibration sample {number} has no 'input_ids'")
        d = {k: torch.as_tensor(v) for k, v in d.items() if k in ("input_ids", "attention_mask")}
        for k, v in d.items():
            if v.dim() == 2 and v.shape[0] == 1:
                v = v[0]
            if v.dim() != 1:
                raise CalibrationError(
                    f"calibration sample {number}: {k} must be [seqlen] or [1, seqlen], got {tuple(v.shape)}"
                )
            d[k] = v.long()
        if d["input_ids"].numel() == 0:
            raise CalibrationError(f"calibration sample {number} is empty")
        items.append(d)
    if not items:
        raise CalibrationError("no calibration samples were given; quantization needs at least one")
    batches, i = [], 0
    while i < len(items):
        j = i + 1
        while (
            j < len(items)
            and j - i < batch_size
            and items[j].keys() == items[i].keys()
            and items[j]["input_ids"].shape == items[i]["input_ids"].shape
        ):
            j += 1
        batches.append({k: torch.stack([it[k] for it in items[i:j]]) for k in items[i]})
        i = j
    return batches
