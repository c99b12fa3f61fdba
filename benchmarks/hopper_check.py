"""One H200 run of the Hopper wgmma GEMM (issue 17): build, check against float64, time.

    python benchmarks/hopper_check.py --out $OUT/hopper.txt
    python benchmarks/hopper_check.py --quick --out $OUT/hopper.txt   # < 3 min with the builds

1. build: the sm_90a extension (and, in a subprocess meanwhile, the marlin one for the
   comparison rows);
2. correctness: fresh random X and GPTQ weights per case, y against float64
   (``PackedWeight.dequantize(float64)``, X in float64), ||y - ref|| / ||ref|| < 2e-3 (fp16) /
   1e-2 (bf16), output poisoned with NaN first; every M in 16 .. 4096 on the four shapes
   (4-bit g128 sym fp16), then the variants (asym, g -1 / 32 / 64, bf16, act-order) on one;
3. speed, for cases that passed: CUDA-graph replay over rotated weight copies (beyond the
   L2), median of 5: this kernel, marlin (its dispatch policy), fp16 cuBLAS; a table last.

``--quick``: the correctness cases cut to one per (4096x14336, 8192x28672) x M in 16, 32, 64,
128, plus one asymmetric, one bf16, one act-order, one g32 and one split-K case (K = 4160 =
65 x 64, so its last split ends with a 64-k half stage of the 128-k pipeline), then the timing
table of those two shapes at the same four M.

Never stops on a kernel error: prints the reason and goes on. NOTES/hopper-wgmma.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "marlin"))

from common import copies_for, gpu_packed, time_calls  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (8192, 28672), (14336, 4096)]
CHECK_M = [16, 24, 32, 48, 64, 128, 256, 257, 1024, 4096]
SPEED_SHAPES = [(8192, 28672), (4096, 14336)]
SPEED_M = [16, 32, 64, 128, 256, 1024, 4096]
#: (name, group_size, sym, desc_act, dtype) on 4096x4096 at a few M
VARIANTS = [("asym", 128, False, False, torch.float16), ("g-1", -1, True, False, torch.float16),
            ("g32", 32, True, False, torch.float16), ("g64", 64, True, False, torch.float16),
            ("bf16", 128, True, False, torch.bfloat16), ("bf16-asym", 128, False, False, torch.bfloat16),
            ("act-order", 128, True, True, torch.float16)]
VARIANT_M = [16, 48, 257]
#: --quick: the shapes and M of the correctness cases and of the timing table
QUICK_SHAPES = [(4096, 14336), (8192, 28672)]
QUICK_M = [16, 32, 64, 128]
#: --quick variants on 4096x14336: (name, group_size, sym, desc_act, dtype, M); M picks the
#: token tile (16, 32, 64: the 128-k stages)
QUICK_VARIANTS = [("asym", 128, False, False, torch.float16, 16), ("bf16", 128, True, False, torch.bfloat16, 48),
                  ("act-order", 128, True, True, torch.float16, 32), ("g32", 32, True, False, torch.float16, 64)]
#: --quick split-K case: (K, N, M, splits); K % 128 == 64
QUICK_SPLIT = (4160, 4096, 16, 3)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


class Log:
    """Prints and keeps every line for the --out file."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.lines = path, []

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)
        if self.path is not None:
            self.path.write_text("\n".join(self.lines) + "\n")


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("nan")
    return float((y.double() - ref).norm() / ref.norm())


def make_layer(ops, K, N, group_size=128, sym=True, desc_act=False, dtype=torch.float16, seed=0):
    """(packed, prepared, float64 dense weight [K, N]) of a fresh random layer, or the error."""
    packed = gpu_packed(4, group_size, sym, desc_act, K, N, seed=seed)
    return packed, ops.prepare(packed, "cuda", dtype), packed.dequantize(torch.float64)


