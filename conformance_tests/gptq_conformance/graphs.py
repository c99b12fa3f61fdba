"""What the capture checks need: a warm-up and a capture that counts the memory it leaves.

A backend is capturable (docs/DESIGN.md §11) when its op allocates nothing that outlives the
call, never synchronises with the host and never branches on tensor values. The second and
third show up by themselves: a sync inside ``torch.cuda.graph`` raises, and
``torch.compile(fullgraph=True)`` refuses a branch on a value. The first does not fail a
plain capture (a workspace cached on first use just stays allocated in the graph's pool),
but it crashes transformers' static cache under cudagraph trees, so :func:`warm_up` and
:func:`capture` measure it: memory an eager call keeps after it returns, and blocks of the
graph's pool still allocated after the capture besides its output, are leaks.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptq_core.policy import DispatchPolicy

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


def drop_cublas_workspaces() -> None:
    """cuBLAS keeps one workspace per (handle, stream), made at first use. torch's cudagraph
    trees drop that cache on both sides of every warm-up and capture, so it is no leak there;
    doing the same keeps it out of these counts, leaving only what the backend kept."""
    torch._C._cuda_clearCublasWorkspaces()


def _settle() -> None:
    gc.collect()
    drop_cublas_workspaces()
    torch.cuda.synchronize()


def warm_up(fn: Callable[[], torch.Tensor]) -> int:
    """Run ``fn`` on a side stream first, as ``torch.cuda.graph``'s documentation requires
    (lazy set-up such as autotuning, handles and JIT builds must not happen inside the
    capture); return the bytes still allocated once its outputs are dropped, which a
    capturable op keeps at zero: a cache made on first use lands in the graph's pool when the
    first use is inside one (with a per-device cache, only the first test to use it sees it)."""
    _settle()
    before = torch.cuda.memory_allocated()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    _settle()
    return torch.cuda.memory_allocated() - before


@dataclass
class Captured:
    """A captured call: replay ``graph`` and read ``output``; ``kept`` lists the blocks of
    the graph's pool, other than the output's, still allocated after the capture."""

    graph: torch.cuda.CUDAGraph
    output: torch.Tensor
    kept: list[int]


def pool_blocks(pool: tuple[int, int]) -> dict[int, int]:
    """Address -> size of every allocated block in the memory pool ``pool``."""
    blocks: dict[int, int] = {}
    for segment in torch.cuda.memory_snapshot():
        if tuple(segment["segment_pool_id"]) != tuple(pool):
            continue
        address = segment["address"]
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                blocks[address] = block["size"]
            address += block["size"]
    return blocks


def capture(fn: Callable[[], torch.Tensor], what: str) -> Captured:
    """Capture ``fn`` (on the current CUDA device) in a graph with a pool of its own."""
    _settle()
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
    _settle()
    blocks = pool_blocks(graph.pool())
    blocks.pop(output.untyped_storage().data_ptr(), None)
    return Captured(graph, output, sorted(blocks.values()))
