"""A layer prepared for Gaudi at load, and the per-call math around the dequantize op."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptq_core.format import PackedWeight
from gptq_core.policy import DispatchPolicy

from .layout import HpuLayout, to_hpu_layout

#: Activation dtypes served: the op's output dtype is the activations' (bf16 is Gaudi's native
#: matmul type; fp16 is what GPTQ checkpoints store scales in).
ACT_DTYPES = (torch.bfloat16, torch.float16)

#: One path at every M (docs/DESIGN.md §12): dequantize the packed layer on the HPU, then one
#: matmul. No thresholds: nothing has been measured on Gaudi (README, "never run on hardware").
POLICY = DispatchPolicy.single("hpu:convert_from_uint4+matmul")

#: ``(qweight, scales, zeros, dtype) -> W [K, N]``: Gaudi's op on the device.
Dequantize = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]


@dataclass(frozen=True, eq=False)
class HpuPrepared:
    """The op's packed layout on the device, plus the layer's dispatch policy."""

    layout: HpuLayout
    out_features: int
    policy: DispatchPolicy = POLICY


def prepare(weight: PackedWeight, device: torch.device, act_dtype: torch.dtype) -> HpuPrepared:
    """Convert on the CPU once (the caller's tensors untouched), then move to ``device``."""
    layout = to_hpu_layout(weight, act_dtype)
    return HpuPrepared(layout=layout.to(device), out_features=weight.out_features)


def qmatmul_with(
    dequantize: Dequantize, x: torch.Tensor, prepared: HpuPrepared, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for [M, K] ``x``: act-order columns gathered, W from ``dequantize``.

    The plugin passes Gaudi's op; the CPU tests pass a model of it (the math around the op is
    what they check, not the device).
    """
    p = prepared.layout
    if p.perm is not None:
        x = x.index_select(1, p.perm)
    w = dequantize(p.qweight, p.scales, p.zeros, x.dtype)
    y = torch.matmul(x, w)
    return y if bias is None else y.add_(bias.to(y.dtype))