def check_case(log, ops, layer, m, dtype=torch.float16, seed=0, splits=None, name="g128") -> bool:
    """One correctness case on ``layer`` (make_layer's triple) with fresh X; True when it passed."""
    packed, prepared, w64 = layer
    K, N = packed.in_features, packed.out_features
    tag = f"{name:9s} {K}x{N} M={m}" + (f" splits={splits}" if splits else "")
    try:
        g = torch.Generator(device="cuda").manual_seed(seed + 1000 + m)
        x = torch.randn(m, K, generator=g, device="cuda").to(dtype)
        ref = x.double() @ w64
        y = torch.full((m, N), float("nan"), dtype=dtype, device="cuda")
        ops.hopper_gemm(x, prepared, out=y, splits=splits)
        torch.cuda.synchronize()
        err = rel_error(y, ref)
        ok = err == err and err < TOL[dtype]
        bm = ops.token_tile(m)
        plan = splits or ops.planned_splits(m, prepared, y.device)
        occ = ops.blocks_per_sm(y.device, bm, dtype, prepared.zeros is not None)
        log(f"{'ok  ' if ok else 'FAIL'} {tag}: rel err {err:.2e} (bm {bm}, splits {plan}, {occ} blocks/SM)")
        if not ok:
            bad = (~torch.isfinite(y)).sum().item()
            diff = (y.double() - ref).abs().nan_to_num(float("inf"))
            rows = diff.amax(1)
            cols = diff.amax(0)
            log(f"     non-finite {bad}/{y.numel()}; worst rows {rows.topk(min(4, m)).indices.tolist()}; "
                f"worst cols {cols.topk(4).indices.tolist()}; max abs err {diff.max().item():.3e} "
                f"vs ref max {ref.abs().max().item():.3e}")
        return ok
    except Exception as exc:  # noqa: BLE001 - report and continue
        log(f"FAIL {tag}: {type(exc).__name__}: {str(exc).strip()[:400]}")
        try:
            torch.cuda.synchronize()
        except Exception as again:  # noqa: BLE001 - a sticky error ends the GPU part
            log(f"     the CUDA context is broken ({again}); stopping the GPU checks")
            raise SystemExit(0) from None
        return False


def checked_layer(log, ops, K, N, name, **kw):
    """make_layer, or None with the reason logged."""
    try:
        return make_layer(ops, K, N, **kw)
    except Exception as exc:  # noqa: BLE001
        log(f"FAIL {name} {K}x{N}: preparing the layer: {type(exc).__name__}: {str(exc)[:300]}")
        return None


def speed(log, ops, K, N, ms, passed, want_marlin) -> dict:
    """{(M, impl): us} for one shape."""
    results = {}
    packed = gpu_packed(4, 128, True, False, K, N, seed=7)
    prep = ops.prepare(packed, "cuda", torch.float16)
    nbytes = prep.tiles.numel() * 4 + prep.scales.numel() * 2
    copies = copies_for(nbytes, total=240 << 20)
    hop = [prep] + [dataclasses.replace(prep, tiles=prep.tiles.clone(), scales=prep.scales.clone())
                    for _ in range(copies - 1)]
    dense = packed.dequantize(torch.float16)
    dense_copies = [dense] + [dense.clone() for _ in range(max(1, copies_for(dense.numel() * 2, total=240 << 20)) - 1)]
    marlin = None
    if want_marlin:
        try:
            from common import rotated  # noqa: PLC0415
            from gptq_backend_marlin import build as mbuild  # noqa: PLC0415
            from gptq_backend_marlin.prepare import prepare as mprepare  # noqa: PLC0415

            mbuild.load()
            marlin = rotated(mprepare(packed, torch.device("cuda"), torch.float16), copies)
        except Exception as exc:  # noqa: BLE001
            log(f"marlin unavailable for {K}x{N}: {type(exc).__name__}: {str(exc)[:300]}")
    for m in ms:
        x = torch.randn(m, K, device="cuda", dtype=torch.float16)
        impls = {"cublas": [lambda w=w: torch.matmul(x, w) for w in dense_copies]}
        if passed.get((K, N, m)):
            impls["hopper"] = [lambda p=p: ops.hopper_gemm(x, p) for p in hop]
        if marlin is not None:
            from gptq_backend_marlin import plugin  # noqa: PLC0415

            impls["marlin"] = [lambda p=p: plugin.gptq_qmatmul(x, p, None) for p in marlin]
        for name, calls in impls.items():
            try:
                results[(m, name)] = time_calls(calls)
            except Exception as exc:  # noqa: BLE001
                log(f"timing {name} {K}x{N} M={m} failed: {type(exc).__name__}: {str(exc)[:200]}")
                torch.cuda.synchronize()
        log(f"speed {K}x{N} M={m}: " + ", ".join(f"{k} {results[(m, k)]:.1f} us" for k in impls if (m, k) in results))
    return results


def floors(K, N, m) -> tuple[float, float]:
    """(bytes floor us, flops floor us) at 4.3 TB/s and 790 TFLOP/s (measured on an H200 here: KINDS.md)."""
    nbytes = K * N / 2 + K * N / 128 * 2 + m * K * 2 + m * N * 2
    return nbytes / 4.3e12 * 1e6, 2 * m * K * N / 790e12 * 1e6


def check_shapes(log, ops, shapes, ms) -> dict:
    """{(K, N, M): passed} of g128 layers of ``shapes`` at every M of ``ms``, against float64."""
    passed = {}
    for K, N in shapes:
        layer = checked_layer(log, ops, K, N, "g128", seed=K + N)
        for m in ms:
            passed[(K, N, m)] = layer is not None and check_case(log, ops, layer, m, seed=K + N + m)
        del layer
        torch.cuda.empty_cache()
    return passed


