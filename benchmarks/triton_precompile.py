"""Compile the triton backend's kernels for this GPU in parallel processes, before timing them.

Tuning tries a handful of tile shapes per batch-size bucket; compiling them one after another
inside the benchmark costs more GPU time than the timing itself. This fills Triton's on-disk
cache from several processes at once (one small launch per configuration), so the benchmark
and the tuner find every kernel already built. Shapes here have K, N and strides divisible by
16, like the benchmark's, so the compiled specializations are the same ones.

What is compiled is what the backend launches: the tuner's candidates per bit width
(``configs.candidates``, tiles that cannot fit left out) with the single-LOP3 asm dequant for
fp16, the dequant kernel (plain and act-order), and for act-order the column gather per dtype.

    python benchmarks/triton_precompile.py --bits 2,3,4,8 --group-size 128 --act-order both
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

JOB = tuple  # (bits, group_size, dtype name, act_order, sym, config dict, split_k)


def _jobs(args) -> list[tuple]:
    from gptq_backends.triton_kernels import configs  # noqa: PLC0415

    seen, jobs = set(), []
    acts = {"no": (False,), "yes": (True,), "both": (False, True)}[args.act_order]
    for bits, dtype, act, m in itertools.product(args.bits, args.dtypes, acts, (1, 32, 64, 256)):
        for cfg in configs.candidates(m, 4096, 4096, bits):
            if act and ("gather", dtype) not in seen:
                seen.add(("gather", dtype))
                jobs.append((bits, args.group_size, dtype, True, None, 1))
            if cfg.path == "dequant":
                key = (bits, dtype, act, "dequant")
                if key not in seen:
                    seen.add(key)
                    jobs.append((bits, args.group_size, dtype, act, cfg.__dict__, 1))
                continue
            # act-order runs the plain kernel on permuted x: it compiles nothing new
            for split in ((1, 2) if cfg.split_k == 0 else (cfg.split_k,)):
                key = (bits, dtype, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
                       split == 1)
                if key not in seen:
                    seen.add(key)
                    jobs.append((bits, args.group_size, dtype, False, cfg.__dict__, split))
    return jobs


def _compile(job: tuple) -> tuple[str, float, str]:
    import torch  # noqa: PLC0415

    from gptq_backends.triton_kernels import dispatch, ops, target  # noqa: PLC0415
    from gptq_backends.triton_kernels.options import TritonOptions  # noqa: PLC0415
    from gptq_backends.triton_kernels.configs import KernelConfig  # noqa: PLC0415
    from gptq_core.format import default_g_idx, pack_weight  # noqa: PLC0415

    bits, gs, dtype_name, act, cfg_dict, split = job
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    dev = torch.device("cuda")
    K, N = 1024, 256
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.int32)
    groups = 1 if gs == -1 else K // gs
    zeros = torch.full((groups, N), 2 ** (bits - 1), dtype=torch.int32)
    g_idx = default_g_idx(K, gs)
    if act:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    w = pack_weight(q, torch.rand(groups, N, generator=g) * 0.01, zeros, bits=bits,
                    group_size=gs, g_idx=g_idx, desc_act=act).to(dev)
    p = dispatch.prepare(w, dev, TritonOptions(autotune=False))
    if cfg_dict is None:  # act-order's column gather (the default Triton kernel)
        x = torch.randn(1, K, device=dev).to(dtype)
        t0 = time.perf_counter()
        try:
            ops.gather_columns(x, p.perm)
            torch.cuda.synchronize()
            status = "ok"
        except Exception as exc:  # noqa: BLE001
            status = f"{type(exc).__name__}: {str(exc)[:120]}"
        return f"{dtype_name} act gather", time.perf_counter() - t0, status
    cfg = KernelConfig(**{**cfg_dict, "split_k": split})
    x = torch.randn(max(1, cfg.block_m // 2), K, device=dev).to(dtype)
    t0 = time.perf_counter()
    try:
        ops.launch(x, p, None, cfg)
        torch.cuda.synchronize()
        status = "ok"
    except Exception as exc:  # noqa: BLE001 - e.g. too much shared memory: the tuner skips it
        status = f"{type(exc).__name__}: {str(exc)[:120]}"
    asm = " asm" if target.use_asm(dev, x.dtype, bits) and cfg.path == "fused" else ""
    return (f"b{bits} {dtype_name}{' act' if act else ''} {cfg.label()}{asm}",
            time.perf_counter() - t0, status)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="4", help="comma-separated bit widths")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dtypes", default="fp16", help="comma-separated: fp16,bf16,fp32")
    ap.add_argument("--act-order", choices=("no", "yes", "both"), default="both")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    args.bits = [int(b) for b in args.bits.split(",")]
    args.dtypes = [d.strip() for d in args.dtypes.split(",")]
    jobs = _jobs(args)
    t0 = time.perf_counter()
    print(f"compiling {len(jobs)} kernels in {args.workers} processes", flush=True)
    failed = 0
    import multiprocessing  # noqa: PLC0415

    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        for label, seconds, status in ex.map(_compile, jobs):
            failed += status != "ok"
            print(f"  {label}: {seconds:.1f} s {status}", flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s, {failed} failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
