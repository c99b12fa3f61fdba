"""GPU check of the triton backend: correctness of every call path, capture, compile, eager cost
and kernel time against fp16 cuBLAS (docs/DESIGN.md §9, §11). About two minutes on an H200.

    python benchmarks/triton_h200_check.py [--out DIR] [--autotune] [--seconds 150]

1. float64 sweep: layers of several shapes, bit widths, zero points, act-order and dtypes,
   each M called three times with fresh inputs: Triton's own launch (the first call), the kept
   plan's direct relaunch (the second) and the custom op (the traced path); every result
   against the float64 reference, and whether the direct relaunch is active.
2. CUDA-graph capture: ``QuantLinear`` calls captured in a ``torch.cuda.CUDAGraph`` and replayed
   with fresh inputs (split-K decode, act-order, a dot tile; the torch backend too).
3. ``torch.compile(mode="reduce-overhead", fullgraph=True)`` of ``QuantLinear``: fresh inputs,
   against float64 (cudagraph trees fail if a call allocates memory that outlives it).
4. Eager cost at M=1 (4096x4096 and 8192x28672): host microseconds per ``QuantLinear.forward``
   (Python + launch, no sync), eager wall time per call, graph-replay time per call, and their
   difference; fp16 ``F.linear`` and the custom-op path for scale.
5. Kernel time, 4-bit g128 fp16, M = 1, 16, 64, 256, 4096 on 4096x4096 and 8192x28672: graph
   replays over rotated weight copies (L2-cold), triton against fp16 cuBLAS.
Sections run in order of importance; what the time budget cuts is said. A short table is
printed; details (JSON and the printed text) go to ``--out`` (default ``$OUT``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from gptq_core import QuantLinear
from gptq_core.bench.layers import random_layer
from gptq_core.bench.timing import time_calls
from gptq_backends.triton_kernels import ops
from gptq_backends.triton_kernels.options import TritonOptions

DEV = torch.device("cuda", 0)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
LINES: list[str] = []
REPORT: dict = {"sweep": [], "capture": [], "compile": [], "eager": [], "kernel": [], "notes": []}


def say(text: str) -> None:
    print(text, flush=True)
    LINES.append(text)


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def make(K: int, N: int, bits: int, group: int, *, sym=True, act=False, bias=False, seed=0):
    w = random_layer(K, N, bits, group, sym=sym, act_order=act, device=DEV, seed=seed)
    if bias:
        w = w.replace(bias=torch.randn(N, device=DEV).half() * 0.5)
    return w, w.dequantize(torch.float64)


def reference(x, w, dq):
    ref = x.double() @ dq
    return ref + w.bias.double() if w.bias is not None else ref


def bound(w, dtype, options, backend="triton", mode="inference") -> QuantLinear:
    layer = QuantLinear.from_packed(w, backend=backend, act_dtype=None, mode=mode)
    layer.bind(dtype, options={"triton": options} if backend == "triton" else {})
    return layer


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


# ------------------------------------------------------------------------ 1. float64 sweep
SWEEP = [  # K, N, bits, group, sym, act, bias, dtype, Ms
    (4096, 4096, 4, 128, True, False, False, torch.float16, (1, 2, 16, 33, 64, 256, 1024)),
    (8192, 28672, 4, 128, True, False, False, torch.float16, (1, 16, 64, 256, 4096)),
    (4096, 11008, 4, 128, False, True, True, torch.bfloat16, (1, 7, 64)),
    (4096, 4096, 3, 128, True, False, False, torch.float16, (1, 16, 64, 256)),
    (4096, 4096, 2, 128, True, False, False, torch.float16, (1, 16, 64)),
    (4096, 4096, 8, 128, False, False, True, torch.float16, (1, 16)),
    (1000, 200, 4, 64, False, True, True, torch.float16, (1, 3)),
]


def sweep_case(case, options, budget) -> int:
    K, N, bits, group, sym, act, bias, dtype, ms = case
    w, dq = make(K, N, bits, group, sym=sym, act=act, bias=bias, seed=K + N + bits)
    layer = bound(w, dtype, options)
    p = layer.binding.prepared
    name = f"{K}x{N} b{bits} g{group} {'sym' if sym else 'asym'}{' act' if act else ''}" \
           f"{' bias' if bias else ''} {str(dtype)[6:]}"
    say(f"  {name}: {p.policy.describe()}")
    failed = 0
    for m in ms:
        if budget.left() < 0:
            REPORT["notes"].append(f"sweep {name} M={m}: skipped (time budget)")
            continue
        row = {"case": name, "M": m}
        try:
            errs = []
            for how in ("first", "direct", "op"):
                x = torch.randn(m, K, device=DEV).to(dtype)
                if how == "op":
                    o = p.options
                    y = torch.ops.gptq_triton.qmatmul(
                        x, p.qweight, p.qhigh, p.scales, p.zeros, p.perm, layer.bias, p.bits,
                        p.group_size, p.sub, p.in_features, p.out_features, p.k_pad,
                        o.autotune, o.shipped_configs, str(o.cache_dir or ""))
                else:
                    y = layer(x)
                errs.append(rel(y, reference(x, w, dq)))
            plan = p.plans.get((m, dtype, bias))
            launcher = None if plan is None else (plan.qmm or plan.dequant)
            row.update(err_first=errs[0], err_direct=errs[1], err_op=errs[2],
                       path=p.policy.path_for(m), kept_plan=plan is not None,
                       direct=bool(launcher is not None and launcher.direct is not None))
            ok = max(errs) < TOL[dtype]
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            ok = False
        row["ok"] = ok
        failed += not ok
        REPORT["sweep"].append(row)
    return failed


# ------------------------------------------------------------------------ 2. capture
def capture_case(label, layer, w, dq, m, dtype) -> bool:
    static_x = torch.randn(m, w.in_features, device=DEV).to(dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(static_x)  # first call: compile, plan
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    errs = []
    for _ in range(3):
        static_x.copy_(torch.randn(m, w.in_features, device=DEV).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        errs.append(rel(static_y, reference(static_x, w, dq)))
    ok = max(errs) < TOL[dtype]
    REPORT["capture"].append({"case": label, "M": m, "errors": errs, "ok": ok})
    return ok


# ------------------------------------------------------------------------ 3. compile
def compile_case(label, layer, w, dq, ms, dtype) -> bool:
    torch._dynamo.reset()
    fn = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    errs = []
    for m in ms:
        for _ in range(4):  # cudagraph trees: warm-up, record, then replays
            x = torch.randn(m, w.in_features, device=DEV).to(dtype)
            y = fn(x).clone()
            errs.append(rel(y, reference(x, w, dq)))
    torch._dynamo.reset()
    ok = max(errs) < TOL[dtype]
    REPORT["compile"].append({"case": label, "M": list(ms), "errors": errs, "ok": ok})
    return ok


# ------------------------------------------------------------------------ 4. eager cost
def host_and_wall_us(fn, n=300, rounds=5) -> tuple[float, float]:
    """(host us per call: the calls returning, no sync; wall us per call: until the GPU is done),
    medians over rounds of ``n`` calls (few enough that the launch queue never fills)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) / n * 1e6)
        wall.append((t2 - t0) / n * 1e6)
    return statistics.median(host), statistics.median(wall)


