"""Time packing and unpacking of a Llama-2-7B MLP layer (4096 x 11008) on this CPU.

    python benchmarks/bench_packing.py [--repeat 5] [--shape 4096x11008] [--bits 4 3 2 8]

Prints one row per bit width: the median of ``pack_weight`` (ints -> qweight + qzeros), of
``unpack_qweight`` (qweight -> ints), their sum, and ``dequantize`` (to fp16, for scale).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from gptq_core import pack_weight
from gptq_core.format import num_groups


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(bits: int, K: int, N: int, group_size: int, repeat: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.int32)
    G = num_groups(K, group_size)
    zeros = torch.randint(1, 2**bits, (G, N), generator=g, dtype=torch.int32)
    scales = torch.rand(G, N, generator=g) + 0.5

    def pack():
        return pack_weight(q, scales, zeros, bits=bits, group_size=group_size, sym=False)

    packed = pack()
    assert torch.equal(packed.unpack_qweight().to(torch.int32), q.t())  # correct before timed
    return {
        "pack": median_seconds(pack, repeat),
        "unpack": median_seconds(packed.unpack_qweight, repeat),
        "dequant": median_seconds(lambda: packed.dequantize(torch.float16), repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x11008", help="KxN (in_features x out_features)")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    K, N = map(int, args.shape.lower().split("x"))
    print(f"K={K} N={N} group_size={args.group_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeat} runs")
    print(f"{'bits':>4}  {'pack s':>8}  {'unpack s':>8}  {'pack+unpack s':>13}  {'dequant fp16 s':>14}")
    for bits in args.bits:
        r = bench(bits, K, N, args.group_size, args.repeat)
        print(f"{bits:>4}  {r['pack']:>8.3f}  {r['unpack']:>8.3f}  {r['pack'] + r['unpack']:>13.3f}"
              f"  {r['dequant']:>14.3f}")


if __name__ == "__main__":
    main()
