"""Timing a list of calls (one per weight copy) so the result is per call, from memory, median.

On CUDA the calls are captured once in a CUDA graph and the graph is replayed between CUDA
events: launch gaps vanish, every call reads another copy's weights (so the L2 cache cannot
hold them), and the median over replays divided by the number of calls is the figure. A call
that cannot be captured (it synchronizes, say) falls back to events around eager calls. On
the CPU a wall clock does the same job.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    us: float  # median microseconds per call
    method: str  # "cuda-graph", "cuda-events" or "wall-clock"
    samples: int
    #: Median microseconds per call issued eagerly from Python, one after another (what an
    #: eager decode loop pays: the kernel or the host's launch path, whichever is longer).
    eager_us: float = float("nan")


def _run_all(calls: list[Callable[[], object]]) -> None:
    for call in calls:
        call()


def _cuda_median(run: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) * 1000.0


def time_calls(calls: list[Callable[[], object]], device: torch.device,
               target_seconds: float = 0.05, max_reps: int = 100,
               eager_calls: list[Callable[[], object]] | None = None) -> Timing:
    """Median time per call of ``calls`` (each already compiled/tuned by one warm-up run);
    ``eager_calls`` (default ``calls``) are also timed issued eagerly, on CUDA."""
    n = len(calls)
    if device.type != "cuda":
        times = []
        deadline = time.perf_counter() + target_seconds
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < max_reps):
            t0 = time.perf_counter()
            _run_all(calls)
            times.append((time.perf_counter() - t0) / n)
        us = statistics.median(times) * 1e6
        return Timing(us, "wall-clock", len(times), us)
    eager = calls if eager_calls is None else eager_calls
    _run_all(eager)  # warm-up of the eager path (its own binding, caches)

    _run_all(calls)  # warm-up: compile, tune, allocate
    torch.cuda.synchronize()
    estimate = _cuda_median(lambda: _run_all(calls), 1)  # us for all calls
    reps = int(max(5, min(max_reps, target_seconds * 1e6 / max(estimate, 1.0))))
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            _run_all(calls)  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            _run_all(calls)
        graph.replay()
        torch.cuda.synchronize()
        us = _cuda_median(graph.replay, reps) / n
        method = "cuda-graph"
    except Exception:  # noqa: BLE001 - not capturable: time it eagerly instead
        torch.cuda.synchronize()
        us = _cuda_median(lambda: _run_all(calls), reps) / n
        method = "cuda-events"
    eager_us = _cuda_median(lambda: _run_all(eager), reps) / len(eager)
    return Timing(us, method, reps, eager_us)
