"""Quantizing one model on several devices at once, to the same bytes as on one (DESIGN.md §6).

Per decoder layer the driver spends its time in two halves: forward passes that accumulate
Hessians (one per true-sequential group, plus the float pass and the pass that makes the next
layer's inputs), and the GPTQ maths per linear. Both are spread here:

* **Data-parallel calibration.** The calibration batches are cut into *chunks* of
  :data:`DEFAULT_CHUNK_SAMPLES` consecutive samples (a driver argument; a batch belongs to the
  chunk its first sample falls in). The chunks, not the devices, define the arithmetic: every
  Hessian is the left fold, in chunk order, of per-chunk partial Hessians, each a running mean
  over its batches in batch order (:class:`ChunkedHessian`, :func:`merge`). The devices take
  contiguous runs of chunks (:func:`plan_shards`); each holds a replica of the layer
  (:func:`replicate`) and its share of the hidden states, which stay there from layer to layer.
  Device 0's chunks are the fold's prefix, so it folds as it goes; the others keep their
  partials until device 0 merges them in order. One device or eight: the same additions in
  the same order, hence the same bytes. Why chunks of samples rather than a fixed count of
  chunks: a calibration set of at most one chunk (every test's) gives exactly the single
  running mean that :class:`.gptq.GPTQ` computes, so today's bytes do not move there, while
  the default 128 samples still make 8 chunks, enough for 8 devices.
* **GPTQ maths.** The linears of a group are quantized concurrently, each whole on one device
  (:func:`assign_linears`, largest first onto the least-loaded device); a linear's result does
  not depend on which of identical devices computes it, and the results are gathered in the
  group's order.

Concurrency is Python threads (:func:`run_on_devices`): torch releases the GIL inside its
kernels, and CUDA work is asynchronous, so one thread per device keeps every device busy.
Grad mode is thread-local in torch, so each worker enters ``no_grad`` itself.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import GPTQError
from .gptq import GPTQ

logger = logging.getLogger("gptq_core.quantize")

#: Calibration samples per Hessian chunk. It fixes the floating-point summation tree, so it
#: must not follow the device count; 128 samples (the default calibration) make 8 chunks.
DEFAULT_CHUNK_SAMPLES = 16

#: Device types several of which a run may use (threads drive each; DESIGN.md §6).
PARALLEL_DEVICE_TYPES = ("cpu", "cuda")

T = TypeVar("T")


# ---------------------------------------------------------------------------- devices
def resolve_devices(
    devices: Sequence[torch.device | str] | str | None, device: torch.device | str | None, default: torch.device
) -> list[torch.device]:
    """The devices of a run, the first being the primary (where Hessians are merged).

    ``devices`` may be a list or a comma-separated string ("cuda:0,cuda:1"); without it the
    run uses ``device`` (or ``default``) alone. Refused, each with one line naming the fix: an
    empty list, a name torch does not know, a mix of kinds, a device that is not there, and
    several devices of a kind the threads do not drive.
    """
    if devices is None:
        return [torch.device(device) if device is not None else default]
    if isinstance(devices, str):
        names: list[Any] = [d.strip() for d in devices.split(",")]
    else:
        try:
            names = list(devices)
        except TypeError:
            raise GPTQError(f"devices={devices!r} must be a list of devices such as ['cuda:0', 'cuda:1']") from None
    if not names or any(n == "" for n in names):
        raise GPTQError(f"devices={devices!r} names no device (or an empty one); give e.g. 'cuda:0,cuda:1'")
    parsed = []
    for name in names:
        try:
            parsed.append(torch.device(name))
        except (RuntimeError, TypeError, ValueError):
            raise GPTQError(f"devices: {name!r} is not a device name; use cpu, cuda:0, cuda:1, ...") from None
    kinds = sorted({d.type for d in parsed})
    if len(kinds) > 1:
        raise GPTQError(
            f"devices {[str(d) for d in parsed]} mix device kinds ({', '.join(kinds)}); the bytes are the "
            "same as one device's only on identical devices: list devices of one kind"
        )
    kind = kinds[0]
    if len(parsed) > 1 and kind not in PARALLEL_DEVICE_TYPES:
        raise GPTQError(f"several {kind} devices are not supported; quantize on one, or on cpu/cuda devices")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise GPTQError(f"devices {[str(d) for d in parsed]} ask for CUDA but no CUDA GPU is available; use cpu")
        count = torch.cuda.device_count()
        if len(parsed) > 1:
            parsed = [torch.device("cuda", torch.cuda.current_device() if d.index is None else d.index) for d in parsed]
        for d in parsed:
            if d.index is not None and d.index >= count:
                raise GPTQError(f"devices: {d} does not exist, this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    if device is not None:
        given = torch.device(device)
        if given.type != parsed[0].type or given.index not in (None, parsed[0].index):
            raise GPTQError(f"device={str(given)!r} is not the first of devices={[str(d) for d in parsed]}; "
                            "give devices only")
    return parsed


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class ShardPlan:
    """Which chunk and which device every calibration batch belongs to."""

    devices: tuple[torch.device, ...]
    chunk_of: tuple[int, ...]  # per batch: its chunk (dense numbering, in batch order)
    device_of: tuple[int, ...]  # per batch: index into ``devices``

    @property
    def chunks(self) -> int:
        return (max(self.chunk_of) + 1) if self.chunk_of else 0

    def batches_on(self, slot: int) -> list[int]:
        """The batch numbers device ``slot`` works on, in order."""
        return [b for b, d in enumerate(self.device_of) if d == slot]

    @property
    def busy(self) -> list[int]:
        """Device slots that hold at least one batch (the others only do GPTQ maths)."""
        return sorted(set(self.device_of))

    def device_of_batch(self, number: int) -> torch.device:
        return self.devices[self.device_of[number]]


def plan_shards(batch_sizes: Sequence[int], chunk_samples: int, devices: Sequence[torch.device]) -> ShardPlan:
    """Chunks from the samples alone; devices take contiguous, balanced runs of chunks."""
    if chunk_samples < 1:
        raise GPTQError(f"chunk_samples={chunk_samples} must be >= 1 (calibration samples per Hessian chunk)")
    raw, start = [], 0
    for size in batch_sizes:
        raw.append(start // chunk_samples)
        start += size
    dense = {c: i for i, c in enumerate(sorted(set(raw)))}
    chunk_of = tuple(dense[c] for c in raw)
    count = len(dense)
    device_of = tuple(c * len(devices) // count for c in chunk_of)
    if count < len(devices):
        logger.info("%d Hessian chunk(s) for %d devices: %d device(s) only quantize (fewer "
                    "calibration samples or a smaller chunk_samples would change that)",
                    count, len(devices), len(devices) - count)
    return ShardPlan(tuple(devices), chunk_of, device_of)


# ---------------------------------------------------------------------------- Hessians
def _clone(acc: GPTQ) -> GPTQ:
    copy_ = GPTQ.__new__(GPTQ)
    copy_.in_features, copy_.nsamples = acc.in_features, acc.nsamples
    copy_.H = acc.H.clone()
    copy_.D = None if acc.D is None else acc.D.clone()
    return copy_


def merge(total: GPTQ | None, part: GPTQ, device: torch.device) -> GPTQ | None:
    """``total`` with chunk partial ``part`` folded in (on ``device``): the row-weighted mean.
    An empty part changes nothing; into nothing the part itself goes (no arithmetic), so one
    chunk is exactly its running mean."""
    if part.nsamples == 0:
        return total
    if total is None or total.nsamples == 0:
        if part.H.device != device:
            part.H = part.H.to(device)
            part.D = None if part.D is None else part.D.to(device)
        return part
    n = total.nsamples + part.nsamples
    keep, add = total.nsamples / n, part.nsamples / n
    total.H.mul_(keep).add_(part.H.to(device), alpha=add)
    if total.D is None or part.D is None:
        total.D = None  # a chunk without the float reference: the whole Hessian goes without
    else:
        total.D.mul_(keep).add_(part.D.to(device), alpha=add)
    total.nsamples = n
    return total


class ChunkedHessian:
    """One input's Hessian on one device, as partial :class:`GPTQ` accumulators per chunk.

    ``fold``: the device's chunks are the first ones (device 0), so finished chunks are
    folded into one running total as they end (two K x K buffers instead of one per chunk).
    """

    def __init__(self, in_features: int, device: torch.device, fold: bool) -> None:
        self.in_features = in_features
        self.device = device
        self.fold = fold
        self.parts: list[tuple[int, GPTQ]] = []  # finished chunks (folded: one entry, chunk -1)
        self.current: tuple[int, GPTQ] | None = None
        self.paired = True

    def add_batch(self, chunk: int, inputs: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        if self.current is None or self.current[0] != chunk:
            self._close()
            self.current = (chunk, GPTQ(self.in_features, device=self.device))
        self.current[1].add_batch(inputs, reference if self.paired else None)

    def drop_reference(self) -> None:
        """The float reference is lost (a call without a float counterpart): no ``D`` anywhere."""
        self.paired = False
        for _, acc in self.parts + ([self.current] if self.current else []):
            acc.D = None

    def _close(self) -> None:
        if self.current is None:
            return
        chunk, acc = self.current
        self.current = None
        if self.fold:
            total = self.parts[0][1] if self.parts else None
            folded = merge(total, acc, self.device)
            if folded is not None:
                self.parts = [(-1, folded)]
        elif acc.nsamples:
            self.parts.append((chunk, acc))

    def finished(self) -> list[GPTQ]:
        """The partials in chunk order (device 0's already folded into one)."""
        self._close()
        return [acc for _, acc in self.parts]


def combine(per_device: Sequence[dict[str, ChunkedHessian]], in_features: dict[str, int],
            device: torch.device) -> dict[str, GPTQ]:
    """Every linear's Hessian: its partials from the devices in device (= chunk) order folded on
    ``device``. Linears that shared an accumulator on every device share the result."""
    out: dict[str, GPTQ] = {}
    done: dict[tuple[int, ...], GPTQ] = {}
    used: set[int] = set()  # partials a fold already started from (and so modified)
    for name, k in in_features.items():
        sources = [accs.get(name) for accs in per_device]
        key = tuple(id(s) for s in sources)
        if key in done:
            out[name] = done[key]
            continue
        total: GPTQ | None = None
        for source in sources:
            for part in ([] if source is None else source.finished()):
                if total is None and id(part) in used:  # shared differently on another device
                    part = _clone(part)
                used.add(id(part))
                total = merge(total, part, device)
        if total is None:  # no batch reached it: empty Hessian, RTN fallback
            total = GPTQ(k, device=device)
        if any(s is not None and not s.paired for s in sources):
            total.D = None
        done[key] = out[name] = total
    return out


# ---------------------------------------------------------------------------- replicas
def replicate(layer: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``layer`` with its own parameters and buffers on ``device`` (copied there
    directly, never doubled on the source device), for another device's batches."""
    memo: dict[int, Any] = {}
    for t in list(layer.parameters()) + list(layer.buffers()):
        if id(t) in memo:
            continue
        data = t.detach().to(device, copy=True)
        memo[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    return copy.deepcopy(layer, memo)


# ---------------------------------------------------------------------------- threads
def _on_device(device: torch.device, fn: Callable[[], T]) -> T:
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())  # grad mode is thread-local
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        return fn()


def run_on_devices(jobs: Sequence[tuple[torch.device, Callable[[], T]]]) -> list[T]:
    """Run each ``(device, job)`` at once, one thread each; the results in job order. One job
    runs in the calling thread. Every job finishes before the first failure (by job order) is
    raised, so no thread outlives the call."""
    if len(jobs) == 1:
        device, fn = jobs[0]
        return [_on_device(device, fn)]
    # Threads of their own, not a pool: a pool hands a second job to a worker that finished
    # early, and then two devices' shares would run one after the other.
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException | None] = [None] * len(jobs)

    def work(i: int, device: torch.device, fn: Callable[[], T]) -> None:
        try:
            results[i] = _on_device(device, fn)
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the calling thread
            errors[i] = exc

    threads = [threading.Thread(target=work, args=(i, d, f), name=f"gptq-device-{i}")
               for i, (d, f) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for error in errors:
        if error is not None:
            raise error
    return results


def assign_linears(shapes: dict[str, tuple[int, int]], slots: int) -> dict[str, int]:
    """Device slot of each linear of a group: largest estimated cost first (N K^2 + K^3, the
    lazy updates and the inverse Hessian) onto the least-loaded slot; ties by group order."""
    load = [0.0] * slots
    out: dict[str, int] = {}
    order = sorted(shapes, key=lambda n: -(shapes[n][0] * shapes[n][1] ** 2 + shapes[n][1] ** 3))
    for name in order:
        n, k = shapes[name]
        slot = min(range(slots), key=lambda s: (load[s], s))
        load[slot] += n * k * k + k**3
        out[name] = slot
    return out

