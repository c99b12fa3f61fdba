"""Reuse the outputs of a decoder layer's finished parts across the driver's passes.

The driver runs each decoder layer once per true-sequential group and once more for the next
layer's inputs (DESIGN.md §6). A direct child of the layer (e.g. ``self_attn``) whose linears
are all quantized already, and before which only quantized linears ran in this pass, gets the
same inputs and weights in every later pass, so its output per batch is computed once and
reused: for a Llama layer the attention runs twice instead of four times. Only frozen weights
are involved, so the results are bit-identical to recomputing; an output that the layer
modified in place (its tensor version changed) is recomputed instead of reused.

The attention *core* (transformers' attention function: sdpa, flash, flex) is memoised the same
way: once every linear that ran before it in a pass is frozen (q/k/v quantized), its output for
a batch no longer changes, so the pass that quantizes o_proj computes it and the gate/up pass
reuses it: one attention computation per batch less, the largest cost of quantizing on a CPU
(NOTES/quantizer.md). Models on their own eager attention function are not memoised.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


class FinishedOutputs:
    """Per-layer memo of finished children's outputs, keyed by (batch, child, call number)."""

    def __init__(self, layer: nn.Module, linears: list[str]) -> None:
        self.layer = layer
        self.linears = list(linears)
        self.finished: set[str] = set()
        self.called: set[str] = set()  # linears that ran so far in this pass
        self.batch = 0
        self.counts: dict[str, int] = {}
        self.cache: dict[tuple[int, str, int], tuple[Any, list[int]]] = {}
        self.reused = 0

    def begin(self, batch: int) -> None:
        """A new pass of the layer on calibration batch ``batch`` starts."""
        self.batch = batch
        self.called.clear()
        self.counts.clear()

    def finish(self, name: str) -> None:
        """Linear ``name`` now holds its final (quantized) weights."""
        self.finished.add(name)

    def _wrap(self, child_name: str, forward: Any, inside: set[str]) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            count = self.counts.get(child_name, 0)
            self.counts[child_name] = count + 1
            frozen = inside <= self.finished and self.called <= self.finished
            key = (self.batch, child_name, count)
            hit = self.cache.get(key) if frozen else None
            if hit is not None:
                out, versions = hit
                if [t._version for t in _tensors(out)] == versions:
                    self.called |= inside
                    self.reused += 1
                    return out
                del self.cache[key]  # modified in place by the layer: recompute
            out = forward(*args, **kwargs)
            if frozen:
                self.cache[key] = (out, [t._version for t in _tensors(out)])
            return out

        return run

    @contextmanager
    def _attention_memoised(self) -> Iterator[None]:
        """transformers' registered attention functions wrapped by this memo, for this layer's
        attention modules only; the registry is restored after."""
        try:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as registry
        except ImportError:  # pragma: no cover - transformers is a dependency
            yield
            return
        mine = {id(m) for m in self.layer.modules()}
        saved = dict(registry._local_mapping)
        for name in list(registry.keys()):
            fn = registry[name]

            def memo(module: nn.Module, *args: Any, _fn: Any = fn, _name: str = name, **kwargs: Any) -> Any:
                if id(module) not in mine:
                    return _fn(module, *args, **kwargs)
                return self._wrap(f"attention:{_name}:{id(module)}", _fn, set())(module, *args, **kwargs)

            registry[name] = memo
        try:
            yield
        finally:
            registry._local_mapping.clear()
            registry._local_mapping.update(saved)

    @contextmanager
    def installed(self) -> Iterator[FinishedOutputs]:
        """Wrap the layer's children and its attention core, and track which linears run, for
        the block's duration."""
        with ExitStack() as stack:
            stack.enter_context(self._attention_memoised())
            yield stack.enter_context(self._children_wrapped())

    @contextmanager
    def _children_wrapped(self) -> Iterator[FinishedOutputs]:
        wrapped: list[tuple[nn.Module, Any]] = []
        handles = []
        for name in self.linears:
            handles.append(
                self.layer.get_submodule(name).register_forward_pre_hook(
                    lambda module, args, name=name: self.called.add(name)
                )
            )
        try:
            for child_name, child in self.layer.named_children():
                inside = {n for n in self.linears if n.startswith(child_name + ".")}
                if not inside:
                    continue
                wrapped.append((child, child.__dict__.get("forward")))
                child.forward = self._wrap(child_name, child.forward, inside)
            yield self
        finally:
            for child, old in wrapped:
                if old is None:
                    del child.forward
                else:
                    child.forward = old
            for handle in handles:
                handle.remove()
            self.cache.clear()
