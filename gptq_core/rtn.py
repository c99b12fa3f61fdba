"""Min-max quantization parameters and round-to-nearest (RTN) quantization.

RTN is the baseline GPTQ is judged against, and the fallback for MoE experts that see no
calibration tokens. The GPTQ quantizer reuses :func:`minmax_params` and :func:`quantize_values`.
"""

from __future__ import annotations

import torch

from .errors import FormatError
from .format import PackedWeight, ZeroFormat, check_group_size, default_g_idx, num_groups, pack_weight
from .packing import check_bits

#: Smallest positive fp16 value.
FP16_TINY = 2.0**-24


def minmax_params(
    w: torch.Tensor, bits: int, sym: bool, zero_floor: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for ``w`` [rows, cols] by the min-max rule of GPTQ.

    ``zero_floor=1`` keeps asymmetric zeros >= 1 so they can be stored in GPTQ v1.
    Returns float scales [rows] and integer-valued float zeros [rows].
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0)
    xmax = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        # The range is symmetric even when a row has no negative value: the GPTQ reference
        # keeps xmin = 0 there, so scale = xmax / maxq and values above 7/15 xmax clip.
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), zero_floor, maxq)
    # Scales are stored in fp16: quantize against the value the checkpoint will hold.
    scale = scale.to(torch.float16).float()
    if not bool(torch.isfinite(scale).all()):
        raise FormatError(
            "a weight group's range does not fit an fp16 scale (|w| > ~1e5); the layer "
            "cannot be stored in the GPTQ format"
        )
    # An all-tiny group would round its scale to 0 (and dequantize to NaN): use the
    # smallest positive fp16 value instead.
    scale = torch.where(scale == 0, torch.full_like(scale, FP16_TINY), scale)
    return scale, zero


def quantize_values(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Integers ``clamp(round(w / scale) + zero, 0, 2**bits - 1)``; scale/zero broadcast."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def quantize_rtn(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    bias: torch.Tensor | None = None,
    zero_format: ZeroFormat = "v1",
) -> PackedWeight:
    """Round-to-nearest quantization of an ``nn.Linear`` weight [N, K] into the GPTQ format."""
    check_bits(bits)
    check_group_size(group_size)
    if weight.dim() != 2:
        raise FormatError(f"weight must be [out_features, in_features], got {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise FormatError("weight contains NaN or Inf; it cannot be quantized")
    N, K = weight.shape
    G = num_groups(K, group_size)
    gs = K if group_size == -1 else group_size
    w = weight.detach().float()
    floor = 1 if zero_format == "v1" and not sym else 0
    scales = torch.empty(G, N)
    zeros = torch.empty(G, N)
    q = torch.empty(N, K)
    for g in range(G):  # one step per group, vectorised over rows
        cols = slice(g * gs, min((g + 1) * gs, K))
        s, z = minmax_params(w[:, cols], bits, sym, zero_floor=floor)
        scales[g], zeros[g] = s, z
        q[:, cols] = quantize_values(w[:, cols], s[:, None], z[:, None], bits)
    return pack_weight(
        q.to(torch.int32),
        scales,
        zeros.to(torch.int32),
        bits=bits,
        group_size=group_size,
        g_idx=default_g_idx(K, group_size),
        sym=sym,
        desc_act=False,
        bias=bias,
        zero_format=zero_format,
    )
