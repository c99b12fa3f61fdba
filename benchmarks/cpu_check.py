"""The cpu backend against the float32 layer, torch's int4 CPU kernel and the torch reference.

Every implementation is first checked against the float64 reference on the real shape
(fresh random inputs), then timed side by side: rounds in which each implementation runs
once over its weight copies (enough copies that the 32 MB L3 cannot hold them, so weights come
from memory as in decode), the median of the rounds per implementation. Interleaving the
implementations inside every round keeps a neighbour's load on this shared machine from
favouring one of them, and the fastest round ("best") is reported beside the median: on a
shared 2-core machine the median mostly measures the neighbours. Figures: NOTES/perf-cpu.md.

    python benchmarks/cpu_check.py                       # 4-bit g128, both shapes, M=1,4,16,64
    python benchmarks/cpu_check.py --bits 2,3,8 --shapes 4096x4096 --m 1,16 --no-reference
    python benchmarks/cpu_check.py --m 16,32,64,128,256 --paths   # both paths of the backend
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gptq_core import QuantLinear
from gptq_core.testing import assert_matches_reference, random_activations, random_packed
from gptq_backends.cpu_kernels import build, fallback, ops

#: Bytes of weights the copies of one implementation must exceed (2x this machine's L3).
COLD_BYTES = 64 << 20


def copies_for(nbytes: int) -> int:
    return max(1, min(16, -(-COLD_BYTES // max(nbytes, 1))))


def implementations(bits: int, group: int, K: int, N: int, ms: list[int], reference: bool,
                    paths: bool) -> dict[str, tuple[list[Callable], object, torch.dtype]]:
    """name -> (one call per weight copy taking x, the weight of the first, x's dtype)."""
    w0 = random_packed(bits, group, True, False, K, N, seed=0)
    q_bytes = w0.qweight.numel() * 4 + w0.scales.numel() * 2
    n = copies_for(q_bytes)
    weights = [w0] + [random_packed(bits, group, True, False, K, N, seed=i) for i in range(1, n)]
    out: dict[str, tuple[list[Callable], Callable]] = {}

    dense = [w.dequantize(torch.float32).t().contiguous() for w in weights[:copies_for(4 * K * N)]]
    fp32 = torch.float32
    out["fp32 nn.Linear"] = ([lambda x, d=d: F.linear(x, d) for d in dense], weights[0], fp32)

    # torch's int4 CPU kernel in bf16, its fast dtype (fp32 and fp16 activations take a path
    # ~50x slower at M=16 here: NOTES/perf-cpu.md).
    if fallback.int4_reason(bits, group, K) is None:
        packs = [fallback.pack_int4(w) for w in weights]
        calls = [lambda x, p=p: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, p.packed, group, p.scale_zeros) for p in packs]
        out["torch int4 (bf16 x)"] = (calls, weights[0], torch.bfloat16)

    layers = [QuantLinear.from_packed(w, backend="cpu", act_dtype=fp32) for w in weights]
    out["cpu backend"] = (layers, weights[0], fp32)
    if paths:
        for name, kind in (("cpu gemv", ops.KIND_GEMV), ("cpu gemm", ops.KIND_GEMM)):
            def call(x, q, kind=kind):
                L = q.binding.prepared.layout
                return ops.qmatmul(x, L.qdata, L.scales, L.zeros, L.segs, L.perm, None,
                                   L.vals_per_byte, L.sym_zero, N, kind)
            out[name] = ([lambda x, q=q, c=call: c(x, q) for q in layers], weights[0], fp32)
    if reference:
        ref = QuantLinear.from_packed(weights[0], backend="torch", act_dtype=fp32)
        out["torch reference"] = ([ref], weights[0], fp32)
    return out


def time_round(calls: list[Callable], x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    for call in calls:
        call(x)
    return (time.perf_counter() - t0) / len(calls)


def run(bits: int, group: int, K: int, N: int, ms: list[int], rounds: int, reference: bool,
        paths: bool) -> list[dict]:
    impls = implementations(bits, group, K, N, ms, reference, paths)
    rows = []
    for m in ms:
        x32 = random_activations(m, K, dtype=torch.float32, seed=m)
        xs = {name: x32.to(dtype) for name, (_, _, dtype) in impls.items()}
        for name, (calls, w, _) in impls.items():  # float64 check, then one warm-up round
            assert_matches_reference(calls[0](xs[name]), xs[name], w, context=f"{name} {K}x{N} M={m}")
            time_round(calls, xs[name])
        times: dict[str, list[float]] = {name: [] for name in impls}
        for r in range(rounds):
            for name, (calls, _, _) in impls.items():
                if name == "torch reference" and r >= 3:
                    continue  # ~0.5 s a call: three rounds say enough
                times[name].append(time_round(calls, xs[name]))
        best = {name: min(t) * 1e3 for name, t in times.items()}
        base = best["fp32 nn.Linear"]
        for name, t in best.items():
            rows.append({"bits": bits, "K": K, "N": N, "M": m, "impl": name, "ms": t,
                         "median_ms": statistics.median(times[name]) * 1e3, "vs_fp32": base / t,
                         "cpu_vs_this": t / best["cpu backend"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="4", help="comma-separated bit widths (default 4)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--shapes", default="4096x4096,4096x11008", help="KxN list")
    parser.add_argument("--m", default="1,4,16,64", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per M")
    parser.add_argument("--no-reference", action="store_true", help="skip the torch reference")
    parser.add_argument("--paths", action="store_true", help="also time each path of the backend")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    build.load()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels: {build.isa()}")
    print("| bits | K x N | M | implementation | best ms | median ms | x fp32 (best) | cpu backend faster by |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for bits in (int(b) for b in args.bits.split(",")):
        for shape in args.shapes.split(","):
            K, N = (int(v) for v in shape.lower().split("x"))
            for row in run(bits, args.group_size, K, N, [int(m) for m in args.m.split(",")],
                           args.rounds, not args.no_reference, args.paths):
                print(f"| {row['bits']} | {K}x{N} | {row['M']} | {row['impl']} | {row['ms']:.3f} | "
                      f"{row['median_ms']:.3f} | {row['vs_fp32']:.2f} | {row['cpu_vs_this']:.1f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
