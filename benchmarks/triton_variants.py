"""Time the triton backend's variants side by side: act-order gathers, tile choices, fallbacks.

Every variant is first checked against the float64 reference (relative error < 2e-3 for fp16),
then timed like ``gptq bench``: one CUDA graph holds one call per weight copy (enough copies
to overflow the L2 cache twice, so weights come from memory), replayed, median per call.

    python benchmarks/triton_variants.py                  # H100: ~1-2 min, prints a table
    TRITON_INTERPRET=1 python benchmarks/triton_variants.py   # CPU: correctness only, tiny shape

Variants per (shape, M), 4-bit g128 sym fp16:
  plain            the backend's call (table/tuned config), no act-order
  plain <cfg>      the same weights with that config forced (M <= 16: 16x64 vs 16x128 tiles)
  act              act-order weights through the backend (x gathered by a Triton kernel first)
  act pre-sorted   the act-order weights on x gathered beforehand: the fused kernel alone
  gather           the gather alone (what the extra launch costs)
and once: 3-bit M=64 through the backend, the same with a stale tuned tile forced (must fall
back with one warning), and the tuner's ranking at 4096x4096 M=1. The variants that lost
(zero point after the MMA, the gather fused into the kernel, index_select) are recorded in
NOTES/perf-triton.md "Variants removed".
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import warnings

import torch

from gptq_backends.triton_kernels import dispatch, ops, target
from gptq_backends.triton_kernels.options import TritonOptions
from gptq_backends.triton_kernels.configs import KernelConfig
from gptq_core.bench.layers import random_layer
from gptq_core.bench.timing import time_calls

INTERPRET = target.interpreting()
# Shipped table or default rules only (a key missing from the table would otherwise be tuned
# at its first call: seconds of compiles); the tuner is timed on its own at the end.
OPTIONS = TritonOptions(autotune=False)
TOL = 2e-3

def backend(x, p):
    """The backend's own call path (eager: the layer's kept plan; choice, fallbacks, gather)."""
    return ops.qmatmul(x, p, None)

def prepare(w, device):
    return dispatch.prepare(w, device, OPTIONS)

def _copies(p, n: int):
    def clone(t):
        return None if t is None else t.clone()

    return [p] + [dataclasses.replace(p, qweight=clone(p.qweight), qhigh=clone(p.qhigh),
                                      scales=clone(p.scales), zeros=clone(p.zeros),
                                      perm=clone(p.perm), plans={}) for _ in range(n - 1)]

def _n_copies(p, device) -> int:
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(2, min(32, math.ceil(2 * l2 / p.nbytes())))

def _rel(y, ref) -> float:
    return float((y.double() - ref).norm() / ref.norm())

class Runner:
    def __init__(self, device):
        self.device = device
        self.rows: list[tuple[str, str, float, float]] = []
        self.failed = 0

    def variant(self, case: str, name: str, fn, copies, x, ref):
        """Check ``fn(x, p)`` on the first copy, then time it over all copies."""
        try:
            y = fn(x, copies[0])
            torch.cuda.synchronize() if self.device.type == "cuda" else None
            err = _rel(y, ref) if ref is not None else 0.0
            if not err < TOL:
                self.failed += 1
                self.rows.append((case, name, math.nan, err))
                print(f"{case:28s} {name:26s} WRONG rel err {err:.2e}", flush=True)
                return
            us = math.nan
            if not INTERPRET:
                calls = [lambda p=p: fn(x, p) for p in copies]
                us = time_calls(calls, self.device, target_seconds=0.03, max_reps=60).us
            self.rows.append((case, name, us, err))
            print(f"{case:28s} {name:26s} {us:9.2f} us  rel err {err:.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001
            self.failed += 1
            self.rows.append((case, name, math.nan, math.nan))
            print(f"{case:28s} {name:26s} FAILED {type(exc).__name__}: {str(exc)[:160]}",
                  flush=True)

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="KxN,... (default 4096x4096,8192x28672)")
    ap.add_argument("--m", default=None, help="M values (default 1,16,64)")
    ap.add_argument("--no-tune", action="store_true", help="skip the tuner ranking")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not INTERPRET:
        print("no GPU: run with TRITON_INTERPRET=1 for the correctness part")
        return 2
    default_shapes = "256x96" if INTERPRET else "4096x4096,8192x28672"
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or default_shapes).split(",")]
    ms = [int(m) for m in (args.m or ("1,3" if INTERPRET else "1,16,64")).split(",")]
    r = Runner(device)
    t0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(0)

    def launch_cfg(cfg):
        return lambda x, p: ops.launch(x, p, None, cfg)

    def shape_cases(K, N):
        plain_w = random_layer(K, N, 4, 128, sym=True, act_order=False, device=device, seed=1)
        act_w = random_layer(K, N, 4, 128, sym=True, act_order=True, device=device, seed=2)
        plain_p = prepare(plain_w, device)
        act_p = prepare(act_w, device)
        plain_c = _copies(plain_p, _n_copies(plain_p, device))
        act_c = _copies(act_p, _n_copies(act_p, device))
        sorted_c = [dataclasses.replace(p, perm=None, plans={}) for p in act_c]
        plain_d = plain_w.dequantize(torch.float64)
        act_d = act_w.dequantize(torch.float64)
        for M in ms:
            case = f"{K}x{N} M={M}"
            x = torch.randn(M, K, generator=gen).to(torch.float16).to(device)
            ref_plain = x.double() @ plain_d
            ref_act = x.double() @ act_d
            r.variant(case, "plain", backend, plain_c, x, ref_plain)
            if M <= 16:
                for cfg in (KernelConfig("fused", 16, 64, 0, 4, 3),
                            KernelConfig("fused", 16, 128, 0, 4, 3)):
                    r.variant(case, f"plain {cfg.label()}", launch_cfg(cfg), plain_c, x, ref_plain)
            r.variant(case, "act", backend, act_c, x, ref_act)
            xs = x.index_select(1, act_p.perm[:K])
            cfg, _ = ops.choose(x, plain_p)
            r.variant(case, f"act pre-sorted {cfg.label()}",
                      lambda _x, p, c=cfg: ops.launch(xs, p, None, c), sorted_c, x, ref_act)
            r.variant(case, "gather", lambda x_, p: ops.gather_columns(x_, p.perm),
                      act_c, x, xs.double())
        del plain_c, act_c, sorted_c, plain_d, act_d

    def extras():
        # 3-bit M=64: the stale tuned tile (m64 n128 sk0 w4 s3, OutOfResources on the H100) is now
        # ignored; forced, it must fall back with one warning instead of failing the call.
        K, N = shapes[0]
        M = 64 if not INTERPRET else 3
        w3 = random_layer(K, N, 3, 128, sym=True, act_order=False, device=device, seed=3)
        p3 = prepare(w3, device)
        c3 = _copies(p3, _n_copies(p3, device))
        x = torch.randn(M, K, generator=gen).to(torch.float16).to(device)
        ref3 = x.double() @ w3.dequantize(torch.float64)
        case = f"b3 {K}x{N} M={M}"
        r.variant(case, "backend (table/default)", backend, c3, x, ref3)
        stale = KernelConfig("fused", 64, 128, 0, 4, 3)
        real_choose = ops.choose
        ops.forget_choices()
        ops.choose = lambda x_, p_: (stale, True)
        fresh = [dataclasses.replace(p, plans={}) for p in c3]
        try:
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                r.variant(case, f"forced {stale.label()}", backend, fresh, x, ref3)
            fell = ops._replaced.get((p3.gpu, dispatch.shape_key(p3, x.dtype, M), stale))
            print(f"{case:28s} forced stale tile -> {fell.label() if fell else 'no fallback needed'}; "
                  f"{len(rec)} warning(s): {str(rec[0].message)[:200] if rec else ''}")
        finally:
            ops.choose = real_choose
            ops.forget_choices()

        if not args.no_tune and not INTERPRET:
            K, N = 4096, 4096
            w = random_layer(K, N, 4, 128, sym=True, act_order=False, device=device, seed=4)
            p = prepare(w, device)
            x = torch.randn(1, K, generator=gen).to(torch.float16).to(device)
            t = time.perf_counter()
            best, timings = ops.tune(x, p, None)
            print(f"tuner 4096x4096 M=1 ({time.perf_counter() - t:.1f} s): {best.label()}  {timings}")

    # The first shape, then the 3-bit fallback and the tuner, then the other shapes: a run cut
    # short by a time limit keeps the small, quick cases.
    shape_cases(*shapes[0])
    extras()
    for K, N in shapes[1:]:
        shape_cases(K, N)

    print(f"\n{len(r.rows)} variants, {r.failed} failed, {time.perf_counter() - t0:.0f} s"
          f"{' (interpreter: correctness only)' if INTERPRET else ''}")
    print("\n| case | variant | us | rel err |\n| --- | --- | --- | --- |")
    for case, name, us, err in r.rows:
        print(f"| {case} | {name} | {us:.2f} | {err:.1e} |")
    return 1 if r.failed else 0

if __name__ == "__main__":
    sys.exit(main())
