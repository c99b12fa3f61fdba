"""Which models the fast path serves, decided before any work, with the reason when not.

The fast path drives a transformers causal LM through its own forward with a static cache, an
explicit 4-D mask, per-row positions and ``logits_to_keep`` (docs/DESIGN.md §11). A model that
cannot take those is served by transformers' ``generate`` instead, and the reason is said once.
So is a model a ``device_map`` spreads over several accelerators: its decode step is captured
as one CUDA graph on one device, and a step that crosses devices is not served.
"""

from __future__ import annotations

import inspect

from torch import nn

#: Forward arguments the fast path passes to the model.
FORWARD_ARGUMENTS = ("input_ids", "attention_mask", "position_ids", "past_key_values", "logits_to_keep")

#: Cache layer kinds (``config.layer_types``) the static cache with a full mask serves.
SERVED_LAYER_TYPES = frozenset({"full_attention"})


def _static_cache_api() -> str | None:
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return "this transformers has no layered StaticCache (transformers >= 5 is needed)"
    if "cumulative_length" not in inspect.getsource(StaticLayer.__init__):
        return "this transformers' StaticCache does not track its own write position (transformers >= 5 is needed)"
    return None


def placed_devices(model: nn.Module) -> list[str]:
    """The accelerators the model's ``hf_device_map`` (set by a device map, ours or
    transformers') places modules on, sorted; empty without a map. "cpu" and "disk" are
    not counted: the CPU path runs eagerly anyway, and a GPU with CPU parts falls back at
    capture with its own reason."""
    placed = getattr(model, "hf_device_map", None)
    if not isinstance(placed, dict):
        return []
    names = set()
    for value in placed.values():
        text = f"cuda:{value}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        if text not in ("cpu", "disk", "meta"):
            names.add(text)
    return sorted(names)


def spanning_reason(model: nn.Module) -> str | None:
    """Why a model placed on several accelerators is not served, or None."""
    devices = placed_devices(model)
    if len(devices) < 2:
        return None
    return (f"its device_map spreads it over {len(devices)} devices ({', '.join(devices)}), and the "
            "fast path captures its decode step on one device")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fast path cannot serve ``model``, or None when it can."""
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no transformers config"
    spanning = spanning_reason(model)
    if spanning is not None:
        return spanning
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not served"
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for field in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size"):
        if getattr(text, field, None) is None:
            return f"config.{field} is missing, so the static cache cannot be sized"
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"]) - SERVED_LAYER_TYPES
    if kinds:
        return f"layers of kind {sorted(kinds)} (only full attention is served)"
    if not getattr(model, "_supports_attention_backend", False):
        return (f"{type(model).__name__}'s attention does not go through transformers' "
                "AttentionInterface, so the fast path cannot give it its masks")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "the model's forward signature cannot be read"
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [a for a in FORWARD_ARGUMENTS if a not in params and not (takes_kwargs and a == "logits_to_keep")]
    if missing:
        return f"the model's forward does not take {missing}"
    return _static_cache_api()
