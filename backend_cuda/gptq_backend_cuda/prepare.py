"""From a GPTQ :class:`~gptq_core.format.PackedWeight` to the kernels' prepared form, in torch.

Runs once per layer at load, on the layer's device: act-order ``g_idx`` is sorted (weight rows
permuted to match; the kernel gathers the activation columns through ``perm`` while it copies
them to shared memory, so there is no per-element ``g_idx`` in the hot loop), ints are repacked
into the fragment layout (:mod:`.layout`), scales stay float16 (the kernel applies them in fp32
once per group) and zero points become the activation dtype (exact: integers <= 256). Symmetric
layers whose zero points are all ``2**(bits-1)`` carry no zero-point tensor (the kernel folds the
constant into its dequantization). The dispatch policy (:mod:`.policy`) and the split-K
workspace (:mod:`.workspace`) are decided and made here too, so a call only looks them up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_core.errors import NotSupportedError
from gptq_core.format import PackedWeight, act_order_permutation, default_g_idx
from gptq_core.policy import DispatchPolicy

from . import layout, policy, workspace
from .options import CudaOptions

ACT_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class CudaPrepared:
    """The kernels' view of one layer (every tensor on the layer's device)."""

    qweight: torch.Tensor            # int32 [strips, units, 32, 4] (layout.py)
    qhigh: torch.Tensor | None       # int32 [strips, units, 32, 2]: 3-bit third bits
    scales: torch.Tensor             # float16 [G_pad, N_pad], groups of the sorted k order
    zeros: torch.Tensor | None       # [G_pad, N_pad] activation dtype, or None: symmetric
    perm: torch.Tensor | None        # int32 [K]: activation column of each sorted k, or None
    bits: int
    group_size: int
    size_k: int
    size_n: int
    act_dtype: torch.dtype
    policy: DispatchPolicy           # which path serves which M (gptq backends explain)
    launches: tuple[policy.Launch, ...]  # the same as the op takes it, for gptq_qmatmul
    partials: torch.Tensor           # the device's split-K workspace (workspace.py)
    counters: torch.Tensor


def check_group_size(group_size: int) -> None:
    """The kernel changes groups between 16-channel steps only."""
    if group_size != -1 and group_size % layout.STEP_K:
        raise NotSupportedError(
            f"the cuda kernels need a group size that is -1 or a multiple of {layout.STEP_K}, "
            f"got {group_size}; the torch or triton backend serves this layer",
            [f"group size {group_size} is not a multiple of {layout.STEP_K}"],
        )


def padded_groups(size_k: int, group_size: int, bits: int) -> int:
    """Groups of the padded K (the kernel may look one group past the last real one)."""
    k_pad = layout.padded(size_k, 1, bits)[0]
    return 1 if group_size == -1 else -(-k_pad // group_size)


def prepare(weight: PackedWeight, device: torch.device, act_dtype: torch.dtype,
            options: CudaOptions | None = None, gpu: policy.GpuFacts | None = None) -> CudaPrepared:
    """Repack ``weight`` for the kernels on ``device``; ``weight`` itself is not modified.

    ``gpu`` (default: read from ``device``) is what the dispatch policy is planned for.
    """
    if act_dtype not in ACT_DTYPES:
        raise NotSupportedError(
            f"the cuda kernels compute in float16 or bfloat16, not {act_dtype}",
            [f"activation dtype {act_dtype} is not supported"],
        )
    check_group_size(weight.group_size)
    options = options or CudaOptions()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gpu = gpu or policy.GpuFacts.of(device)
    w = weight.to(device)
    K, N, bits, gs = w.in_features, w.out_features, w.bits, w.group_size
    q = w.unpack_qweight()
    perm = act_order_permutation(w.g_idx, K, gs, "the cuda kernels")
    if perm is not None:
        q = q[perm]
    qweight, qhigh = layout.repack(q, bits)
    n_pad = layout.padded(K, N, bits)[1]
    g_pad, G = padded_groups(K, gs, bits), w.num_groups
    scales = torch.zeros(g_pad, n_pad, dtype=torch.float16, device=device)
    scales[:G, :N] = w.scales
    z = w.zeros()
    zeros = None
    if not bool((z == 2 ** (bits - 1)).all()):
        zeros = torch.zeros(g_pad, n_pad, dtype=act_dtype, device=device)
        zeros[:G, :N] = z.to(act_dtype)
    dequant_rows = options.dequant_threshold
    if dequant_rows is None:
        dequant_rows = policy.dequant_threshold(bits)
    plan, launches = policy.layer_policy(bits, K, N, gpu, dequant_rows)
    ws = workspace.shared_workspace(device, *workspace.needs(bits, K, N, launches))
    return CudaPrepared(
        qweight=qweight, qhigh=qhigh, scales=scales, zeros=zeros,
        perm=None if perm is None else perm.to(torch.int32).contiguous(),
        bits=bits, group_size=gs, size_k=K, size_n=N, act_dtype=act_dtype, policy=plan,
        launches=launches, partials=ws.partials, counters=ws.counters,
    )


def reference_weight(prepared: CudaPrepared) -> torch.Tensor:
    """The dense [K, N] float64 weight in the *original* k order, rebuilt from the prepared
    form (pure torch, for the CPU tests): the inverse of :func:`prepare`."""
    p = prepared
    q = layout.unrepack(p.qweight, p.qhigh, p.bits, p.size_k, p.size_n).to(torch.float64)
    scales = p.scales[:, :p.size_n].to(torch.float64)
    if p.zeros is None:
        zeros = torch.full_like(scales, 2 ** (p.bits - 1))
    else:
        zeros = p.zeros[:, :p.size_n].to(torch.float64)
    g = default_g_idx(p.size_k, p.group_size, device=q.device).long()
    w = (q - zeros[g]) * scales[g]
    if p.perm is not None:
        out = torch.empty_like(w)
        out[p.perm.long()] = w
        w = out
    return w
