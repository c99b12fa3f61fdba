"""Time the triton backend's variants side by side: act-order gathers, tile choices, fallbacks.

Every variant is first checked against the float64 reference (relative error < 2e-3 for fp16),
then timed like ``gptq bench``: one CUDA graph holds one call per weight copy (enough copies
to overflow the L2 cache twice, so weights come from memory), replayed, median per call.

    python benchmarks/triton_variants.py                  # H100: ~1-2 min, prints a table
    TRITON_INTERPRET=1 python benchmarks/triton_variants.py   # CPU: correctness only, tiny shape
    TRITON_INTERPRET=1 python benchmarks/triton_variants.py --postzero-error  # CPU: error table

Variants per (shape, M), 4-bit g128 sym fp16 unless named:
  plain            the backend's call (table/tuned config), no act-order, with the
                   environment's dequant (default: the inline-PTX single-LOP3 one, fp16 CUDA)
  plain <cfg>      the same weights with that config forced (M <= 16: 16x64 vs 16x128 tiles)
  plain asm off    the backend's call with the plain two-LOP3 dequant (GPTQ_TRITON_ASM=0)
  plain postzero   the backend's call with the zero point after the MMA (GPTQ_TRITON_POSTZERO=1:
                   the launcher's per-group sums of x), also with the 16x64 / 16x128 tiles
                   forced at M <= 16; "plain postzero dot": the zero tile's second MMA
  asym plain|postzero   4-bit g128 asym weights (M <= 16), without / with the zero point after
                   the MMA (where SASS says it pays most: 5.41 -> 4.19 instructions per weight)
  act torch|triton|fused   act-order with x gathered by index_select / a Triton kernel (the
                   default) / inside the fused kernel (GPTQ_TRITON_GATHER)
  act pre-sorted   the act-order weights on x gathered beforehand: the fused kernel alone
  gather torch|triton      the gather alone (what one extra launch costs)
and once: 3-bit M=64 through the backend (was OutOfResources), the same with the stale tuned
tile forced (must fall back with one warning), and the tuner's ranking at 4096x4096 M=1.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import warnings

import torch

from gptq_backends.triton_kernels import layout, ops
from gptq_backends.triton_kernels.configs import KernelConfig
from gptq_core.bench.layers import random_layer
from gptq_core.bench.timing import time_calls

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Shipped table or default rules only (a key missing from the table would otherwise be tuned
# on the spot: seconds of compiles); the tuner is timed on its own at the end.
os.environ.setdefault("GPTQ_TRITON_AUTOTUNE", "0")
TOL = 2e-3

def backend(x, p):
    """The backend's own call path (choice, fallbacks, act-order gather per ops.GATHER)."""
    return ops.run(x, p, None)

def _copies(p, n: int):
    def clone(t):
        return None if t is None else t.clone()

    return [p] + [dataclasses.replace(p, qweight=clone(p.qweight), qhigh=clone(p.qhigh),
                                      scales=clone(p.scales), zeros=clone(p.zeros),
                                      perm=clone(p.perm)) for _ in range(n - 1)]

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

    def variant(self, case: str, name: str, fn, copies, x, ref, gather: str = "triton"):
        """Check ``fn(x, p)`` on the first copy, then time it over all copies."""
        old = ops.GATHER
        ops.GATHER = gather
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
        finally:
            ops.GATHER = old

