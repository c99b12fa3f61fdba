"""The split-K workspace, made at bind and shared by the layers of one device.

A layer whose K is cut into several splits sums them through fp32 partials (one [rows, N] slab
per split and 16-row slice) and int32 counters (one per block column and slice): the last
block of a column to finish adds the slabs in split order (deterministic) and sets its counter
back to zero (csrc/gemv.cuh). They belong to the prepared weights, not to the op, so that a call
allocates nothing that outlives it and CUDA graphs can capture it (docs/DESIGN.md §11). One
workspace serves every layer of a device, sized for the largest; calls that share it run one
after another, as they do on one stream.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from . import layout, policy

#: Counters are allocated in multiples of this, so that most layers share the first tensor.
COUNTER_GRANULE = 1024


@dataclass(frozen=True, eq=False)
class Workspace:
    partials: torch.Tensor  # float32 [splits * slices * rows * N_pad, rounded up]
    counters: torch.Tensor  # int32 zeros


def needs(bits: int, size_k: int, size_n: int, launches: tuple[policy.Launch, ...]) -> tuple[int, int]:
    """(partial floats, counters) the layer's kernel launches need at most."""
    n_pad = layout.padded(size_k, size_n, bits)[1]
    floats = counters = 0
    names = {v: k for k, v in policy.KINDS.items()}
    for launch in launches:
        path = names[launch.kind]
        if path not in policy.ROWS:
            continue
        rows = policy.ROWS[path]
        slices = -(-launch.upto_m // rows)
        splits = policy.splits_of(launch, bits, size_k)
        if splits > 1:
            floats = max(floats, slices * splits * rows * n_pad)
        counters = max(counters, slices * policy.blocks(size_n))
    return floats, -(-counters // COUNTER_GRANULE) * COUNTER_GRANULE


_lock = threading.Lock()
_shared: dict[torch.device, Workspace] = {}


def shared_workspace(device: torch.device, floats: int, counters: int) -> Workspace:
    """The device's workspace, replaced by a larger one when a layer needs more (layers bound
    before keep the one they hold, which stays valid)."""
    with _lock:
        ws = _shared.get(device)
        if ws is None or ws.partials.numel() < floats or ws.counters.numel() < counters:
            floats = max(floats, ws.partials.numel() if ws else 0, 1)
            counters = max(counters, ws.counters.numel() if ws else 0, COUNTER_GRANULE)
            ws = Workspace(
                partials=torch.empty(floats, dtype=torch.float32, device=device),
                counters=torch.zeros(counters, dtype=torch.int32, device=device),
            )
            _shared[device] = ws
        return ws
