"""Scratch memory of the fused kernel, allocated when layers are prepared, never during a call.

Split-K programs write fp32 partials and take a ticket per output tile (the last one sums the
partials and puts the ticket back to zero). Calls must not allocate memory that outlives them
(a CUDA graph would capture the allocation into its private pool, docs/DESIGN.md §11), so the
workspace exists before the first call: one per device, shared by the layers prepared on it
and sized for the largest need a layer's dispatch policy announced. Calls on one stream are
ordered, so they can share it (generate(), CUDA graphs and torch.compile use one stream per
device); split-K calls running concurrently on two streams of one device would race on it.
The same tensors stand in for absent kernel arguments (never read: their flags are off).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

#: Smallest workspace: 256 KiB of partials and 1024 tickets cover decode on small layers.
MIN_PARTIALS = 1 << 16
MIN_TICKETS = 1024

_lock = threading.Lock()
_shared: dict[torch.device, Scratch] = {}


@dataclass(frozen=True, eq=False)
class Scratch:
    """Split-K partials (fp32), tickets (int32, zero between calls) and an int16 and a float16
    stand-in for absent arguments (the tickets stand in for absent int32 ones)."""

    partials: torch.Tensor
    tickets: torch.Tensor
    int16: torch.Tensor
    float16: torch.Tensor

    def __repr__(self) -> str:
        return (f"Scratch({self.partials.numel()} partials, {self.tickets.numel()} tickets, "
                f"{self.partials.device})")

    def holds(self, partials: int, tickets: int) -> bool:
        return partials <= self.partials.numel() and tickets <= self.tickets.numel()


def _allocate(device: torch.device, partials: int, tickets: int) -> Scratch:
    return Scratch(
        partials=torch.empty(max(partials, MIN_PARTIALS), dtype=torch.float32, device=device),
        tickets=torch.zeros(max(tickets, MIN_TICKETS), dtype=torch.int32, device=device),
        int16=torch.zeros(16, dtype=torch.int16, device=device),
        float16=torch.zeros(16, dtype=torch.float16, device=device),
    )


def reserve(device: torch.device, partials: int, tickets: int) -> Scratch:
    """At prepare: the device's shared scratch if it holds ``partials`` and ``tickets``, else a
    larger one that replaces it for the layers prepared from now on (layers prepared before
    keep the one they were given, which holds what they need)."""
    with _lock:
        shared = _shared.get(device)
        if shared is not None and shared.holds(partials, tickets):
            return shared
        if shared is not None:
            partials = max(partials, shared.partials.numel())
            tickets = max(tickets, shared.tickets.numel())
        shared = _shared[device] = _allocate(device, partials, tickets)
        return shared


def current(device: torch.device) -> Scratch | None:
    """The device's shared scratch (the largest reserved so far), or None if no layer was
    prepared on it: then calls run without split-K."""
    return _shared.get(device)
