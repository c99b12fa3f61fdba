"""The two baselines every backend is measured against, built from the same GPTQ layer.

``fp16``: the layer dequantized to a dense [N, K] fp16 (or the run's dtype) weight and
``torch.nn.functional.linear`` (cuBLAS on NVIDIA).

``tinygemm``: PyTorch's built-in int4 kernel ``torch.ops.aten._weight_int4pack_mm``. On CUDA
(torch 2.5+) it takes bf16 activations, the weight as uint8 [N, K/2] with channel 2i in the
high nibble of byte i, repacked by ``_convert_weight_to_int4pack(w, inner_k_tiles)``, and
``scales_and_zeros`` [K/group, N, 2] in bf16 computing ``w = (q - 8) * scale + zero``. On the
CPU the ``*_for_cpu`` variants take the unpacked int32 [N, K] weight and any float dtype. A
GPTQ layer ``s * (q - z)`` maps exactly: ``scale = s``, ``zero = s * (8 - z)``. 4-bit only,
groups of 32/64/128/256 in order (no act-order), K a multiple of 16 * inner_k_tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..format import PackedWeight
from ..policy import DispatchPolicy
from ..spec import dtype_name

TINYGEMM_GROUPS = (32, 64, 128, 256)
INNER_K_TILES = 8


@dataclass
class Implementation:
    """Something to time: a name, a call on x (one weight copy each), and its input dtype."""

    name: str
    calls: list[Callable[[torch.Tensor], torch.Tensor]]
    dtype: torch.dtype
    weight_bytes: int
    note: str = ""
    kind: str = "backend"  # "dense" (the cuBLAS baseline), "tinygemm" or "backend"
    #: What a model's forward calls, timed eagerly (QuantLinear.forward for backends); None:
    #: ``calls`` themselves.
    eager_calls: list[Callable[[torch.Tensor], torch.Tensor]] | None = None
    #: A backend's dispatch policy, so each row says which of its paths was timed.
    policy: DispatchPolicy | None = None


def fp16_baseline(copies: list[PackedWeight], dtype: torch.dtype) -> Implementation:
    """Dense weights in ``dtype`` and F.linear: the cuBLAS number everything is judged against."""
    dense = [w.dequantize(torch.float32).t().to(dtype).contiguous() for w in copies]
    calls = [lambda x, d=d: F.linear(x, d) for d in dense]
    k, n = copies[0].in_features, copies[0].out_features
    name = "fp16" if dtype == torch.float16 else dtype_name(dtype)
    return Implementation(name, calls, dtype, k * n * dense[0].element_size(), "torch F.linear",
                          kind="dense")


def tinygemm_reason(w: PackedWeight) -> str | None:
    """Why tinygemm cannot run this layer here, or None."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return "this torch has no _weight_int4pack_mm"
    if w.bits != 4:
        return f"{w.bits}-bit (tinygemm is 4-bit only)"
    if w.group_size not in TINYGEMM_GROUPS:
        return f"group size {w.group_size} (tinygemm takes {TINYGEMM_GROUPS})"
    if w.desc_act:
        return "act-order (tinygemm needs groups in channel order)"
    if w.in_features % (16 * INNER_K_TILES) or w.out_features % 8:
        return f"K must be a multiple of {16 * INNER_K_TILES} and N of 8"
    return None


def _tinygemm_one(w: PackedWeight, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    q = w.unpack_qweight().t().contiguous().to(torch.int32)  # [N, K]
    s = w.scales.float()
    z = w.zeros().float()
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float16
    sz = torch.stack([s, s * (8.0 - z)], dim=-1).to(dtype).contiguous()  # [G, N, 2]
    if on_cuda:
        u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, INNER_K_TILES)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES)
    return packed, sz, dtype


def tinygemm_baseline(copies: list[PackedWeight], device: torch.device) -> Implementation:
    """tinygemm on every copy; its activations are bf16 on CUDA (all it takes), fp16 on CPU."""
    op = (torch.ops.aten._weight_int4pack_mm if device.type == "cuda"
          else torch.ops.aten._weight_int4pack_mm_for_cpu)
    gs = copies[0].group_size
    calls, dtype, nbytes = [], torch.bfloat16, 0
    for w in copies:
        packed, sz, dtype = _tinygemm_one(w, device)
        nbytes = packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
        calls.append(lambda x, p=packed, s=sz: op(x, p, gs, s))
    note = f"{dtype_name(dtype)} activations"
    return Implementation("tinygemm", calls, dtype, nbytes, note, kind="tinygemm")
