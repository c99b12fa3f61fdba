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

from gptq_core.errors import NotSupportedError, warn_once
from gptq_core.format import PackedWeight, act_order_permutation, default_g_idx
from gptq_core.policy import DispatchPolicy

from . import layout, policy, workspace
from .hopper import ops as hopper_ops
from .hopper.build import BuildError as HopperBuildError
from .options import MarlinOptions

ACT_DTYPES = (torch.float16, torch.bfloat16)


class MemoryBudget:
    """A per-process byte budget for optional copies of layers (the dense and Hopper caches):
    first come, first served, returned when a prepared weight is collected."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.used = 0

    def take(self, nbytes: int, budget_mb: float) -> bool:
        """Reserve ``nbytes``; False when it does not fit in ``budget_mb``."""
        with self._lock:
            if self.used + nbytes > int(budget_mb * (1 << 20)):
                return False
            self.used += nbytes
            return True

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


DENSE_BUDGET = MemoryBudget()
HOPPER_BUDGET = MemoryBudget()


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
    hopper: hopper_ops.HopperPrepared | None = None  # the sm_90a kernel's copy (hopper_cache_mb)
    hint: str = ""  # what an option would change, shown by `gptq backends explain` (DESIGN.md §12)


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
    if device.type == "cuda" and options.dense_cache_mb > 0 and DENSE_BUDGET.take(K * N * 2, options.dense_cache_mb):
        dense = dense_weight(tiles, scales, zeros_t, perm, bits, w.group_size, K, N)
    dequant_rows = options.dequant_threshold
    if dequant_rows is None:
        dequant_rows = policy.dequant_threshold(K * N, bits)
    dense_rows = None
    if dense is not None:
        dense_rows = options.dense_threshold
        if dense_rows is None:
            dense_rows = policy.dense_threshold(K * N)
    low, high = policy.hopper_rows(K * N, options.hopper_threshold, options.hopper_max_rows,
                                   (options.dequant_threshold, dense_rows))
    hopper = hopper_copy(w, device, act_dtype, gpu, options) if low < high else None
    plan = policy.layer_policy(bits, K, N, gpu, dequant_rows, dense_rows,
                               (low, high) if hopper is not None else None)
    slot_floats, counters = workspace.needs(gpu, bits, N, policy.kernel_rows(plan))
    if hopper is not None:
        slot_floats = max(slot_floats, hopper_ops.workspace_floats(K, N, hopper.waves, low, high))
    ws = workspace.shared_workspace(device, slot_floats, counters)
    prepared = MarlinPrepared(
        tiles=tiles, scales=scales, zeros=zeros_t, perm=perm, bits=bits, group_size=w.group_size,
        size_k=K, size_n=N, policy=plan, kinds=policy.kind_table(plan), slots=ws.slots,
        counters=ws.counters, dense=dense, hopper=hopper,
        hint="" if hopper is not None else hopper_hint(w, device, gpu, options, (low, high)),
    )
    if dense is not None:
        weakref.finalize(prepared, DENSE_BUDGET.give_back, K * N * 2)
    if hopper is not None:
        weakref.finalize(prepared, HOPPER_BUDGET.give_back, hopper_bytes(w))
    return prepared


def hopper_bytes(w: PackedWeight) -> int:
    """What a layer's Hopper copy may take: 4-bit ints, scales and zero points in 16 bits, the
    act-order permutation."""
    return w.in_features * w.out_features // 2 + 2 * w.scales.numel() * 2 + w.in_features * 8


def hopper_hint(w: PackedWeight, device: torch.device, gpu: policy.GpuFacts, options: MarlinOptions,
                rows: tuple[int, int]) -> str:
    """One line for `gptq backends explain` when the sm_90a kernel would serve rows of this
    layer but it has no copy: the copy is opt-in (it costs memory), so users learn of it here."""
    low, high = rows
    if device.type != "cuda" or low >= high or not policy.hopper_serves(w.bits, w.in_features, w.out_features, gpu):
        return ""
    mib = hopper_bytes(w) / (1 << 20)
    if options.hopper_cache_mb <= 0:
        return (f"marlin option hopper_cache_mb would give this layer an sm_90a wgmma copy ({mib:.1f} MiB) "
                f"serving M {low + 1}-{high}, where it measured faster than these kernels")
    return (f"no sm_90a copy: hopper_cache_mb={options.hopper_cache_mb:g} MiB was used up by other layers "
            f"(this one needs {mib:.1f} MiB more)")


def hopper_copy(w: PackedWeight, device: torch.device, act_dtype: torch.dtype, gpu: policy.GpuFacts,
                options: MarlinOptions) -> hopper_ops.HopperPrepared | None:
    """The layer in the sm_90a kernel's layout when ``hopper_cache_mb`` asks for one and the
    layer, the GPU and the budget allow it; None otherwise (a GPU that cannot run it, or an
    extension that does not build, is said once per process: the load goes on without it)."""
    if options.hopper_cache_mb <= 0 or device.type != "cuda":
        return None
    if gpu.compute_capability != (9, 0):
        warn_once(f"marlin option hopper_cache_mb is set, but the Hopper kernel needs a GPU of compute "
                  f"capability 9.0 and this one is {gpu.compute_capability[0]}.{gpu.compute_capability[1]}: "
                  "the mma.sync kernels serve every M", UserWarning)
        return None
    if not policy.hopper_serves(w.bits, w.in_features, w.out_features, gpu):
        return None  # 8-bit, or a shape off its tiles: `gptq backends explain` shows no hopper route
    if not HOPPER_BUDGET.take(hopper_bytes(w), options.hopper_cache_mb):
        return None
    try:
        return hopper_ops.prepare(w, device, act_dtype)
    except HopperBuildError as exc:
        HOPPER_BUDGET.give_back(hopper_bytes(w))
        warn_once(f"marlin option hopper_cache_mb is set, but the Hopper extension is unavailable ({exc}): "
                  "the mma.sync kernels serve every M", UserWarning)
        return None


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