def replay_us(fn, calls=20, reps=50) -> float:
    """Per-call time of ``calls`` calls captured in one CUDA graph (same weights: L2-warm, as
    the eager loop is)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / calls)
    return statistics.median(times)


def eager_case(K, N, options) -> dict:
    w, _ = make(K, N, 4, 128, seed=7)
    layer = bound(w, torch.float16, options)
    p = layer.binding.prepared
    x = torch.randn(1, K, device=DEV).half()
    o = p.options
    op_args = (p.qweight, p.qhigh, p.scales, p.zeros, p.perm, None, p.bits, p.group_size, p.sub,
               p.in_features, p.out_features, p.k_pad, o.autotune, o.shipped_configs,
               str(o.cache_dir or ""))
    weight16 = torch.randn(N, K, device=DEV).half()
    row = {"shape": f"{K}x{N}"}
    row["host_us"], row["wall_us"] = host_and_wall_us(lambda: layer(x))
    row["replay_us"] = replay_us(lambda: layer(x))
    row["overhead_us"] = row["wall_us"] - row["replay_us"]
    row["op_host_us"], row["op_wall_us"] = host_and_wall_us(
        lambda: torch.ops.gptq_triton.qmatmul(x, *op_args))
    row["fp16_host_us"], row["fp16_wall_us"] = host_and_wall_us(lambda: F.linear(x, weight16))
    row["fp16_replay_us"] = replay_us(lambda: F.linear(x, weight16))
    plan = p.plans.get((1, torch.float16, False))
    row["direct"] = bool(plan is not None and plan.qmm is not None and plan.qmm.direct)
    REPORT["eager"].append(row)
    return row


# ------------------------------------------------------------------------ 5. kernel time
def kernel_case(K, N, ms, options, budget) -> int:
    w, _ = make(K, N, 4, 128, seed=11)
    layer = bound(w, torch.float16, options)
    p = layer.binding.prepared
    copies = ops._weight_copies(p)
    l2 = torch.cuda.get_device_properties(DEV).L2_cache_size
    n16 = max(2, min(16, math.ceil(2 * l2 / (K * N * 2))))
    w16 = [torch.randn(N, K, device=DEV).half() for _ in range(n16)]
    for m in ms:
        if budget.left() < 0:
            REPORT["notes"].append(f"kernel {K}x{N} M={m}: skipped (time budget)")
            continue
        x = torch.randn(m, K, device=DEV).half()
        t = time_calls([lambda q=q: ops.qmatmul(x, q, None) for q in copies], DEV,
                       target_seconds=0.03, max_reps=40)
        f = time_calls([lambda v=v: F.linear(x, v) for v in w16], DEV,
                       target_seconds=0.03, max_reps=40)
        REPORT["kernel"].append({"shape": f"{K}x{N}", "M": m, "triton_us": t.us, "fp16_us": f.us,
                                 "speedup": f.us / t.us, "path": p.policy.path_for(m),
                                 "method": t.method, "copies": len(copies)})
    del copies, w16
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the details")
    ap.add_argument("--autotune", action="store_true",
                    help="autotune buckets without a tuned table at their first call (slower)")
    ap.add_argument("--seconds", type=float, default=150.0, help="time budget")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    budget = Budget(args.seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = TritonOptions(autotune=args.autotune, shipped_configs=True,
                            cache_dir=Path(tempfile.mkdtemp(prefix="gptq-tuned-")))
    props = torch.cuda.get_device_properties(DEV)
    say(f"{props.name}, torch {torch.__version__}, options {options}")
    failures = 0
    t0 = time.perf_counter()

    def section(name, fn):
        nonlocal failures
        try:
            failures += fn()
        except Exception:  # noqa: BLE001
            failures += 1
            REPORT["notes"].append(f"{name}: {traceback.format_exc()[-1500:]}")
            say(f"{name}: FAILED (see notes)")
        say(f"[{name} done at {time.perf_counter() - t0:.0f} s]")

    say("1. float64 sweep (first two cases; the rest at the end)")
    section("sweep-main", lambda: sum(sweep_case(c, options, budget) for c in SWEEP[:2]))

    def captures():
        bad = 0
        for label, K, N, act, m in (("4096x4096 split-K", 4096, 4096, False, 1),
                                     ("4096x4096 act-order", 4096, 4096, True, 4),
                                     ("4096x4096 dot tile", 4096, 4096, False, 200)):
            w, dq = make(K, N, 4, 128, act=act, bias=True, seed=3)
            bad += not capture_case(f"triton {label}", bound(w, torch.float16, options), w, dq,
                                    m, torch.float16)
        w, dq = make(1024, 512, 4, 128, act=True, bias=True, seed=4)
        bad += not capture_case("torch 1024x512 act-order", bound(w, torch.float16, options,
                                                                  "torch"), w, dq, 3,
                                torch.float16)
        return bad

    say("2. CUDA-graph capture")
    section("capture", captures)

    def compiles():
        w, dq = make(4096, 4096, 4, 128, bias=True, seed=5)
        bad = not compile_case("triton 4096x4096", bound(w, torch.float16, options,
                                                          mode="compile"), w, dq, (1, 16),
                               torch.float16)
        w, dq = make(1024, 512, 4, 128, act=True, seed=6)
        bad += not compile_case("torch 1024x512 act", bound(w, torch.float16, options, "torch",
                                                            mode="compile"), w, dq, (2,),
                                torch.float16)
        return int(bad)

    say("3. torch.compile(mode='reduce-overhead', fullgraph=True)")
    section("compile", compiles)
    def eager() -> int:
        for K, N in ((4096, 4096), (8192, 28672)):
            eager_case(K, N, options)
        return 0

    say("4. eager cost at M=1")
    section("eager", eager)
    say("5. kernel time against fp16 cuBLAS")
    section("kernel", lambda: sum(kernel_case(K, N, (1, 16, 64, 256, 4096), options, budget)
                                  for K, N in ((4096, 4096), (8192, 28672))))
    say("1b. float64 sweep (other widths, act-order, bf16, odd shapes)")
    section("sweep-more", lambda: sum(sweep_case(c, options, budget) for c in SWEEP[2:]))

    # ------------------------------------------------------------------ summary
    bad = [r for r in REPORT["sweep"] if not r["ok"]]
    direct = sum(r.get("direct", False) for r in REPORT["sweep"])
    worst = max((max(r.get("err_first", 0), r.get("err_direct", 0), r.get("err_op", 0))
                 for r in REPORT["sweep"]), default=float("nan"))
    say(f"\nsweep: {len(REPORT['sweep'])} (case, M), {len(bad)} wrong or failed, worst rel err "
        f"{worst:.1e}, direct relaunch active in {direct}")
    for r in bad:
        say(f"  WRONG {r['case']} M={r['M']}: {r.get('error') or r}")
    for r in REPORT["capture"] + REPORT["compile"]:
        say(f"{'capture' if r in REPORT['capture'] else 'compile'} {r['case']} M={r['M']}: "
            f"{'ok' if r['ok'] else 'WRONG'} (worst rel err {max(r['errors']):.1e})")
    say("\n| M=1 eager, us | host/call | wall/call | graph replay | wall - replay | custom op "
        "host | fp16 host | fp16 replay | direct |")
    say("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in REPORT["eager"]:
        say(f"| {r['shape']} | {r['host_us']:.1f} | {r['wall_us']:.1f} | {r['replay_us']:.1f} | "
            f"{r['overhead_us']:.1f} | {r['op_host_us']:.1f} | {r['fp16_host_us']:.1f} | "
            f"{r['fp16_replay_us']:.1f} | {r['direct']} |")
    say("\n| shape | M | triton us | fp16 us | speed-up | path |")
    say("| --- | --- | --- | --- | --- | --- |")
    for r in REPORT["kernel"]:
        say(f"| {r['shape']} | {r['M']} | {r['triton_us']:.1f} | {r['fp16_us']:.1f} | "
            f"{r['speedup']:.2f} | {r['path']} |")
    for note in REPORT["notes"]:
        say(f"note: {note}")
    say(f"\n{'FAILED' if failures else 'ok'}: {failures} failure(s), "
        f"{time.perf_counter() - t0:.0f} s")
    (out / "triton_h200_check.json").write_text(json.dumps(REPORT, indent=1, default=str))
    (out / "triton_h200_check.txt").write_text("\n".join(LINES) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
