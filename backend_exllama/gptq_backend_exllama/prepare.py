"""From a GPTQ :class:`~gptq_core.format.PackedWeight` to the kernel's prepared form, in torch.

Runs once per layer at load, on the layer's device: act-order ``g_idx`` is sorted and the
weight rows permuted to match (the kernel reads activation columns through the permutation
while staging them, so no per-weight ``g_idx`` remains), the ints are shuffled
(:mod:`.layout`), scales and zero points folded into the kernel's constants. The layer's
dispatch policy (:mod:`.policy`) and the split-K workspace (:mod:`.workspace`) are decided and
made here too, so a call only looks them up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_core.errors import NotSupportedError
from gptq_core.format import PackedWeight, act_order_permutation
from gptq_core.policy import DispatchPolicy

from . import layout, policy, workspace
from .options import ExllamaOptions

ACT_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class ExllamaPrepared:
    """The kernel's view of one layer (every tensor on the layer's device)."""

    q: torch.Tensor               # int32 [k_pad / 8, N / 4, 4] shuffled words, sorted k order
    sz: torch.Tensor              # [G, N / 4, 8] folded constants (fp16 layers: fp16; bf16: fp32)
    perm: torch.Tensor | None     # int32 [K]: sorted row -> activation column, or None
    group_rows: int               # rows per group in the sorted order (k_pad for one group)
    size_k: int
    size_n: int
    policy: DispatchPolicy        # which path serves which M (gptq backends explain)
    kinds: tuple[tuple[int, int], ...]  # the same as ((upto_m, kind), ...) for gptq_qmatmul
    acc: torch.Tensor             # the device's split-K workspace (workspace.py)
    counters: torch.Tensor

    @property
    def act_dtype(self) -> torch.dtype:
        return torch.float16 if self.sz.dtype == torch.float16 else torch.bfloat16


def group_rows(group_size: int, K: int) -> int:
    """Rows per group as the kernel walks them: ``group_size``, or all of ``k_pad`` for -1."""
    if group_size == -1:
        return layout.padded_k(K)
    if group_size % layout.STEP_K:
        raise NotSupportedError(
            f"exllama needs a group size that is a multiple of {layout.STEP_K}, got {group_size}; "
            "use another backend", [f"group size {group_size} is not a multiple of {layout.STEP_K}"])
    return group_size


def prepare(weight: PackedWeight, device: torch.device, act_dtype: torch.dtype,
            options: ExllamaOptions | None = None) -> ExllamaPrepared:
    """Shuffle ``weight`` for the kernel on ``device``; ``weight`` itself is not modified."""
    if act_dtype not in ACT_DTYPES:
        raise NotSupportedError(f"exllama computes in float16 or bfloat16, not {act_dtype}",
                                [f"activation dtype {act_dtype} is not supported"])
    if weight.bits != 4:
        raise NotSupportedError(f"exllama serves 4-bit weights, not {weight.bits}-bit",
                                [f"{weight.bits}-bit is not supported"])
    options = options or ExllamaOptions()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    w = weight.to(device)
    K, N = w.in_features, w.out_features
    rows = group_rows(w.group_size, K)
    q = w.unpack_qweight()
    perm = act_order_permutation(w.g_idx, K, w.group_size, "exllama")
    if perm is not None:
        q = q[perm]
    words = layout.shuffle(q)
    sz = layout.fold_scales(w.scales, w.zeros(), act_dtype)
    threshold = options.dequant_threshold
    if threshold is None:
        threshold = policy.dequant_threshold(act_dtype)
    plan = policy.layer_policy(threshold)
    ws = workspace.shared_workspace(device, *workspace.needs(N, policy.kernel_rows(plan)))
    return ExllamaPrepared(
        q=words, sz=sz, perm=None if perm is None else perm.to(torch.int32).contiguous(),
        group_rows=rows, size_k=K, size_n=N, policy=plan, kinds=policy.kind_table(plan),
        acc=ws.acc, counters=ws.counters,
    )


def reference_weight(prepared: ExllamaPrepared) -> torch.Tensor:
    """The dense [K, N] float64 weight in the *original* k order, rebuilt from the prepared form
    with exact arithmetic (pure torch, for the CPU tests): ``(q - zero) * scale`` recovered as
    ``(P (1 + q / 16) - X0) * S / P`` (fp16 layers) or ``(1 + q / 16) * S + Z`` (bf16 layers)
    from the folded constants (layout.py). Every step is exact, so this equals the checkpoint's
    dequantized weight bit for bit."""
    p = prepared
    q = layout.unshuffle(p.q, p.size_k, p.size_n).to(torch.float64)
    S, C = layout.unfold_scales(p.sz)
    g = torch.arange(p.size_k, device=q.device) // p.group_rows
    if p.sz.dtype == torch.float16:
        P = layout.pivots(S)
        w = (P[g] * (1.0 + q / 16.0) + C[g]) * (S / P)[g]
    else:
        w = (1.0 + q / 16.0) * S[g] + C[g]
    if p.perm is not None:
        out = torch.empty_like(w)
        out[p.perm.long()] = w
        w = out
    return w
