"""What the capture checks need: a warm-up and a capture that counts the memory it leaves.

A backend is capturable (docs/DESIGN.md §11) when its op allocates nothing that outlives the
call, never synchronises with the host and never branches on tensor values. The second and
third show up by themselves: a sync inside ``torch.cuda.graph`` raises, and
``torch.compile(fullgraph=True)`` refuses a branch on a value. The first does not fail a
plain capture (a workspace cached on first use just stays allocated in the graph's pool),
but it crashes transformers' static cache under cudagraph trees, so :func:`capture` measures
it: whatever is still allocated after the capture, beyond its output, is a leak.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptq_core.policy import DispatchPolicy

#: The CUDA caching allocator rounds every block up to a multiple of this many bytes.
ALLOCATOR_BLOCK = 512
#: Warm-up calls before a capture (torch's docs use a few; one triggers all lazy setup).
WARMUP_CALLS = 3
#: Largest batch a policy bound adds to the captured ones (one past ``EXPLAIN_M``'s largest).
MAX_CAPTURE_M = 4097


def capture_ms(m_values: tuple[int, ...], policy: DispatchPolicy) -> tuple[int, ...]:
    """The case's batch sizes plus each bound of the policy and the row after it, so every
    path the backend dispatches to is captured."""
    ms = {m for m in m_values if m > 0}
    for route in policy.routes[:-1]:
        ms.update(min(m, MAX_CAPTURE_M) for m in (route.upto_m, route.upto_m + 1) if m > 0)
    return tuple(sorted(ms))


def block_bytes(t: torch.Tensor) -> int:
    """The bytes the caching allocator holds for ``t``'s storage."""
    return -(-t.untyped_storage().nbytes() // ALLOCATOR_BLOCK) * ALLOCATOR_BLOCK


def drop_cublas_workspaces() -> None:
    """cuBLAS keeps one workspace per (handle, stream), made at first use; a first use inside
    a capture puts it in the graph's pool. torch's cudagraph trees drop the cache on both sides
    of every capture, so such a workspace is not a leak; doing the same keeps it out of the
    count, leaving only what the backend itself kept."""
    torch._C._cuda_clearCublasWorkspaces()


def warm_up(fn: Callable[[], torch.Tensor]) -> None:
    """Run ``fn`` on a side stream first, as ``torch.cuda.graph``'s documentation requires:
    lazy set-up (autotuning, handles, JIT builds) must not happen inside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


@dataclass
class Captured:
    """A captured call: replay ``graph`` and read ``output``."""

    graph: torch.cuda.CUDAGraph
    output: torch.Tensor
    leaked_bytes: int


def capture(fn: Callable[[], torch.Tensor], what: str) -> Captured:
    """Capture ``fn`` (on the current CUDA device) in a graph of its own pool."""
    gc.collect()
    drop_cublas_workspaces()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            output = fn()
    except RuntimeError as exc:
        raise AssertionError(
            f"{what} cannot be captured in a CUDA graph: {exc}. A capturable op never waits for "
            "the host (no .item(), .tolist(), .cpu() or data-dependent Python branch) and makes "
            "no uncapturable CUDA call (docs/DESIGN.md §11)"
        ) from exc
    drop_cublas_workspaces()
    gc.collect()
    torch.cuda.synchronize()
    leaked = torch.cuda.memory_allocated() - before - block_bytes(output)
    return Captured(graph, output, leaked)