def quick_correctness(log, ops) -> tuple[dict, list]:
    """--quick's cases: ({(K, N, M): passed} of the main ones, [passed] of the variants)."""
    passed, others = check_shapes(log, ops, QUICK_SHAPES, QUICK_M), []
    K, N = QUICK_SHAPES[0]
    for name, gs, sym, act, dtype, m in QUICK_VARIANTS:
        layer = checked_layer(log, ops, K, N, name, group_size=gs, sym=sym, desc_act=act, dtype=dtype, seed=11)
        others.append(layer is not None and check_case(log, ops, layer, m, dtype=dtype, seed=11 + m, name=name))
        del layer
    K, N, m, splits = QUICK_SPLIT
    layer = checked_layer(log, ops, K, N, f"split{splits}", seed=5)
    others.append(layer is not None and check_case(log, ops, layer, m, seed=5 + m, splits=splits, name=f"split{splits}"))
    del layer
    torch.cuda.empty_cache()
    return passed, others


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the log here")
    parser.add_argument("--no-marlin", action="store_true", help="skip the marlin comparison rows")
    parser.add_argument("--quick", action="store_true",
                        help="13 correctness cases and the timing table of 4096x14336 / 8192x28672 at M 16-128")
    args = parser.parse_args()
    log = Log(args.out)
    if not torch.cuda.is_available():
        log("no CUDA GPU: nothing to check")
        return 0
    log(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    started = time.perf_counter()
    marlin_build = None
    if not args.no_marlin:
        marlin_build = subprocess.Popen([sys.executable, "-m", "gptq_backend_marlin.build"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    from gptq_backend_marlin.hopper import build, ops  # noqa: PLC0415

    try:
        folder = build.load(verbose=False)
        log(f"built the Hopper extension in {time.perf_counter() - started:.1f} s: {folder}")
    except Exception as exc:  # noqa: BLE001
        log(f"BUILD FAILED: {exc}")
        if marlin_build is not None:
            marlin_build.kill()
        return 0

    if args.quick:
        passed, others = quick_correctness(log, ops)
        log(f"correctness done at {time.perf_counter() - started:.1f} s: "
            f"{sum(passed.values())}/{len(passed)} main cases and {sum(others)}/{len(others)} variants passed")
        speed_shapes, speed_m = QUICK_SHAPES[::-1], QUICK_M
    else:
        passed = check_shapes(log, ops, SHAPES, CHECK_M)
        K, N = 4096, 4096
        layer = checked_layer(log, ops, K, N, "split4", seed=5)
        for m in (16, 256):
            if layer is not None:
                check_case(log, ops, layer, m, seed=5 + m, splits=4, name="split4")
        for name, gs, sym, act, dtype in VARIANTS:
            layer = checked_layer(log, ops, K, N, name, group_size=gs, sym=sym, desc_act=act, dtype=dtype, seed=11)
            for m in VARIANT_M:
                if layer is not None:
                    check_case(log, ops, layer, m, dtype=dtype, seed=11 + m, name=name)
        del layer
        log(f"correctness done at {time.perf_counter() - started:.1f} s: "
            f"{sum(passed.values())}/{len(passed)} main cases passed")
        speed_shapes, speed_m = SPEED_SHAPES, SPEED_M

    want_marlin = False
    if marlin_build is not None:
        out, _ = marlin_build.communicate(timeout=300)
        want_marlin = marlin_build.returncode == 0
        log(f"marlin build: {out.strip().splitlines()[-1] if out.strip() else marlin_build.returncode}")
    table = {}
    for K, N in speed_shapes:
        try:
            table[(K, N)] = speed(log, ops, K, N, speed_m, passed, want_marlin)
        except Exception as exc:  # noqa: BLE001
            log(f"speed {K}x{N} failed: {type(exc).__name__}: {str(exc)[:300]}")
            torch.cuda.synchronize()
        torch.cuda.empty_cache()
    log(f"timing done at {time.perf_counter() - started:.1f} s")

    log("")
    log("| shape | M | hopper us | marlin us | cublas us | hopper/cublas | marlin/cublas | bytes floor us | flops floor us |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (K, N), res in table.items():
        for m in speed_m:
            cub = res.get((m, "cublas"))
            row = [f"{K}x{N}", str(m)]
            for impl in ("hopper", "marlin", "cublas"):
                v = res.get((m, impl))
                row.append(f"{v:.1f}" if v else "-")
            for impl in ("hopper", "marlin"):
                v = res.get((m, impl))
                row.append(f"{cub / v:.2f}x" if v and cub else "-")
            bf, ff = floors(K, N, m)
            row += [f"{bf:.1f}", f"{ff:.1f}"]
            log("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
