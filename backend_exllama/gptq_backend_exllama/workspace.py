"""The kernel's split-K workspace, made at bind and shared by the layers of one device.

Split-K blocks add their fp32 partial sums into ``acc`` ([rows, N] floats) and count
themselves in ``counters`` (one per 8-row chunk and 512-column block); the last one writes the
output and puts both back to zero (csrc/gemm.cuh). They belong to the prepared weights, not to
the op, so a call allocates nothing that outlives it and CUDA graphs can capture it
(docs/DESIGN.md §11). One workspace serves every layer of a device (sized for the largest);
calls that share it run one after another, as they do on one stream.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .policy import BLOCK_N, ROWS_PER_CHUNK

#: Counters and floats are allocated in multiples of these, so that most layers share one tensor.
COUNTER_GRANULE = 1024
ACC_GRANULE = 1 << 16


@dataclass(frozen=True, eq=False)
class Workspace:
    acc: torch.Tensor       # float32 zeros [>= rows * N]
    counters: torch.Tensor  # int32 zeros [>= chunks * column blocks]


def needs(N: int, rows: int) -> tuple[int, int]:
    """(acc floats, counters) for a layer of N columns whose kernel serves up to ``rows`` rows."""
    rows = max(rows, 1)
    chunks = -(-rows // ROWS_PER_CHUNK)
    counters = chunks * -(-N // BLOCK_N)
    floats = chunks * ROWS_PER_CHUNK * N
    return -(-floats // ACC_GRANULE) * ACC_GRANULE, -(-counters // COUNTER_GRANULE) * COUNTER_GRANULE


_lock = threading.Lock()
_shared: dict[torch.device, Workspace] = {}


def shared_workspace(device: torch.device, floats: int, counters: int) -> Workspace:
    """The device's workspace, replaced by a larger one when a layer needs more (layers bound
    before keep the one they hold, which stays valid for them)."""
    with _lock:
        ws = _shared.get(device)
        if ws is None or ws.acc.numel() < floats or ws.counters.numel() < counters:
            floats = max(floats, ws.acc.numel() if ws else 0)
            counters = max(counters, ws.counters.numel() if ws else 0)
            ws = Workspace(acc=torch.zeros(floats, dtype=torch.float32, device=device),
                           counters=torch.zeros(counters, dtype=torch.int32, device=device))
            _shared[device] = ws
        return ws
