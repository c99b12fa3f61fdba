"""What serves 4-bit bf16 layers when the C++ kernels cannot be built: PyTorch's own int4 CPU
kernel (``_convert_weight_to_int4pack_for_cpu`` / ``_weight_int4pack_mm_for_cpu``).

Only bfloat16 activations: with float32 or float16 ones that kernel is slower than the torch
reference on this machine (4096x4096 at M=16: ~900 ms, against ~13 ms in bf16;
NOTES/perf-cpu.md), so those layers go to the next backend.

It takes groups of 32/64/128/256 channels, K divisible by the group, and computes
``w = (q - 8) * scale + zero``; a GPTQ layer ``s * (q - z)`` maps exactly with
``scale = s``, ``zero = s * (8 - z)``. Act-order rows are sorted by group at load (each group
must then hold exactly ``group_size`` rows) and the activation columns permuted per call
(docs/DESIGN.md §2). Everything else goes to the next backend (the torch reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_core.errors import NotSupportedError
from gptq_core.format import PackedWeight

from .layout import sort_rows

#: Group sizes torch's int4 CPU kernel takes.
INT4_GROUPS = (32, 64, 128, 256)
INNER_K_TILES = 8


@dataclass(frozen=True, eq=False)
class Int4Pack:
    """Operands of ``_weight_int4pack_mm_for_cpu`` for one layer."""

    packed: torch.Tensor  # uint8, torch's own int4 layout
    scale_zeros: torch.Tensor  # [G, N, 2] in the activations' dtype (bfloat16)
    perm: torch.Tensor | None  # int64 [K] or None
    group_size: int


def int4_reason(bits: int, group_size: int, in_features: int,
                act_dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why torch's int4 CPU kernel cannot serve such a layer, or None."""
    if act_dtype != torch.bfloat16:
        return (f"{str(act_dtype).removeprefix('torch.')} activations (torch's int4 CPU kernel "
                "is fast only with bfloat16 ones)")
    if bits != 4:
        return f"{bits}-bit (torch's int4 CPU kernel is 4-bit only)"
    if group_size not in INT4_GROUPS:
        return f"group size {group_size} (torch's int4 CPU kernel takes {list(INT4_GROUPS)})"
    if in_features % group_size:
        return f"K={in_features} is not divisible by the group size {group_size}"
    return None


def pack_int4(weight: PackedWeight, act_dtype: torch.dtype = torch.bfloat16) -> Int4Pack:
    """Torch's int4 layout of ``weight``; NotSupportedError when the kernel cannot take it."""
    reason = int4_reason(weight.bits, weight.group_size, weight.in_features, act_dtype)
    if reason is not None:
        raise NotSupportedError(reason, [reason])
    w = weight.to("cpu")
    gs = w.group_size
    perm, groups, rows = sort_rows(w.g_idx)
    if bool((rows != gs).any()) or not torch.equal(groups, torch.arange(len(groups))):
        reason = f"act-order groups are not all of {gs} channels (torch's int4 kernel needs that)"
        raise NotSupportedError(reason, [reason])
    q = w.unpack_qweight()
    if perm is not None:
        q = q[perm]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        q.t().contiguous().to(torch.int32), INNER_K_TILES)
    s = w.scales.float()
    scale_zeros = torch.stack([s, s * (8.0 - w.zeros().float())], dim=-1).to(act_dtype).contiguous()
    return Int4Pack(packed, scale_zeros, perm, gs)


@torch.library.custom_op("gptq_cpu::int4pack_mm", mutates_args=())
def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor,
                perm: torch.Tensor | None, bias: torch.Tensor | None, group_size: int,
                out_features: int) -> torch.Tensor:
    """``x @ W.T (+ bias)`` through torch's int4 CPU kernel (x in scale_zeros' dtype)."""
    if perm is not None:
        x = x.index_select(1, perm)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zeros)
    return y if bias is None else y + bias.to(y.dtype)


@int4pack_mm.register_fake
def _(x, packed, scale_zeros, perm, bias, group_size, out_features):
    return x.new_empty(x.shape[0], out_features)