def postzero_error(ks=(4096, 8192), n=128, seeds=3) -> int:
    """Relative error against float64, today's zero point (subtracted per pair before the MMA)
    against GPTQ_TRITON_POSTZERO (after it): the kernel under the interpreter (fp16 output), and
    a numpy model of the fp32 group sums before the output rounding (products exact, one fp32
    rounding per 16-channel MMA step, as the tensor cores' k16 steps). Also the conformance
    check's worst error / allowed (gptq_core.testing, <= 1 passes)."""
    import numpy as np  # noqa: PLC0415

    from gptq_core.testing import TOLERANCES, check_close  # noqa: PLC0415

    def model(x16, q, z, s, gs, post):
        # fp32 accumulation in 16-channel steps, per group; the scale after the group (fp32)
        xf = x16.astype(np.float32)
        K = xf.shape[1]
        acc = np.zeros((xf.shape[0], q.shape[1]), np.float32)
        g = K if gs == -1 else gs
        for g0 in range(0, K, g):
            gi = g0 // g
            zz = (1024.0 + z[gi]).astype(np.float32)
            acc_g = np.zeros_like(acc)
            xs = np.zeros((xf.shape[0], 1), np.float32)
            for k0 in range(g0, g0 + g, 16):
                xk = xf[:, k0:k0 + 16]
                if post:
                    wk = (1024.0 + q[k0:k0 + 16]).astype(np.float32)
                    xs = (xs + xk.astype(np.float64).sum(1, keepdims=True)).astype(np.float32)
                else:
                    wk = (q[k0:k0 + 16] - z[gi]).astype(np.float32)
                acc_g = (acc_g + (xk.astype(np.float64) @ wk.astype(np.float64))).astype(np.float32)
            if post:
                acc_g = (acc_g - zz[None, :] * xs).astype(np.float32)
            acc = (acc + acc_g * s[gi].astype(np.float32)).astype(np.float32)
        return acc.astype(np.float64)

    print("| K | group | zeros | M | model fp32 rel err today / postzero | kernel fp16 rel err "
          "today / postzero | conformance worst/allowed today / postzero |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    worst_ratio = 0.0
    for K in ks:
        for gs in (32, 128, -1):
            for sym in (True, False):
                for M in (1, 16):
                    stats = np.zeros((seeds, 6))
                    for seed in range(seeds):
                        w = random_layer(K, n, 4, gs, sym=sym, act_order=False,
                                         device=torch.device("cpu"), seed=10 + seed)
                        G = 1 if gs == -1 else K // gs
                        q = rng.integers(0, 16, (K, n)).astype(np.float64)
                        z = (np.full((G, n), 8.0) if sym
                             else rng.integers(0, 16, (G, n)).astype(np.float64))
                        s = (rng.random((G, n)) * 0.02 + 0.005).astype(np.float16).astype(np.float64)
                        x16 = rng.standard_normal((M, K)).astype(np.float16)
                        ref = np.zeros((M, n))
                        g = K if gs == -1 else gs
                        for gi in range(G):
                            ref += x16[:, gi * g:(gi + 1) * g].astype(np.float64) @ (
                                (q[gi * g:(gi + 1) * g] - z[gi]) * s[gi])
                        for i, post in enumerate((False, True)):
                            y = model(x16, q, z, s, gs, post)
                            stats[seed, i] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
                        # the kernel itself (interpreter), on a random_layer of the same kind
                        p = layout.prepare(w, torch.device("cpu"))
                        xt = torch.from_numpy(x16)
                        ref_t = xt.double() @ w.dequantize(torch.float64)
                        bound = xt.double().abs() @ w.dequantize(torch.float64).abs() + ref_t.abs()
                        cfg = KernelConfig("fused", 16, 64, 0, 4, 3)
                        old = ops.POSTZERO
                        for i, mode in enumerate((0, 3)):
                            ops.POSTZERO = mode
                            try:
                                y = ops.launch(xt, p, None, cfg)
                            finally:
                                ops.POSTZERO = old
                            stats[seed, 2 + i] = _rel(y, ref_t)
                            stats[seed, 4 + i] = check_close(y, ref_t, bound, torch.float16).worst
                    mx = stats.max(0)
                    worst_ratio = max(worst_ratio, mx[5])
                    print(f"| {K} | {gs} | {'sym' if sym else 'asym'} | {M} | {mx[0]:.2e} / "
                          f"{mx[1]:.2e} | {mx[2]:.2e} / {mx[3]:.2e} | {mx[4]:.3f} / {mx[5]:.3f} |",
                          flush=True)
    print(f"(max over {seeds} seeds; N={n}; fp16 rtol {TOLERANCES[torch.float16][0]}; "
          f"worst postzero ratio {worst_ratio:.3f})")
    return 0 if worst_ratio <= 1 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="KxN,... (default 4096x4096,8192x28672)")
    ap.add_argument("--m", default=None, help="M values (default 1,16,64)")
    ap.add_argument("--no-tune", action="store_true", help="skip the tuner ranking")
    ap.add_argument("--postzero-error", action="store_true",
                    help="only the error table of GPTQ_TRITON_POSTZERO (CPU, interpreter)")
    args = ap.parse_args(argv)
    if args.postzero_error:
        if not INTERPRET:
            print("--postzero-error runs the kernel under TRITON_INTERPRET=1")
            return 2
        return postzero_error()
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
        plain_p = layout.prepare(plain_w, device)
        act_p = layout.prepare(act_w, device)
        plain_c = _copies(plain_p, _n_copies(plain_p, device))
        act_c = _copies(act_p, _n_copies(act_p, device))
        sorted_c = [dataclasses.replace(p, perm=None) for p in act_c]
        plain_d = plain_w.dequantize(torch.float64)
        act_d = act_w.dequantize(torch.float64)
        asym_w = random_layer(K, N, 4, 128, sym=False, act_order=False, device=device, seed=5)
        asym_p = layout.prepare(asym_w, device)
        asym_c = _copies(asym_p, _n_copies(asym_p, device))
        asym_d = asym_w.dequantize(torch.float64)
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
            asm = ops.ASM_LOP3
            ops.ASM_LOP3 = not asm
            try:
                r.variant(case, "plain asm off" if asm else "plain asm-lop3", backend, plain_c,
                          x, ref_plain)
            finally:
                ops.ASM_LOP3 = asm
            pz = ops.POSTZERO
            try:
                for mode, label in ((3, "plain postzero"), (1, "plain postzero dot")):
                    ops.POSTZERO = mode
                    ops.forget_choices()
                    r.variant(case, label, backend, plain_c, x, ref_plain)
                    if M <= 16 and mode == 3:
                        for cfg in (KernelConfig("fused", 16, 64, 0, 4, 3),
                                    KernelConfig("fused", 16, 128, 0, 4, 3)):
                            r.variant(case, f"{label} {cfg.label()}", launch_cfg(cfg), plain_c,
                                      x, ref_plain)
                if M <= 16:
                    ref_asym = x.double() @ asym_d
                    for mode, label in ((0, "asym plain"), (3, "asym postzero")):
                        ops.POSTZERO = mode
                        ops.forget_choices()
                        r.variant(case, label, backend, asym_c, x, ref_asym)
            finally:
                ops.POSTZERO = pz
                ops.forget_choices()
            for how in ("torch", "triton", "fused"):
                r.variant(case, f"act {how}", backend, act_c, x, ref_act, gather=how)
            xs = x.index_select(1, act_p.perm[:K])
            cfg = ops.choose(x, plain_p)
            r.variant(case, f"act pre-sorted {cfg.label()}",
                      lambda _x, p, c=cfg: ops.launch(xs, p, None, c), sorted_c, x, ref_act)
            for how in ("torch", "triton"):
                r.variant(case, f"gather {how}",
                          lambda x_, p, h=how: ops.gather_columns(x_, p.perm, h),
                          act_c, x, xs.double())
        del plain_c, act_c, sorted_c, plain_d, act_d, asym_c, asym_d

    def extras():
        # 3-bit M=64: the stale tuned tile (m64 n128 sk0 w4 s3, OutOfResources on the H100) is now
        # ignored; forced, it must fall back with one warning instead of failing the call.
        K, N = shapes[0]
        M = 64 if not INTERPRET else 3
        w3 = random_layer(K, N, 3, 128, sym=True, act_order=False, device=device, seed=3)
        p3 = layout.prepare(w3, device)
        c3 = _copies(p3, _n_copies(p3, device))
        x = torch.randn(M, K, generator=gen).to(torch.float16).to(device)
        ref3 = x.double() @ w3.dequantize(torch.float64)
        case = f"b3 {K}x{N} M={M}"
        r.variant(case, "backend (table/default)", backend, c3, x, ref3)
        stale = KernelConfig("fused", 64, 128, 0, 4, 3)
        real_choose = ops.choose
        ops.forget_choices()
        ops.choose = lambda x_, p_: ops._chosen.get(ops._cache_key(x_, p_), stale)
        try:
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                r.variant(case, f"forced {stale.label()}", backend, c3, x, ref3)
            fell = ops._chosen.get(ops._cache_key(x, p3))
            print(f"{case:28s} forced stale tile -> {fell.label() if fell else 'no fallback needed'}; "
                  f"{len(rec)} warning(s): {str(rec[0].message)[:200] if rec else ''}")
        finally:
            ops.choose = real_choose
            ops.forget_choices()

        if not args.no_tune and not INTERPRET:
            K, N = 4096, 4096
            w = random_layer(K, N, 4, 128, sym=True, act_order=False, device=device, seed=4)
            p = layout.prepare(w, device)
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
