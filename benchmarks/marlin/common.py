"""Helpers shared by the GPU scripts: random GPTQ weights made on the GPU, CUDA-graph timing."""

from __future__ import annotations

import math
import statistics

import torch

from gptq_core.format import PackedWeight, default_g_idx, num_groups, pack_weight


def gpu_packed(bits: int, group_size: int, sym: bool, desc_act: bool, K: int, N: int,
               seed: int = 0, bias: bool = False) -> PackedWeight:
    """Like gptq_core.testing.random_packed, drawn on the GPU (large layers in a second)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    G = num_groups(K, group_size)
    maxq = 2**bits - 1
    q = torch.randint(0, maxq + 1, (N, K), generator=g, device=dev, dtype=torch.int32)
    if sym:
        zeros = torch.full((G, N), 2 ** (bits - 1), dtype=torch.int32, device=dev)
    else:
        zeros = torch.randint(1, maxq + 1, (G, N), generator=g, device=dev, dtype=torch.int32)
    base = math.sqrt(12.0) / ((maxq + 1) * math.sqrt(K))
    scales = (torch.rand(G, N, generator=g, device=dev) + 0.5) * base
    g_idx = default_g_idx(K, group_size, device=dev)
    if desc_act:
        g_idx = g_idx[torch.randperm(K, generator=g, device=dev)]
    b = torch.randn(N, generator=g, device=dev) * 0.5 if bias else None
    return pack_weight(q, scales, zeros, bits=bits, group_size=group_size, g_idx=g_idx, sym=sym,
                       desc_act=desc_act, bias=b)


def time_calls(calls, target_ms: float = 3.0, reps: int = 5) -> float:
    """Median microseconds per call of ``calls`` (a list cycling over weight copies), replayed
    back to back from a CUDA graph so that launch overhead on the CPU does not count."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for c in calls:
            c()
        end.record()
    torch.cuda.synchronize()
    one = start.elapsed_time(end) / len(calls)
    repeat = max(1, min(64, math.ceil(target_ms / max(one, 1e-3) / len(calls))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(repeat):
            for c in calls:
                c()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / (repeat * len(calls)))
    del graph
    return statistics.median(samples)


def copies_for(nbytes: int, floor: int = 2, total: int = 200 << 20) -> int:
    """How many copies of a weight of nbytes keep the rotation well beyond the 50 MB L2."""
    return max(floor, math.ceil(total / max(nbytes, 1)))


def rotated(prepared, copies: int) -> list:
    """``prepared`` and ``copies - 1`` copies of its weights (the workspace is shared), so that a
    rotation over them streams the weights from DRAM as a real model's layers do."""
    import dataclasses

    return [prepared] + [dataclasses.replace(prepared, tiles=prepared.tiles.clone(), scales=prepared.scales.clone())
                         for _ in range(copies - 1)]


def marlin_call(prepared, x: torch.Tensor, kind: int | None = None, bias: torch.Tensor | None = None):
    """One call as the backend makes it (its dispatch policy picks the kernel), or with the
    kernel kind given (an A/B between kinds; policy.KINDS names them)."""
    from gptq_backend_marlin import ops, plugin

    if kind is None:
        return plugin.gptq_qmatmul(x, prepared, bias)
    p = prepared
    return ops.gemm(x, p.tiles, p.scales, p.zeros, p.perm, bias, p.slots, p.counters, p.bits,
                    p.group_size, p.size_n, kind)
