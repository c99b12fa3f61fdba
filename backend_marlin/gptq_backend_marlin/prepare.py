"""From a GPTQ :class:`~gptq_core.format.PackedWeight` to the kernel's prepared form, in torch.

Runs once per layer at load, on the layer's device: act-order ``g_idx`` is sorted (weight rows
permuted to match, activations permuted at run time), ints are repacked into the tile layout
(:mod:`.layout`), scales and zero points converted to the activation dtype and permuted like
the columns of a tile. Symmetric layers whose zero points are all ``2**(bits-1)`` carry no
zero-point tensor (the kernel uses the constant). The layer's dispatch policy (:mod:`.policy`)
and the stream-K workspace (:mod:`.workspace`) are decided and made here too, so a call only
looks them up.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from gptq_core.errors import NotSupportedError
from gptq_core.format import PackedWeight, act_order_permutation, default_g_idx
from gptq_core.policy import DispatchPolicy

from . import layout, policy, workspace
from .options import MarlinOptions

ACT_DTYPES = (torch.float16, torch.bfloat16)

_budget_lock = threading.Lock()
_dense_bytes_used = 0


def take_dense_budget(nbytes: int, budget_mb: float) -> bool:
    """Reserve ``nbytes`` of the per-process dense-cache budget; False when it does not fit."""
    global _dense_bytes_used
    with _budget_lock:
        if _dense_bytes_used + nbytes > int(budget_mb * (1 << 20)):
            return False
        _dense_bytes_used += nbytes
        return True


def _return_dense_budget(nbytes: int) -> None:
    global _dense_bytes_used
    with _budget_lock:
        _dense_bytes_used -= nbytes


@dataclass(frozen=True, eq=False)
class MarlinPrepared:
    """The kernel's view of one layer (every tensor on the layer's device)."""

    tiles: torch.Tensor             # int32 tile layout
    scales: torch.Tensor            # [G, N] activation dtype, columns permuted
    zeros: torch.Tensor | None      # like scales (real zero points) or None: symmetric
    perm: torch.Tensor | None       # int64 [K]: activation column order (act-order) or None
    bits: int
    group_size: int
    size_k: int
    size_n: int
    policy: DispatchPolicy          # which path serves which M (gptq backends explain)
    kinds: tuple[tuple[int, int], ...]  # the same as ((upto_m, kind), ...) for gptq_qmatmul
    slots: torch.Tensor             # the device's stream-K workspace (workspace.py)
    counters: torch.Tensor
    dense: torch.Tensor | None = None  # [N, K] activation dtype, original k order (cache)


def prepare(weight: PackedWeight, device: torch.device, act_dtype: torch.dtype,
            options: MarlinOptions | None = None, gpu: policy.GpuFacts | None = None) -> MarlinPrepared:
    """Repack ``weight`` for the kernel on ``device``; ``weight`` itself is not modified.

    ``gpu`` (default: read from ``device``) is what the dispatch policy is planned for.
    """
    if act_dtype not in ACT_DTYPES:
        raise NotSupportedError(
            f"marlin computes in float16 or bfloat16, not {act_dtype}",
            [f"activation dtype {act_dtype} is not supported"],
        )
    options = options or MarlinOptions()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gpu = gpu or policy.GpuFacts.of(device)
    w = weight.to(device)
    K, N, bits = w.in_features, w.out_features, w.bits
    q = w.unpack_qweight()
    perm = act_order_permutation(w.g_idx, K, w.group_size, "marlin")
    if perm is not None:
        q = q[perm]
    zeros = w.zeros()
    sym_zero = 2 ** (bits - 1)
    has_zeros = not bool((zeros == sym_zero).all())
    tiles = layout.repack(q, bits)
    scales = layout.permute_columns(w.scales.to(act_dtype))
    zeros_t = layout.permute_columns(zeros.to(act_dtype)) if has_zeros else None

    dense = None
    if device.type == "cuda" and options.dense_cache_mb > 0 and take_dense_budget(K * N * 2, options.dense_cache_mb):
        dense = dense_weight(tiles, scales, zeros_t, perm, bits, w.group_size, K, N)
    dequant_rows = options.dequant_threshold
    if dequant_rows is None:
        dequant_rows = policy.dequant_threshold(K * N, bits)
    dense_rows = None
    if dense is not None:
        dense_rows = options.dense_threshold
        if dense_rows is None:
            dense_rows = policy.dense_threshold(K * N)
    plan = policy.layer_policy(bits, K, N, gpu, dequant_rows, dense_rows)
    ws = workspace.shared_workspace(device, *workspace.needs(gpu, bits, N, policy.kernel_rows(plan)))
    prepared = MarlinPrepared(
        tiles=tiles, scales=scales, zeros=zeros_t, perm=perm, bits=bits, group_size=w.group_size,
        size_k=K, size_n=N, policy=plan, kinds=policy.kind_table(plan), slots=ws.slots,
        counters=ws.counters, dense=dense,
    )
    if dense is not None:
        weakref.finalize(prepared, _return_dense_budget, K * N * 2)
    return prepared


def dense_weight(tiles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 perm: torch.Tensor | None, bits: int, group_size: int, K: int, N: int) -> torch.Tensor:
    """The layer as a dense [N, K] weight in the activation dtype and the original k order,
    made by the kernel's own dequantization (CUDA)."""
    from .ops import dequantize

    w = dequantize(tiles, scales, zeros, bits, group_size, K, N)
    if perm is not None:
        out = torch.empty_like(w)
        out[:, perm] = w
        w = out
    return w


def reference_weight(prepared: MarlinPrepared) -> torch.Tensor:
    """The dense [K, N] float64 weight in the *original* k order, rebuilt from the prepared form.

    Pure torch (CPU tests): the inverse of :func:`prepare` up to the activation-dtype rounding
    of scales.
    """
    p = prepared
    q = layout.unrepack(p.tiles, p.bits, p.size_k, p.size_n).to(torch.float64)
    scales = layout.unpermute_columns(p.scales).to(torch.float64)
    if p.zeros is None:
        zeros = torch.full_like(scales, 2 ** (p.bits - 1))
    else:
        zeros = layout.unpermute_columns(p.zeros).to(torch.float64)
    g = default_g_idx(p.size_k, p.group_size, device=q.device).long()
    w = (q - zeros[g]) * scales[g]
    if p.perm is not None:
        out = torch.empty_like(w)
        out[p.perm] = w
        w = out
    return w
