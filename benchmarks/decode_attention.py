"""Experiment: the fast path's decode attention under each SDPA backend (not part of the product).

The fast path (gptq_core/generation/attention.py) calls SDPA with one query per row over the
whole static cache and a boolean mask [B, 1, 1, T] (padding and unwritten positions); with
grouped KV heads the group's query heads become the query length. In the replayed decode step
that attention took 0.19 ms at batch 1 and 0.95 ms at batch 32 (NOTES/perf-h200.md), and at
batch 32 it reads 50 MB of cache per layer, so its rate matters. This checks every backend
against a float64 reference on fresh random inputs, then times it as the step runs it: one
call per layer, each on that layer's cache, captured in one CUDA graph and replayed
(gptq_core.bench.timing), microseconds per call and the cache bytes read per second.
``--flex`` adds FlexAttention (compiled; its decode kernel splits the cache) on the
Llama-2-7B shape (``--device cpu`` runs the same checks, slowly, without the GPU backends).

    python benchmarks/decode_attention.py [--batches 1,8,32] [--lengths 96,1024,4096] [--flex]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptq_core.bench.timing import time_calls

#: name -> (query heads, KV heads, head dim)
SHAPES = {"llama-2-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128)}
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}
LAYERS = 32
CACHE_BUDGET = 8 << 30  #: bytes of distinct per-layer caches; beyond it the layers share copies


def inputs(batch: int, heads: int, kv_heads: int, dim: int, length: int, copies: int, device, seed: int):
    """Query as attention.py shapes it, ``copies`` caches, and a mask of left padding (0-8
    positions) and unwritten tails (up to a quarter of the cache), every row with a key."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q_len = heads // kv_heads
    q = torch.randn(batch, kv_heads, q_len, dim, generator=g).to(device, torch.float16)
    kv = [(torch.randn(batch, kv_heads, length, dim, generator=g).to(device, torch.float16),
           torch.randn(batch, kv_heads, length, dim, generator=g).to(device, torch.float16))
          for _ in range(copies)]
    pad = torch.randint(0, min(9, length // 2), (batch,), generator=g)
    end = length - torch.randint(0, max(1, length // 4), (batch,), generator=g)
    cols = torch.arange(length)
    mask = ((cols >= pad[:, None]) & (cols < end[:, None]))[:, None, None, :].to(device)
    return q, kv, mask


def reference(q, k, v, mask, scale: float) -> torch.Tensor:
    s = torch.einsum("bhqd,bhtd->bhqt", q.double(), k.double()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqt,bhtd->bhqd", s.softmax(-1), v.double())


def sdpa_call(backend: SDPBackend) -> Callable:
    def run(q, k, v, mask, scale):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return run


def flex_call(mask: torch.Tensor) -> Callable:
    """FlexAttention reading the live boolean mask: every cache block is marked partial, so the
    mask is read per element and a decode step could update it in place under a CUDA graph
    (a block mask built from the mask's content would go stale as the cache fills)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    b, _, _, t = mask.shape
    dense = mask[:, 0, 0, :]
    blocks = -(-t // 128)

    def keep(bi, h, qi, kv):
        return dense[bi, kv]

    block = BlockMask.from_kv_blocks(
        torch.full((b, 1, 1), blocks, dtype=torch.int32, device=mask.device),
        torch.arange(blocks, dtype=torch.int32, device=mask.device).expand(b, 1, 1, blocks).contiguous(),
        BLOCK_SIZE=128, mask_mod=keep, seq_lengths=(1, t))
    torch._dynamo.reset()  # one compile per shape: the shapes of a run would pass dynamo's recompile limit
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, _mask, scale):
        return compiled(q, k, v, block_mask=block, scale=scale)
    return run


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--lengths", default="96,1024,4096")
    parser.add_argument("--flex", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    print(f"{'shape':11s} {'B':>3s} {'T':>5s} {'backend':9s} {'us/call':>8s} {'GB/s':>7s} {'rel err':>8s}", flush=True)
    for name, (heads, kv_heads, dim) in SHAPES.items():
        for batch in map(int, args.batches.split(",")):
            for length in map(int, args.lengths.split(",")):
                per_layer = 2 * batch * kv_heads * length * dim * 2
                copies = max(1, min(LAYERS, CACHE_BUDGET // per_layer))
                q, kv, mask = inputs(batch, heads, kv_heads, dim, length, copies, device, seed=batch * 7919 + length)
                scale = 1 / math.sqrt(dim)
                want = reference(q, *kv[0], mask, scale)
                runs = {n: sdpa_call(b) for n, b in BACKENDS.items()}
                if args.flex and name == "llama-2-7b":
                    runs["flex"] = flex_call(mask)
                for label, run in runs.items():
                    try:
                        got = run(q, *kv[0], mask, scale)
                    except RuntimeError as exc:
                        print(f"{name:11s} {batch:3d} {length:5d} {label:9s} unsupported: {str(exc).splitlines()[0][:90]}", flush=True)
                        continue
                    err = ((got.double() - want).norm() / want.norm()).item()
                    if not err < 2e-3:
                        print(f"{name:11s} {batch:3d} {length:5d} {label:9s} WRONG: rel err {err:.2e}", flush=True)
                        continue
                    calls = [lambda k=kv[i % copies][0], v=kv[i % copies][1]: run(q, k, v, mask, scale)
                             for i in range(LAYERS)]
                    t = time_calls(calls, device)
                    print(f"{name:11s} {batch:3d} {length:5d} {label:9s} {t.us:8.1f} {per_layer / t.us / 1e3:7.0f} "
                          f"{err:8.1e}  ({t.method}, {copies} caches)", flush=True)
                del q, kv, mask
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
