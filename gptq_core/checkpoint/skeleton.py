"""Building a transformers model from its config without allocating or initialising weights.

Parameters are created on the meta device (they are replaced by the checkpoint's tensors);
buffers stay real, because non-persistent buffers such as rotary ``inv_freq`` are computed at
construction and never stored in checkpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers is moved to the meta device."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_config(model_dir: Path, trust_remote_code: bool = False):
    """The transformers config of ``model_dir`` (never runs checkpoint code unless trusted)."""
    from transformers import AutoConfig

    from ..models import check_model_type_known

    check_model_type_known(model_dir, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as exc:
        raise CheckpointError(
            f"{model_dir}/config.json cannot be turned into a transformers config: "
            f"{_first_line(exc)}; {REMOTE_CODE_HINT}"
        ) from None


def build_skeleton(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """An ``AutoModelForCausalLM`` of ``config`` whose parameters are on the meta device."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # our loader, not transformers' quantizer, handles it
    try:
        with parameters_on_meta():  # init of meta parameters is free; buffers are computed
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=trust_remote_code
            )
    except ValueError as exc:
        raise CheckpointError(
            f"transformers cannot build a causal LM from this config: {_first_line(exc)}; "
            f"{REMOTE_CODE_HINT}"
        ) from None
    return model


#: Advice that works from where the user is: the ``gptq`` CLI never runs a checkpoint's code.
REMOTE_CODE_HINT = ("if the model ships its own code and you trust its author, load it from Python "
                    "with trust_remote_code=True (the gptq command line never runs a checkpoint's code)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
