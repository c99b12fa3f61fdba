"""Attention over a static KV cache with an explicit mask, and the masks the fast path builds.

The fast path hands every forward a ready boolean mask [B, 1, q, T] over the whole static cache
(T columns), so padding, causality and "not written yet" are one tensor the decode step
updates in place (docs/DESIGN.md §11). The attention function below is registered in
transformers' ``AttentionInterface`` and switched on only while the fast path runs a forward:

- at decode (one query per row) with grouped KV heads, the query heads of a group become the
  query length of one SDPA call over the group's KV head, so the cache is never copied
  (transformers' SDPA path repeats the whole cache per step when a mask is given);
- padded query rows of a prefill attend to themselves, so no row is fully masked (a fully
  masked row gives NaN, and NaN times a zero weight still poisons the real rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

#: Name under which :func:`static_cache_attention` is registered with transformers.
ATTENTION_NAME = "gptq_core_static_cache"

#: Attention arguments some families pass that this function does not implement, with what
#: they are; a non-None value makes the fast path fall back to transformers' loop.
UNSERVED_ARGUMENTS: dict[str, str] = {
    "sliding_window": "sliding-window attention",
    "softcap": "attention logit soft-capping",
    "s_aux": "attention sinks",
    "position_bias": "a learned position bias",
    "sinks": "attention sinks",
}


class UnservedAttention(RuntimeError):
    """The model's attention needs something the fast path does not implement."""


_calls = 0


def call_count() -> int:
    """How often :func:`static_cache_attention` ran (a model that never calls it is not served)."""
    return _calls


def static_cache_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA of ``query`` [B, H, q, D] over the cache ``key``/``value`` [B, Hkv, T, D]."""
    global _calls
    if not torch.compiler.is_compiling():  # a traced counter would be a guard that changes every step
        _calls += 1
    for name, what in UNSERVED_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            raise UnservedAttention(f"{type(module).__name__} uses {what} ('{name}')")
    if attention_mask is None or attention_mask.dtype != torch.bool:
        raise UnservedAttention(
            f"{type(module).__name__} did not receive the fast path's boolean mask; the model "
            "builds its own masks"
        )
    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    if heads != kv_heads and q == 1:
        grouped = query.reshape(b, kv_heads, heads // kv_heads, d)
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(b, 1, heads, value.shape[-1]), None
    if heads != kv_heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make :data:`ATTENTION_NAME` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, static_cache_attention)


@contextmanager
def serving(model: nn.Module) -> Iterator[None]:
    """While active, ``model``'s attention layers call :func:`static_cache_attention`."""
    register()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before


def prefill_mask(valid: torch.Tensor, length: int) -> torch.Tensor:
    """[B, 1, length, T] mask for a prefill of ``length`` columns starting at column 0.

    ``valid`` [B, T] marks the real (non-padding) key columns. A query sees the real columns at
    or before its own, and itself (so a padding query is never fully masked).
    """
    columns = torch.arange(valid.shape[1], device=valid.device)
    rows = torch.arange(length, device=valid.device)[:, None]
    causal = columns[None, :] <= rows
    allowed = causal[None] & (valid[:, None, :] | (columns[None, :] == rows)[None])
    return allowed[:, None]


def decode_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, T] view of ``valid``: a decode query sees every column written so far."""
    return valid[:, None, None, :]
