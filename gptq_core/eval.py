"""Perplexity of a causal LM on a token stream, the way GPTQ papers report it.

The stream is cut into consecutive, non-overlapping windows of ``window`` tokens (a trailing
partial window is dropped, unless the stream is shorter than one window, in which case it is
the only window); every window is scored independently (no carried context) and the
perplexity is ``exp(mean negative log-likelihood)`` over all predicted tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .errors import GPTQError
from .numerics import NON_FINITE_LOGITS


def _as_stream(token_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    ids = torch.as_tensor(token_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point:
        raise GPTQError(
            f"token_ids must be a 1-D sequence of token ids (or [1, T]), got {ids.dtype} "
            f"{tuple(ids.shape)}"
        )
    if ids.numel() < 2:
        raise GPTQError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    return ids.long()


#: config keys that state a model's longest sequence, in the order architectures use them.
MAX_POSITION_KEYS: tuple[str, ...] = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def max_positions(config: Mapping[str, Any] | Any) -> int | None:
    """The longest sequence a model was built for, from its config (a config.json dict or a
    transformers config); None when the config does not say."""
    raw = config if isinstance(config, Mapping) else getattr(config, "to_dict", dict)()
    for scope in (raw, raw.get("text_config") or {}):
        for key in MAX_POSITION_KEYS:
            value = scope.get(key) if isinstance(scope, Mapping) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def module_device(model: nn.Module) -> torch.device:
    """Where a module lives: its first parameter's (or buffer's) device, else the CPU."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor | Sequence[int],
    window: int = 512,
    batch_size: int = 8,
) -> float:
    """Perplexity of ``model`` on ``token_ids`` in non-overlapping ``window``-token windows.

    ``model(input_ids)`` must return logits (a transformers ``...ForCausalLM`` or any module
    returning ``.logits`` or a tensor). Runs on the model's device; ``batch_size`` windows per
    forward pass.
    """
    if window < 2:
        raise GPTQError(f"window must be at least 2 tokens, got {window}")
    ids = _as_stream(token_ids)
    longest = max_positions(model.config) if hasattr(model, "config") else None
    if longest is not None and min(window, ids.numel()) > longest:  # a short stream is one window
        raise GPTQError(
            f"window={window} is longer than the model's {longest} positions; use a window of "
            f"at most {longest} tokens"
        )
    count = ids.numel() // window
    windows = ids[: count * window].view(count, window) if count else ids.view(1, -1)
    device = module_device(model)
    was_training = model.training
    model.eval()
    nll, predicted = 0.0, 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            out = model(input_ids=batch, use_cache=False) if _takes_use_cache(model) else model(batch)
            logits = out.logits if hasattr(out, "logits") else out
            logits = logits[:, :-1].float()
            target = batch[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
            nll += float(loss)
            predicted += target.numel()
    finally:
        model.train(was_training)
    value = math.exp(nll / predicted)
    if not math.isfinite(value):
        raise GPTQError(f"perplexity is not finite: {NON_FINITE_LOGITS}")
    return value


def _takes_use_cache(model: nn.Module) -> bool:
    """transformers models accept ``use_cache``; plain modules may not."""
    return hasattr(model, "config") and hasattr(model.config, "use_cache")
