"""Making a transformers model quantizable, and loadable from a GPTQ checkpoint.

:func:`prepare_model_for_quantization` rewrites what GPTQ cannot see as ``nn.Linear`` inside the
decoder layers (fused 3-D experts, GPT-2's transposed ``Conv1D``) into equivalent ``nn.Linear``
modules, so quantizing, saving and loading all see one linear per checkpoint tensor set.
:func:`replace_with_quant_linear` then swaps linears for empty :class:`QuantLinear` modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..config import QuantizeConfig
from ..errors import GPTQError
from ..format import PackedWeight
from ..quant_linear import QuantLinear
from .architecture import Architecture
from .detect import get_architecture
from .experts import UnfusedExperts, unfuse_experts
from ..modules import is_conv1d, is_linear_like
from .layers import decoder_layers, get_module, set_module


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """transformers' ``Conv1D`` (weight [in, out]) as the equivalent ``nn.Linear``."""
    in_f, out_f = conv.weight.shape
    w = conv.weight
    lin = nn.Linear(in_f, out_f, bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    if w.device.type != "meta":
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
    return lin


def prepare_model_for_quantization(model: nn.Module, arch: Architecture | None = None) -> nn.Module:
    """Unfuse MoE experts and turn Conv1D into nn.Linear inside every decoder layer, in place.

    The model computes the same outputs afterwards (up to float rounding of the split
    matmuls). A no-op for dense nn.Linear models, and safe to call twice. Works on meta
    tensors too, so a checkpoint loader can prepare an empty model before loading.
    """
    arch = arch or get_architecture(model)
    for layer in decoder_layers(model, arch):
        for name, module in list(layer.named_modules()):
            if is_conv1d(module):
                set_module(layer, name, conv1d_to_linear(module))
        if arch.moe is None:
            continue
        fused = get_module(layer, arch.moe.experts)
        if fused is not None and not isinstance(fused, UnfusedExperts):
            set_module(layer, arch.moe.experts, unfuse_experts(fused, arch.moe))
    return model


def _features(module: nn.Module, name: str) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise GPTQError(
        f"'{name}' is a {type(module).__name__}, not an nn.Linear; only linear layers can hold "
        "a GPTQ weight (call prepare_model_for_quantization first for fused MoE experts)"
    )


def _linear_at(model: nn.Module, name: str) -> nn.Module:
    module = get_module(model, name)
    if module is None:
        raise GPTQError(
            f"the model has no module '{name}'; the checkpoint or name list does not match this "
            "model (for MoE models call prepare_model_for_quantization first)"
        )
    return module


def replace_with_quant_linear(
    model: nn.Module,
    names: Iterable[str],
    config: QuantizeConfig,
    backend: str | Sequence[str] | None = None,
    device: torch.device | str = "meta",
) -> nn.Module:
    """Swap the linears ``names`` for empty QuantLinear modules shaped by ``config``, in place.

    The buffers are created on ``device`` (meta by default: nothing allocated) and filled by
    ``model.load_state_dict`` from a GPTQ state dict; the bias flag of each linear is kept.
    """
    for name in names:
        module = _linear_at(model, name)
        if isinstance(module, QuantLinear):
            continue
        in_f, out_f = _features(module, name)
        quant = QuantLinear(
            config.bits, config.group_size, in_f, out_f,
            bias=getattr(module, "bias", None) is not None,
            sym=config.sym, desc_act=config.desc_act, zero_format=config.zero_format,
            backend=backend, device=device,
        )
        set_module(model, name, quant)
    return model


def apply_packed_weights(
    model: nn.Module,
    packed: Mapping[str, PackedWeight],
    backend: str | Sequence[str] | None = None,
) -> nn.Module:
    """Swap each linear named in ``packed`` for a QuantLinear holding that packed weight, in place.

    Binding to a backend is deferred to the first forward call (its input dtype decides).
    """
    for name, weight in packed.items():
        module = _linear_at(model, name)
        if not (isinstance(module, QuantLinear) or is_linear_like(module)):
            _features(module, name)  # raises the clear error
        set_module(model, name, QuantLinear.from_packed(weight, backend=backend, act_dtype=None))
    return model
