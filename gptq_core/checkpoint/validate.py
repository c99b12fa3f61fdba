"""Consistency checks of a checkpoint against its config and its model, with messages that
name the file, the tensor, what was expected and (where it can be inferred) what the tensor
implies instead.
"""

from __future__ import annotations

import math

import torch

from ..errors import CheckpointError
from ..format import PackedWeight, default_g_idx, num_groups
from ..packing import packed_length, unpack_rows
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


#: Input channels sampled to measure where the zero points sit among the quantized values:
#: a multiple of 32 (whole packing periods for every bit width), plenty for a mean.
ZERO_SAMPLE_K = 1024
#: Off-centre shift (in quantization steps) beyond which an asymmetric layer's zeros are
#: taken to be stored in the other convention: a convention error shifts by exactly one
#: step, correct min-max (RTN/GPTQ) layers sit within a fraction of a step of centre.
ZERO_SHIFT_LIMIT = 0.5
#: How many standard errors the shift must exceed: tiny layers give noisy means.
ZERO_SHIFT_SIGMAS = 6.0
#: Widest bit width the shift is judged at: one 8-bit step is too small against the
#: spread of per-layer means to tell a convention error from the weights' own offset.
ZERO_SHIFT_MAX_BITS = 4


def zero_shift(weight: PackedWeight) -> tuple[float, float]:
    """Mean of ``q - z`` over a sample of input channels, in quantization steps, and its
    standard error.

    Weights are centred on zero, so a correctly read asymmetric layer gives about 0; v1
    zeros (stored zero - 1) read as v2 give about +1, v2 zeros read as v1 about -1
    (docs/DESIGN.md §2). One pass at load over at most ``ZERO_SAMPLE_K`` channels.
    """
    count = min(weight.in_features, ZERO_SAMPLE_K)
    q = unpack_rows(weight.qweight[: packed_length(count, weight.bits)], weight.bits, count)
    z = weight.zeros()[weight.g_idx[:count].long()]
    d = q.to(torch.float32) - z.to(torch.float32)
    if d.numel() < 2:
        return float(d.mean()), math.inf
    return float(d.mean()), float(d.std()) / math.sqrt(d.numel())


def check_zero_convention(where: str, weight: PackedWeight) -> None:
    """Reject an asymmetric layer whose zeros are evidently stored in the other convention.

    A v1 tensor (zero - 1) labelled v2 reads every zero one too low: the zeros never reach
    the top code 2**bits - 1 and the values sit a whole step above them. Both must hold,
    so random or correctly labelled tensors (zeros reaching the top code) never trip it,
    and the shift must stand clear of its standard error.
    """
    if weight.sym or weight.bits > ZERO_SHIFT_MAX_BITS:
        return
    maxq = 2**weight.bits - 1
    zeros = weight.zeros()
    shift, stderr = zero_shift(weight)
    if abs(shift) < ZERO_SHIFT_LIMIT or abs(shift) < ZERO_SHIFT_SIGMAS * stderr:
        return  # centred, or too few values to tell (tiny layers)
    if weight.zero_format == "v2" and int(zeros.max()) < maxq and shift > 0:
        raise CheckpointError(
            f"{where} holds GPTQ v1 zero points (stored as zero - 1) but the config says "
            f"checkpoint_format=\"gptq_v2\": its zeros never reach {maxq} and the weights sit "
            f"{shift:+.2f} quantization steps off centre; set checkpoint_format (and format) to "
            "\"gptq\" in quantize_config.json and config.json[\"quantization_config\"]"
        )
    if weight.zero_format == "v1" and int(zeros.min()) > 1 and shift < 0:
        raise CheckpointError(
            f"{where} holds GPTQ v2 zero points (stored as the zero itself) but the config says "
            f"checkpoint_format=\"gptq\": its zeros never go below 2 and the weights sit "
            f"{shift:+.2f} quantization steps off centre; set checkpoint_format (and format) to "
            "\"gptq_v2\" in quantize_config.json and config.json[\"quantization_config\"]"
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
    G = num_groups(layer.in_features, layer.group_size)  # packed() would reject g_idx unnamed
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
    else:
        check_zero_convention(where("qzeros"), layer.packed())
