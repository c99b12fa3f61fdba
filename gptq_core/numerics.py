"""Checks on the numbers a model produces, shared by everything that runs one (eval, generate).

A model whose weights hold NaN or Inf does not fail by itself: perplexity comes out NaN and
greedy decoding picks token 0 forever (docs/DESIGN.md §10). The check lives here once so every
command says the same thing.
"""

from __future__ import annotations

import torch

from .errors import GPTQError

#: What a non-finite model output means and what to do about it.
NON_FINITE_LOGITS = (
    "the model produced NaN/Inf logits: its weights hold NaN or Inf (a corrupt checkpoint: "
    "quantize or download it again) or its activations overflow in this dtype (try --dtype float32)"
)


def check_finite_logits(logits: torch.Tensor) -> None:
    """Raise a GPTQError when ``logits`` holds NaN or Inf (one reduction, one sync)."""
    if not bool(torch.isfinite(logits).all()):
        raise GPTQError(NON_FINITE_LOGITS)
