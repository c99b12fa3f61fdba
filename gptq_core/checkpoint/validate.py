"""Consistency checks of a checkpoint against its config and its model, with messages that
name the file, the tensor, what was expected and (where it can be inferred) what the tensor
implies instead.
"""

from __future__ import annotations

import math

import torch

from ..errors import CheckpointError
from ..format import default_g_idx
from ..quant_linear import QuantLinear
from .inventory import TensorEntry

#: Quantized tensors that hold raw bit patterns: only int32 carries them unchanged.
BIT_PATTERN_TENSORS = ("qweight", "qzeros")
QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def _implied_bits(rows: int, count: int) -> list[int]:
    return [b for b in (2, 3, 4, 8) if math.ceil(count * b / 32) == rows]


def _implied_group_sizes(groups: int, k: int) -> list[int]:
    sizes = [-1] if groups == 1 else []
    sizes += [g for g in (16, 32, 64, 128, 256, 512, 1024) if math.ceil(k / g) == groups]
    return sizes


#: For each quantized tensor: (axis, setting that axis follows from, count along it). qweight
#: rows follow from bits and K; qzeros columns from bits and N, its rows from group_size and K.
IMPLIED_BY_AXIS = {
    "qweight": ((0, "bits", "K"),),
    "qzeros": ((1, "bits", "N"), (0, "group_size", "K")),
    "scales": ((0, "group_size", "K"),),
}


def quant_shape_hint(field: str, found: tuple[int, ...], layer: QuantLinear) -> str:
    """What a mis-shaped quantized tensor suggests about the config it was written with."""
    counts = {"K": layer.in_features, "N": layer.out_features}
    hints: list[str] = []
    if field == "qweight" and len(found) == 2 and found[1] != layer.out_features:
        hints.append(f"it has {found[1]} columns but the layer has N={layer.out_features} outputs")
    for axis, setting, along in IMPLIED_BY_AXIS.get(field, ()):
        if len(found) != 2:
            break
        infer = _implied_bits if setting == "bits" else _implied_group_sizes
        implied = infer(found[axis], counts[along])
        if implied and getattr(layer, setting) not in implied:
            hints.append(f"its {'rows' if axis == 0 else 'columns'} match {setting}={implied[0]}")
    return ("; " + ", ".join(hints)) if hints else ""


def check_entry(entry: TensorEntry, expected: torch.Tensor, layer: QuantLinear | None, field: str | None) -> None:
    """Shape and dtype of one header entry against the model's tensor of the same name."""
    want = tuple(expected.shape)
    if layer is not None and field in QUANT_TENSORS:
        if entry.shape != want:
            raise CheckpointError(
                f"{entry.where()} has shape {list(entry.shape)}, but the config (bits="
                f"{layer.bits}, group_size={layer.group_size}) and the layer (K="
                f"{layer.in_features}, N={layer.out_features}) require {list(want)}"
                f"{quant_shape_hint(field, entry.shape, layer)}; the config contradicts the tensors"
            )
        dtype = entry.torch_dtype
        if field in BIT_PATTERN_TENSORS and dtype != torch.int32:
            raise CheckpointError(f"{entry.where()} has dtype {entry.dtype}; GPTQ stores it as int32 (I32)")
        if field == "g_idx" and (dtype is None or dtype.is_floating_point or dtype == torch.bool):
            raise CheckpointError(f"{entry.where()} has dtype {entry.dtype}; g_idx must be an integer tensor")
        if field in ("scales", "bias") and (dtype is None or not dtype.is_floating_point):
            raise CheckpointError(f"{entry.where()} has dtype {entry.dtype}; {field} must be floating point")
        return
    if entry.shape != want:
        raise CheckpointError(
            f"{entry.where()} has shape {list(entry.shape)}, but the model built from config.json "
            f"expects {list(want)}; the weights and config.json do not belong together"
        )
    dtype = entry.torch_dtype
    if dtype is None or dtype.is_floating_point != expected.dtype.is_floating_point:
        raise CheckpointError(
            f"{entry.where()} has dtype {entry.dtype}, the model expects {expected.dtype}"
        )


def check_layer_values(name: str, layer: QuantLinear, files: dict[str, str]) -> None:
    """Value checks of one loaded layer: finite scales/bias, g_idx range and order, sym zeros.

    ``files`` maps each tensor name to the file it came from, for the message.
    """

    def where(field: str) -> str:
        key = f"{name}.{field}"
        return f"tensor '{key}' in {files.get(key, 'the checkpoint')}"

    if not bool(torch.isfinite(layer.scales).all()):
        raise CheckpointError(f"{where('scales')} contains NaN or Inf; the checkpoint is corrupt")
    if layer.bias is not None and not bool(torch.isfinite(layer.bias).all()):
        raise CheckpointError(f"{where('bias')} contains NaN or Inf; the checkpoint is corrupt")
    G = layer.packed().num_groups
    lo, hi = int(layer.g_idx.min()), int(layer.g_idx.max())
    if lo < 0 or hi >= G:
        raise CheckpointError(
            f"{where('g_idx')} holds groups [{lo}, {hi}] but the layer has {G} groups "
            f"(group_size={layer.group_size}, K={layer.in_features}); the checkpoint is corrupt "
            "or its group_size is wrong"
        )
    if not layer.desc_act and not torch.equal(
        layer.g_idx, default_g_idx(layer.in_features, layer.group_size, layer.g_idx.device)
    ):
        raise CheckpointError(
            f"{where('g_idx')} is not k // group_size although the config says desc_act=false; "
            "the checkpoint was quantized with act-order: set desc_act to true in its config"
        )
    if layer.sym:
        zeros = layer.packed().zeros()
        want = 2 ** (layer.bits - 1)
        if not bool((zeros == want).all()):
            found = sorted(set(zeros.unique().tolist()))[:6]
            raise CheckpointError(
                f"{where('qzeros')} holds zero points {found} (as {layer.zero_format}) but "
                f"sym=true requires {want} everywhere; the checkpoint is asymmetric (set sym to "
                "false) or its checkpoint_format (gptq = v1, gptq_v2 = v2) is wrong"
            )
