"""The kernels' stream-K workspace, made at bind and shared by the layers of one device.

A shared block tile is summed through fp32 slots (two per worker block) and int32 counters
(one per tile and slice) that every call leaves at zero again (csrc/epilogue.cuh). They
belong to the prepared weights, not to the op, so that a call allocates nothing that outlives
it and CUDA graphs can capture it (docs/DESIGN.md §11). One workspace serves every layer of a
device: its slots are sized for all the device's worker blocks (the same for every layer) and
its counters for the largest layer; calls that share it must run one after another, which
they do on one stream.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .policy import BLOCKS_PER_SM, TILE_N, GpuFacts

#: fp32 partial sums of one block tile (csrc/marlin.h kSlotFloats: 4 row blocks x 8 warps x
#: 4 subtiles x 32 lanes x 4 accumulators).
SLOT_FLOATS = 4 * 8 * 4 * 32 * 4
#: 16-row blocks one block multiplies at most, by weight width (csrc/kernels.h max_m_blocks);
#: more rows run as slices, each with its own workers and counters.
MAX_M_BLOCKS = {4: 4, 8: 2}
#: Counters are allocated in multiples of this, so that most layers share the first tensor.
COUNTER_GRANULE = 1024


@dataclass(frozen=True, eq=False)
class Workspace:
    slots: torch.Tensor     # float32 [workers * 2 * SLOT_FLOATS]
    counters: torch.Tensor  # int32 zeros [slices * n_tiles, rounded up]


def slices(m: int, bits: int) -> int:
    return max(1, -(-m // (16 * MAX_M_BLOCKS[bits])))


def needs(gpu: GpuFacts, bits: int, N: int, rows: int) -> tuple[int, int]:
    """(slot floats, counters) of a K x N layer whose kernels serve up to ``rows`` rows: slots
    for every block of every SM (the op runs at most that many workers per call; more
    slices than that share them), counters for every tile of every slice."""
    s = slices(rows, bits)
    workers = max(gpu.sm_count * BLOCKS_PER_SM, s)
    counters = s * -(-N // TILE_N)
    return workers * 2 * SLOT_FLOATS, -(-counters // COUNTER_GRANULE) * COUNTER_GRANULE


_lock = threading.Lock()
_shared: dict[torch.device, Workspace] = {}


def shared_workspace(device: torch.device, slot_floats: int, counters: int) -> Workspace:
    """The device's workspace, replaced by a larger one when a layer needs more (layers bound
    before keep the one they hold, which stays valid)."""
    with _lock:
        ws = _shared.get(device)
        if ws is None or ws.slots.numel() < slot_floats or ws.counters.numel() < counters:
            slot_floats = max(slot_floats, ws.slots.numel() if ws else 0)
            counters = max(counters, ws.counters.numel() if ws else 0)
            ws = Workspace(
                slots=torch.zeros(slot_floats, dtype=torch.float32, device=device),
                counters=torch.zeros(counters, dtype=torch.int32, device=device),
            )
            _shared[device] = ws
        return ws
