"""Which modules hold a weight matrix GPTQ can quantize: one answer for the quantizer, the
checkpoint loader and the model walker."""

from __future__ import annotations

from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer that stores its weight as [in_features, out_features].

    Recognised by class name and its ``nf`` attribute rather than ``isinstance`` of
    transformers' class, so that the copies of that class in remote-code models count too.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a GPT-2 ``Conv1D`` (see :func:`is_conv1d`)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)
