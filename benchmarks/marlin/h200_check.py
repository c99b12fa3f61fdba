"""H200 check of the marlin backend: build, correctness of every path, capture, speed, overhead.

One run, about 3-4 minutes including a fresh JIT build (not a unit test):

1. build: the extension compiled into a fresh folder, timed (the JIT build a user waits for);
2. sweep: every path the dispatch policy reaches (each kernel kind, dequantize + cuBLAS, the
   dense copy) on fresh random weights and inputs against float64: 4- and 8-bit, g128 / g-1 /
   g32-64, sym / asym, act-order, fp16 / bf16, bias, M = 1 .. 512 across every route bound;
3. capture: one call captured in a torch.cuda.CUDAGraph per route, replayed on fresh inputs
   against float64 and against the eager result (bit for bit), with no memory left behind;
   then QuantLinear under torch.compile(mode="reduce-overhead", fullgraph=True);
4. timing: 4096x4096 and 8192x28672 4-bit g128 at M = 1, 16, 64, 256, 4096 against fp16
   cuBLAS in the same run (rotated weight copies, CUDA-graph replays, CUDA events);
5. overhead: QuantLinear.forward at M=1 called eagerly, per call, minus its graph-replay time;
6. extras: argument errors of the op, determinism, the gather kernel against index_select,
   torch.library.opcheck.

    python benchmarks/marlin/h200_check.py [--parts build,sweep,...] [--out DIR]

Prints a short table; writes h200_check.json and h200_check.txt to --out (default $OUT or
./h200_check_out). Exit code 1 if anything failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from common import copies_for, gpu_packed, marlin_call, rotated, time_calls
from gptq_core.testing import check_close
from gptq_backend_marlin import build, ops, policy
from gptq_backend_marlin.options import MarlinOptions
from gptq_backend_marlin.prepare import prepare

DEV = torch.device("cuda")
MS = (1, 2, 7, 8, 9, 16, 33, 64, 128, 256, 257, 512)
failures: list[str] = []
report: dict = {}
lines: list[str] = []


def say(text: str = "") -> None:
    print(text, flush=True)
    lines.append(text)


def fail(text: str) -> None:
    failures.append(text)
    print("FAIL", text[:400], flush=True)


def reference(x: torch.Tensor, w64: torch.Tensor, bias: torch.Tensor | None):
    """float64 reference and tolerance bound (computed on the GPU, returned on the CPU)."""
    x64 = x.double()
    ref = x64 @ w64
    if bias is not None:
        ref = ref + bias.double()
    return ref.cpu(), (x64.abs() @ w64.abs() + ref.abs()).cpu()


def label_of(bits, K, N, gs, sym, act, dtype) -> str:
    return f"b{bits} {str(dtype)[6:]} {K}x{N} g{gs} {'sym' if sym else 'asym'}{' act' if act else ''}"


# ------------------------------------------------------------------------------------ build
def part_build(args) -> None:
    folder = Path(args.build_dir or tempfile.mkdtemp(prefix="marlin-build-"))
    started = time.perf_counter()
    build.load(folder=folder)
    seconds = time.perf_counter() - started
    report["build_s"] = seconds
    say(f"build: {seconds:.1f} s into {folder} (fresh: {args.build_dir is None})")


# ------------------------------------------------------------------------------------ sweep
def sweep_configs() -> list[tuple]:
    """(bits, K, N, group, sym, act, dtype, options): small layers over the whole grid (1024 x
    800: 128/256-row stages and a partial column tile; 704 x 288: K % 128 != 0, 64-row stages),
    large ones where the 256-row kernels and the bulk copies run."""
    grid = ((128, True, False), (-1, True, False), (128, False, False), (128, True, True),
            (32, False, True), (64, True, False))
    configs = []
    for bits in (4, 8):
        for K, N in ((1024, 800), (704, 288)):
            for dtype in (torch.float16, torch.bfloat16):
                for gs, sym, act in grid:
                    gs = 64 if gs == 128 and K % 128 else gs
                    configs.append((bits, K, N, gs, sym, act, dtype, None))
    configs += [
        (4, 4096, 4096, 128, True, False, torch.float16, None),
        (4, 4096, 4096, 128, False, True, torch.bfloat16, None),
        (4, 8192, 28672, 128, True, False, torch.float16, None),
        (4, 8192, 28672, -1, False, False, torch.bfloat16, None),
        (4, 4096, 14336, 128, True, True, torch.float16, None),
        (8, 4096, 4096, 128, True, False, torch.float16, None),
        (8, 8192, 28672, 128, True, False, torch.bfloat16, None),
        (4, 1024, 800, 128, False, True, torch.bfloat16, MarlinOptions(dense_cache_mb=64)),
        (4, 1024, 800, 128, True, False, torch.float16, MarlinOptions(dequant_threshold=40)),
    ]
    return configs


def part_sweep(args) -> None:
    paths: dict[str, dict] = {}
    calls = 0
    g = torch.Generator(device="cuda").manual_seed(args.seed)
    for i, (bits, K, N, gs, sym, act, dtype, options) in enumerate(sweep_configs()):
        label = label_of(bits, K, N, gs, sym, act, dtype) + (f" {options}" if options else "")
        try:
            packed = gpu_packed(bits, gs, sym, act, K, N, seed=args.seed * 1000 + i)
            p = prepare(packed, DEV, dtype, options)
            w64 = packed.dequantize(torch.float64).to(DEV)
            bias = (torch.randn(N, device=DEV, generator=g) * 0.5).half() if i % 2 else None
            for m in MS:
                x = torch.randn(m, K, device=DEV, generator=g).to(dtype)
                y = marlin_call(p, x, bias=bias)
                ref, bound = reference(x, w64, bias)
                res = check_close(y, ref, bound, dtype)
                path = p.policy.path_for(m)
                stat = paths.setdefault(path, {"calls": 0, "failures": 0, "worst": 0.0})
                stat["calls"] += 1
                stat["worst"] = max(stat["worst"], res.worst)
                calls += 1
                if not res.ok:
                    stat["failures"] += 1
                    fail(f"sweep {label} M={m} {path}: {res.message}")
            del p, w64
        except Exception:
            fail(f"sweep {label}: {traceback.format_exc(limit=4)}")
    missing = [path for path in policy.KINDS if path not in paths
               and not (path == "marlin:tma" and torch.cuda.get_device_capability(DEV) < (9, 0))]
    if missing:
        fail(f"sweep: no configuration reached {missing}")
    report["sweep"] = paths
    say(f"sweep: {calls} calls against float64, {sum(s['failures'] for s in paths.values())} failures")
    for path, s in sorted(paths.items()):
        say(f"  {path:<20} {s['calls']:>4} calls  worst error {s['worst']:.2f} x allowed")


# ------------------------------------------------------------------------------------ capture
def capture_ms(p) -> list[int]:
    """M=1 and both sides of every route bound (so each path is captured), at most 512."""
    ms = {1}
    for r in p.policy.routes[:-1]:
        ms.update(min(m, 512) for m in (r.upto_m, r.upto_m + 1) if m > 0)
    return sorted(ms)


def part_capture(args) -> None:
    configs = [(4, 4096, 4096, 128, True, False, torch.float16, True),
               (4, 8192, 28672, 128, True, False, torch.float16, False),
               (4, 1024, 800, 32, False, True, torch.bfloat16, True),
               (8, 4096, 4096, 128, False, False, torch.float16, True),
               (4, 704, 288, 64, True, True, torch.float16, False)]
    n = 0
    g = torch.Generator(device="cuda").manual_seed(args.seed + 1)
    for i, (bits, K, N, gs, sym, act, dtype, with_bias) in enumerate(configs):
        label = label_of(bits, K, N, gs, sym, act, dtype)
        packed = gpu_packed(bits, gs, sym, act, K, N, seed=4000 + i)
        p = prepare(packed, DEV, dtype)
        w64 = packed.dequantize(torch.float64).to(DEV)
        bias = (torch.randn(N, device=DEV, generator=g) * 0.5).half() if with_bias else None
        for m in capture_ms(p):
            try:
                x = torch.randn(m, K, device=DEV, generator=g).to(dtype)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up, as torch.cuda.graph asks
                    marlin_call(p, x, bias=bias)
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                graph = torch.cuda.CUDAGraph()
                # Captured on the warm-up's stream: cuBLAS keeps a workspace per stream, made on
                # first use, so a capture on a stream new to cuBLAS (the dequant+cublas path)
                # would allocate that workspace in the graph's pool and count it as a leak.
                with torch.cuda.graph(graph, stream=side):
                    y = marlin_call(p, x, bias=bias)
                for rep in range(3):
                    x.copy_(torch.randn(m, K, device=DEV, generator=g).to(dtype))
                    graph.replay()
                    torch.cuda.synchronize()
                    ref, bound = reference(x, w64, bias)
                    res = check_close(y, ref, bound, dtype)
                    if not res.ok:
                        fail(f"capture {label} M={m} {p.policy.path_for(m)} replay {rep}: {res.message}")
                    kernel = policy.KINDS[p.policy.path_for(m)] in range(policy.KINDS["dequant+cublas"])
                    if kernel and not torch.equal(y, marlin_call(p, x, bias=bias)):  # (cuBLAS may differ)
                        fail(f"capture {label} M={m}: replay differs from the eager call")
                    n += 1
                del graph, y
                torch.cuda.synchronize()
                left = torch.cuda.memory_allocated() - before
                if left > 0:
                    fail(f"capture {label} M={m}: {left} bytes still allocated after the graph is gone")
            except Exception:
                fail(f"capture {label} M={m}: {traceback.format_exc(limit=4)}")
        del p, w64
    report["capture_replays"] = n
    say(f"capture: {n} graph replays on fresh inputs (every route of 5 layers)")
    part_compile(args)


def part_compile(args) -> None:
    """QuantLinear under torch.compile(mode="reduce-overhead", fullgraph=True): cudagraph
    trees must capture it (no memory left in their pool) and match float64 on fresh inputs."""
    import torch._inductor.config as inductor_config
    from gptq_core import QuantLinear
    from gptq_core.testing import random_activations, reference_error

    started = time.perf_counter()
    packed = gpu_packed(4, 128, True, False, 4096, 4096, seed=77, bias=True)
    layer = QuantLinear.from_packed(packed, backend="marlin", act_dtype=torch.float16, mode="compile")
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
    try:
        with inductor_config.patch({"triton.cudagraph_or_error": True}):
            for m in (1, 16, 300):
                for i in range(3):
                    x = random_activations(m, 4096, dtype=torch.float16, seed=100 * m + i, device=DEV)
                    res = reference_error(compiled(x).clone(), x, packed)
                    if not res.ok:
                        fail(f"torch.compile reduce-overhead M={m} call {i}: {res.message}")
            # Per call at M=1: a replay plus guards. Far above the kernel's time would mean the
            # trees copy the prepared tensors (a workspace of ~34 MB) into static inputs per call.
            x1 = random_activations(1, 4096, dtype=torch.float16, seed=5, device=DEV)
            report["compiled_m1_us"] = eager_us(lambda: compiled(x1), calls=500)
            report["layer_graph_m1_us"] = time_calls([lambda: layer(x1)])
    except Exception:
        fail(f"torch.compile reduce-overhead: {traceback.format_exc(limit=6)}")
    finally:
        torch._dynamo.reset()
    say(f"compile: QuantLinear under torch.compile(mode='reduce-overhead', fullgraph=True), "
        f"M=1/16/300, {time.perf_counter() - started:.1f} s; M=1 per call {report.get('compiled_m1_us', 0):.1f} us "
        f"(the layer's graph replay: {report.get('layer_graph_m1_us', 0):.1f} us)")


# ------------------------------------------------------------------------------------ timing
def part_timing(args) -> None:
    rows = []
    say("timing (us per call, graph replays of rotated copies; ratio = fp16 / marlin):")
    say(f"  {'shape':<11} {'M':>5}  {'path':<18} {'marlin':>8} {'fp16':>8} {'ratio':>6}")
    for K, N in ((4096, 4096), (8192, 28672)):
        packed = gpu_packed(4, 128, True, False, K, N, seed=K + N)
        p = prepare(packed, DEV, torch.float16)
        marlin = rotated(p, copies_for(p.tiles.numel() * 4 + p.scales.numel() * 2))
        w = ops.dequantize(p.tiles, p.scales, p.zeros, 4, 128, K, N)  # [N, K], nn.Linear's layout
        fp16 = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
        for m in (1, 16, 64, 256, 4096):
            x = torch.randn(m, K, device=DEV, dtype=torch.float16)
            t_marlin = time_calls([lambda q=q: marlin_call(q, x) for q in marlin])
            t_fp16 = time_calls([lambda v=v: torch.nn.functional.linear(x, v) for v in fp16])
            row = {"K": K, "N": N, "M": m, "path": p.policy.path_for(m), "marlin_us": t_marlin,
                   "fp16_us": t_fp16, "ratio": t_fp16 / t_marlin}
            rows.append(row)
            say(f"  {K:>5}x{N:<5} {m:>5}  {row['path']:<18} {t_marlin:8.1f} {t_fp16:8.1f} {row['ratio']:6.2f}")
        del marlin, fp16, p, w
        torch.cuda.empty_cache()
    report["timing"] = rows


# ------------------------------------------------------------------------------------ overhead
def eager_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1e6 / calls


def part_overhead(args) -> None:
    from gptq_core import QuantLinear

    packed = gpu_packed(4, 128, True, False, 4096, 4096, seed=5)
    layer = QuantLinear.from_packed(packed, backend="marlin", act_dtype=torch.float16)
    linear = torch.nn.Linear(4096, 4096, bias=False, device=DEV, dtype=torch.float16)
    x = torch.randn(1, 4096, device=DEV, dtype=torch.float16)
    out = {}
    with torch.inference_mode():
        for name, fn in (("marlin QuantLinear", lambda: layer(x)), ("fp16 nn.Linear", lambda: linear(x)),
                         ("marlin gptq_qmatmul", lambda: marlin_call(layer.binding.prepared, x))):
            eager, kernel = eager_us(fn), time_calls([fn])
            out[name] = {"eager_us": eager, "graph_us": kernel, "overhead_us": eager - kernel}
    report["overhead"] = out
    say("overhead at M=1, 4096x4096 (us per call: eager wall time, graph replay, difference):")
    for name, o in out.items():
        say(f"  {name:<22} eager {o['eager_us']:6.1f}  graph {o['graph_us']:6.1f}  overhead {o['overhead_us']:6.1f}")


# ------------------------------------------------------------------------------------ extras
def part_extras(args) -> None:
    packed = gpu_packed(4, 64, False, True, 256, 96, seed=2)
    p = prepare(packed, DEV, torch.float16)
    x = torch.randn(3, 256, device=DEV).half()
    bias = torch.randn(96, device=DEV).half()
    kinds = policy.KINDS
    bad = {  # the op refuses a kind that cannot serve the call, naming why
        "a 4-bit kernel for 8-bit weights": (kinds["marlin:tma"], x, "serves 8-bit weights"),
        "the swapped mma above 8 rows": (kinds["marlin:wide-swap"], torch.randn(9, 256, device=DEV).half(), "at most 8 rows"),
        "256-row stages above 32 rows": (kinds["marlin:wide4"], torch.randn(40, 256, device=DEV).half(), "rows per slice"),
        "a kind that does not exist": (17, x, "does not exist"),
    }
    for what, (kind, xx, message) in bad.items():
        try:
            marlin_call(p, xx, kind=kind)
            torch.cuda.synchronize()
            fail(f"extras: {what}: no error")
        except RuntimeError as exc:
            if message not in str(exc):
                fail(f"extras: {what}: unclear error {str(exc)[:300]}")
    try:
        small = dataclasses.replace(p, counters=p.counters[:1])
        marlin_call(small, torch.randn(200, 256, device=DEV).half(), kind=kinds["marlin:wide"])
        fail("extras: a too-small workspace: no error")
    except RuntimeError as exc:
        if "workspace" not in str(exc):
            fail(f"extras: too-small workspace: unclear error {str(exc)[:300]}")
    try:
        marlin_call(p, x, bias=bias.float())
        fail("extras: a float32 bias: no error")
    except RuntimeError as exc:
        if "float16" not in str(exc):
            fail(f"extras: float32 bias: unclear error {str(exc)[:300]}")
    big = prepare(gpu_packed(4, 128, True, False, 4096, 4096, seed=7), DEV, torch.float16)
    for m in (1, 64, 200):
        xx = torch.randn(m, 4096, device=DEV).half()
        ys = [marlin_call(big, xx) for _ in range(3)]
        if not all(torch.equal(ys[0], y) for y in ys[1:]):
            fail(f"extras: determinism M={m}: identical calls differ")
    for dtype, idx, K, m in ((torch.float16, torch.int64, 4096, 7), (torch.bfloat16, torch.int32, 4097, 65)):
        xx = torch.randn(m, K, device=DEV).to(dtype)
        perm = torch.randperm(K, device=DEV).to(idx)
        if not torch.equal(ops.gather_cols(xx, perm), torch.index_select(xx, 1, perm)):
            fail(f"extras: gather_cols {dtype} {idx} K={K} M={m} differs from index_select")
    try:
        # The kernels write their partial sums into the slots (scratch, declared unmutated so
        # that functionalization never copies them: see ops.py), so test_schema is left out.
        kind = kinds[p.policy.path_for(3)]
        torch.library.opcheck(ops.gemm, (x, p.tiles, p.scales, p.zeros, p.perm, bias, p.slots, p.counters,
                                         4, 64, 96, kind),
                              test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
        torch.library.opcheck(ops.gemm, (x, p.tiles, p.scales, p.zeros, p.perm, bias, p.slots, p.counters,
                                         4, 64, 96, kinds["dequant+cublas"]))
        torch.library.opcheck(ops.dequantize, (p.tiles, p.scales, p.zeros, 4, 64, 256, 96))
        torch.library.opcheck(torch.ops.gptq_marlin.gather_cols.default, (x, p.perm))
    except Exception:
        fail(f"extras: opcheck: {traceback.format_exc(limit=4)}")
    say("extras: argument errors, workspace and bias checks, determinism, gather, opcheck done")


PARTS = {"build": part_build, "sweep": part_sweep, "capture": part_capture, "timing": part_timing,
         "overhead": part_overhead, "extras": part_extras}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--out", default=os.environ.get("OUT") or "h200_check_out")
    parser.add_argument("--build-dir", default=None, help="build here instead of a fresh folder")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(DEV)
    say(f"{props.name}, {props.multi_processor_count} SMs, cc {props.major}.{props.minor}, torch {torch.__version__}")
    started = time.perf_counter()
    names = args.parts.split(",")
    if "build" not in names:
        build.load(folder=args.build_dir)
    for name in names:
        t0 = time.perf_counter()
        PARTS[name](args)
        say(f"[{name}: {time.perf_counter() - t0:.1f} s]")
    say(f"{len(failures)} failures in {time.perf_counter() - started:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["failures"] = failures
    (out / "h200_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "h200_check.txt").write_text("\n".join(lines + [f"FAIL {f}" for f in failures]) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
