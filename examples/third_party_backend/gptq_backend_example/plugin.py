"""The example backend's hook implementations: the module the entry point names."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_core import BackendInfo, Capabilities, hookimpl

from .ops import grouped_matmul

#: Expected conformance failures, item-name pattern -> reason (none: this backend passes all).
CONFORMANCE_XFAIL: dict[str, str] = {}


@dataclass(frozen=True, eq=False)
class ExamplePrepared:
    """What gptq_pack returns and gptq_qmatmul receives; any object will do."""

    q: torch.Tensor  # int8 [K, N], rows sorted by group
    zeros: torch.Tensor  # float32 [G, N], shifted like q
    scales: torch.Tensor  # float32 [G, N]
    perm: torch.Tensor | None  # int64 [K] for act-order, else None
    starts: list[int]  # G + 1 row offsets of the groups


@hookimpl
def gptq_backend_info() -> BackendInfo:
    # The name ("example"), version and distribution come from the entry point in
    # pyproject.toml and the distribution's metadata; nothing here repeats them.
    return BackendInfo(
        # Below torch's 0: installing the example never changes what models use by default;
        # choose it with backend="example" or GPTQ_BACKEND=example.
        priority={"cpu": -10},
        description="example third-party backend: int8 weights, float32 group-wise matmul",
        capabilities=Capabilities(
            device_kinds=frozenset({"cpu"}),
            bits=(4, 8),
            group_sizes=None,
            training=False,
            compile=True,
        ),
    )


@hookimpl
def gptq_pack(weight, device, spec) -> ExamplePrepared:
    """Unpack to int8 once, sort rows by group (act-order), never touching ``weight``."""
    w = weight.to(device.torch_device)
    shift = 2 ** (w.bits - 1)
    q = (w.unpack_qweight().to(torch.int16) - shift).to(torch.int8)  # [K, N]
    g_idx = w.g_idx.long()
    perm = None
    if w.desc_act:
        perm = torch.argsort(g_idx, stable=True)
        q, g_idx = q[perm].contiguous(), g_idx[perm]
    counts = torch.bincount(g_idx, minlength=w.num_groups).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return ExamplePrepared(
        q=q,
        zeros=(w.zeros() - shift).to(torch.float32),
        scales=w.scales.to(torch.float32),
        perm=perm,
        starts=starts,
    )


@hookimpl
def gptq_qmatmul(x, prepared, bias):
    p = prepared
    return grouped_matmul(x, p.q, p.zeros, p.scales, p.perm, p.starts, bias)
