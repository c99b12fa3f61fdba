"""GPU correctness sweep of the marlin backend against the float64 reference (not a unit test).

Every accepted combination (bits x dtype x group size x sym x act-order) on small awkward
shapes over many M, the kernel path and the dequantize + cuBLAS path, large layers, bias,
determinism, the QuantLinear route, opcheck and torch.compile. Fresh random data per case;
freed memory is poisoned with NaN before each call so an unwritten output element shows.

    python benchmarks/marlin/h100_check.py [--quick]

Prints one line per failure and a summary; exit code 1 if anything failed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import traceback

import torch

from gptq_core.testing import check_close, random_packed
from gptq_backend_marlin import build, ops
from gptq_backend_marlin.prepare import prepare

from common import gpu_packed

DEV = torch.device("cuda")
failures: list[str] = []
counts = {"cases": 0, "calls": 0}


def poison(numel: int, dtype: torch.dtype) -> None:
    """Leave a freed block of NaNs of this size in the caching allocator."""
    t = torch.empty(numel, dtype=dtype, device=DEV)
    t.fill_(float("nan"))
    del t


def reference(x: torch.Tensor, w64: torch.Tensor, bias: torch.Tensor | None):
    """float64 reference and tolerance bound, computed on the GPU, returned on the CPU."""
    x64 = x.double()
    ref = x64 @ w64
    if bias is not None:
        ref = ref + bias.double()
    bound = x64.abs() @ w64.abs() + ref.abs()
    return ref.cpu(), bound.cpu()


def ab_check(env: str, modes: tuple[str, str], label: str, call, out_numel: int, ref, bound,
             dtype, identical: bool = True) -> None:
    """``call()`` once with ``env`` set to each of two modes: the first result must pass the
    float64 check, and both must be bit-identical (A/B variants compute the same sums); with
    ``identical=False`` (variants that split the k sum differently) both must pass the check."""
    ys = []
    try:
        for mode in modes:
            os.environ[env] = mode
            poison(out_numel, dtype)
            ys.append(call())
            torch.cuda.synchronize()
            counts["calls"] += 1
    finally:
        os.environ.pop(env, None)
    for y, mode in zip(ys, modes if not identical else modes[:1]):
        res = check_close(y, ref, bound, dtype)
        if not res.ok:
            failures.append(f"{label} {env}={mode or 'default'}: {res.message}")
    if identical and not torch.equal(ys[0], ys[1]):
        failures.append(f"{label}: {env}={modes[0] or 'default'} and ={modes[1]} differ")


def run_case(packed, dtype, ms, thresholds, label, bias=None, seed=0, blocks_per_sm=(0,)):
    counts["cases"] += 1
    p = prepare(packed, DEV, dtype)
    w64 = packed.dequantize(torch.float64).to(DEV)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for m in ms:
        x = torch.randn(m, packed.in_features, generator=g).to(dtype=dtype, device=DEV)
        ref, bound = reference(x, w64, bias)
        for thr in thresholds:
            for bps in blocks_per_sm:
                poison(m * packed.out_features, dtype)
                y = ops.gemm(x, p.tiles, p.scales, p.zeros, p.perm, bias, p.bits, p.group_size,
                             p.size_n, thr, bps)
                torch.cuda.synchronize()
                counts["calls"] += 1
                res = check_close(y, ref, bound, dtype)
                if not res.ok:
                    failures.append(f"{label} M={m} threshold={thr} bps={bps}: {res.message}")


def grid(quick: bool, bits_list) -> None:
    shapes = [(192, 96), (1024, 800)] if not quick else [(192, 96)]
    ms = (1, 2, 7, 16, 17, 33, 64, 65, 200) if not quick else (1, 16, 65)
    combos = itertools.product(bits_list, (torch.float16, torch.bfloat16), (-1, 32, 64, 128, 256),
                               (True, False), (False, True), shapes)
    for i, (bits, dtype, gs, sym, act, (K, N)) in enumerate(combos):
        label = f"b{bits} {str(dtype)[6:]} g{gs} {'sym' if sym else 'asym'}{' act' if act else ''} {K}x{N}"
        try:
            packed = random_packed(bits, gs, sym, act, K, N, seed=1000 + i)
            bias = (torch.randn(N) * 0.5).half().to(DEV) if i % 3 == 0 else None
            run_case(packed, dtype, ms, (-1,), label, bias=bias, seed=i)
            # Many rows: the dequantize + cuBLAS path and the multi-slice kernel.
            run_case(packed, dtype, (300,), (256, -1), label, bias=bias, seed=i + 7)
        except Exception:
            failures.append(f"{label}: {traceback.format_exc(limit=3)}")


def tiny8() -> None:
    """8-bit on one small layer over every M path (run under compute-sanitizer if it crashes)."""
    for dtype in (torch.float16, torch.bfloat16):
        packed = random_packed(8, -1, True, False, 192, 32, seed=2)
        run_case(packed, dtype, (1, 17, 33, 64, 100), (-1,), f"tiny b8 {dtype}", seed=1)


def large8() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        label = f"large b8 {str(dtype)[6:]} g128 8192x28672"
        try:
            packed = gpu_packed(8, 128, dtype == torch.float16, False, 8192, 28672, seed=8)
            run_case(packed, dtype, (1, 16, 32, 33, 64, 128), (-1,), label, seed=3)
            run_case(packed, dtype, (300,), (256,), label, seed=4)
        except Exception:
            failures.append(f"{label}: {traceback.format_exc(limit=3)}")


def large() -> None:
    for K, N, act in ((4096, 14336, False), (8192, 28672, False), (4096, 4096, True), (11008, 4096, True)):
        label = f"large b4 fp16 g128 {K}x{N}{' act' if act else ''}"
        try:
            packed = gpu_packed(4, 128, True, act, K, N, seed=K + N)
            run_case(packed, torch.float16, (1, 16, 64, 256), (-1,), label, seed=K, blocks_per_sm=(0, 1))
            run_case(packed, torch.float16, (4096,), (256,), label, seed=N)
        except Exception:
            failures.append(f"{label}: {traceback.format_exc(limit=3)}")
    label = "large b4 bf16 asym g128 8192x28672"
    try:
        packed = gpu_packed(4, 128, False, False, 8192, 28672, seed=4)
        run_case(packed, torch.bfloat16, (1, 64, 128), (-1,), label, seed=3)
    except Exception:
        failures.append(f"{label}: {traceback.format_exc(limit=3)}")


def determinism() -> None:
    packed = gpu_packed(4, 128, True, False, 4096, 4096, seed=7)
    p = prepare(packed, DEV, torch.float16)
    for m in (1, 64, 200):
        x = torch.randn(m, 4096, device=DEV).half()
        ys = [ops.gemm(x, p.tiles, p.scales, p.zeros, p.perm, None, 4, 128, 4096, -1, 0) for _ in range(3)]
        if not all(torch.equal(ys[0], y) for y in ys[1:]):
            failures.append(f"determinism: M={m} results differ between identical calls")


def finalizer_ab() -> None:
    """v3's unrolled stream-K finalizer against v2's loop (GPTQ_MARLIN_FINALIZER=loop): both
    add the same slots in the same order, so results must be bit-identical; both must also
    pass the float64 check. Shapes with shared tiles (many contributors), partial column tiles,
    bias, 4- and 8-bit, every row-block count and 1 or 2 blocks per SM."""

    configs = ((4, torch.float16, True, 4096, 4096, True), (4, torch.bfloat16, False, 1024, 800, True),
               (4, torch.float16, True, 8192, 28672, False), (8, torch.float16, True, 4096, 4096, True),
               (8, torch.bfloat16, False, 1024, 800, False))
    for bits, dtype, sym, K, N, with_bias in configs:
        label = f"finalizer b{bits} {str(dtype)[6:]} {K}x{N}"
        try:
            packed = gpu_packed(bits, 128, sym, False, K, N, seed=K + bits)
            p = prepare(packed, DEV, dtype)
            w64 = packed.dequantize(torch.float64).to(DEV)
            bias = (torch.randn(N, device=DEV) * 0.5).half() if with_bias else None
            for m in (1, 2, 7, 16, 17, 33, 48, 64, 65):
                x = torch.randn(m, K, device=DEV).to(dtype)
                ref, bound = reference(x, w64, bias)
                for bps in (0, 1):
                    ab_check("GPTQ_MARLIN_FINALIZER", ("", "loop"), f"{label} M={m} bps={bps}",
                             lambda: ops.gemm(x, p.tiles, p.scales, p.zeros, p.perm, bias, bits,
                                              128, N, -1, bps),
                             m * N, ref, bound, dtype)
            counts["cases"] += 1
        except Exception:
            failures.append(f"{label}: {traceback.format_exc(limit=3)}")


def pipeline_ab(env: str, modes: tuple[str, str], bits_list, tag: str, identical: bool = True) -> None:
    """One kernel pipeline against another, chosen by ``env``: see ab_check (``identical``:
    the two split the k sum the same way, so the results must be bit-identical). bits x fp16/bf16 x group -1/32/64/128 x sym/asym x act-order on 1024x800
    (partial column tiles) at M 1..300 (1-4 row blocks, several slices), 1 and 2 blocks per SM,
    and the large shapes with shared tiles."""
    configs = [(bits, dtype, gs, sym, act, 1024, 800) for bits in bits_list
               for dtype in (torch.float16, torch.bfloat16) for gs in (-1, 32, 64, 128)
               for sym in (True, False) for act in (False, True)]
    configs += [(4, torch.float16, 128, True, False, 4096, 4096), (4, torch.bfloat16, 32, False, True, 4096, 4096),
                (4, torch.float16, 128, True, False, 8192, 28672), (bits_list[-1], torch.float16, 128, True, False, 4096, 14336)]
    for i, (bits, dtype, gs, sym, act, K, N) in enumerate(configs):
        label = f"{tag} b{bits} {str(dtype)[6:]} g{gs} {'sym' if sym else 'asym'}{' act' if act else ''} {K}x{N}"
        try:
            packed = (gpu_packed(bits, gs, sym, act, K, N, seed=700 + i) if K * N >= 4096 * 4096
                      else random_packed(bits, gs, sym, act, K, N, seed=700 + i))
            p = prepare(packed, DEV, dtype)
            w64 = packed.dequantize(torch.float64).to(DEV)
            bias = (torch.randn(N, device=DEV) * 0.5).half() if i % 3 == 0 else None
            for m in (1, 2, 7, 16, 17, 33, 48, 64, 65, 200, 300):
                if K * N >= 4096 * 4096 and m in (2, 7, 17, 48, 200):
                    continue
                x = torch.randn(m, K, device=DEV).to(dtype)
                ref, bound = reference(x, w64, bias)
                for bps in ((0, 1) if m in (1, 16, 33) else (0,)):
                    ab_check(env, modes, f"{label} M={m} bps={bps}",
                             lambda: ops.gemm(x, p.tiles, p.scales, p.zeros, p.perm, bias, bits,
                                              gs, N, -1, bps),
                             m * N, ref, bound, dtype, identical)
            counts["cases"] += 1
        except Exception:
            failures.append(f"{label}: {traceback.format_exc(limit=3)}")


def tma_ab() -> None:
    """The bulk-copy (TMA) pipeline (GPTQ_MARLIN_TMA=1; the default for 8-bit in one slice on
    compute capability >= 9.0) against cp.async (=0), 4- and 8-bit (see pipeline_ab)."""
    if torch.cuda.get_device_capability(DEV)[0] < 9:
        print("tma_ab: compute capability < 9.0, the TMA pipeline does not run here", flush=True)
        return
    pipeline_ab("GPTQ_MARLIN_TMA", ("1", "0"), (4, 8), "tma")


def wide_ab() -> None:
    """The 128-row-stage kernels (GPTQ_MARLIN_WIDE=2; 4-bit, K % 128 == 0) against the 64-row
    ones (=0), 4-bit (see pipeline_ab); K=1024 and the large shapes take them at every M. The stream-K split
    counts 128-row stages instead of 64-row tiles, so partial sums meet in other places and the
    last bits may differ (on the H100 they do): both results must pass the float64 check."""
    pipeline_ab("GPTQ_MARLIN_WIDE", ("2", "0"), (4,), "wide", identical=False)


def wide4_ab() -> None:
    """The 256-row kernels (GPTQ_MARLIN_WIDE=4: 4-bit, 1-2 row blocks, K % 256 == 0; the
    default on large layers) against the 128-row ones (=2); both against float64."""
    pipeline_ab("GPTQ_MARLIN_WIDE", ("4", "2"), (4,), "wide4", identical=False)


def swap_ab() -> None:
    """The swapped mma (weights as the A operand: 4-bit, M <= 8, on the 128- and 256-row
    kernels; the default) against the plain one (GPTQ_MARLIN_SWAP=0); both against float64
    (see pipeline_ab; M 1, 2 and 7 take the swapped kernels)."""
    pipeline_ab("GPTQ_MARLIN_SWAP", ("", "0"), (4,), "swap", identical=False)


def scalefold() -> None:
    """The opt-in scale-fold kernels (GPTQ_MARLIN_SCALEFOLD=1: 4-bit, group size >= 64 or -1;
    the scale multiplies the fp32 sums once per group). Each call runs with the flag and
    without: the fold result must pass the float64 check on its own (it is not bit-identical to
    the default: the rounding moves from the fp16 product to fp32); where the flag must be
    ignored (group 32, 8-bit) both must be bit-identical; and the fold must have changed some
    result (else the flag never reached the kernel). fp16/bf16 x sym/asym x groups x act-order
    x M 1..65 (1-4 row blocks, several slices at 65), bias, shared tiles on the larger shapes,
    1 or 2 blocks per SM."""

    differed = {"n": 0}

    def one(label, call, out_numel, ref, bound, dtype, expect_same):
        ys = []
        try:
            for mode in ("1", ""):
                os.environ["GPTQ_MARLIN_SCALEFOLD"] = mode
                poison(out_numel, dtype)
                ys.append(call())
                torch.cuda.synchronize()
                counts["calls"] += 1
        finally:
            os.environ.pop("GPTQ_MARLIN_SCALEFOLD", None)
        res = check_close(ys[0], ref, bound, dtype)
        if not res.ok:
            failures.append(f"{label} scalefold: {res.message}")
        same = torch.equal(ys[0], ys[1])
        if expect_same and not same:
            failures.append(f"{label}: GPTQ_MARLIN_SCALEFOLD=1 must be ignored here but changed the result")
        differed["n"] += 0 if same else 1

    configs = [(4, dtype, gs, sym, act, 1024, 800) for dtype in (torch.float16, torch.bfloat16)
               for gs in (-1, 32, 64, 128, 256) for sym in (True, False) for act in (False, True)]
    configs += [(4, torch.float16, 128, True, False, 4096, 4096), (4, torch.bfloat16, 128, False, True, 4096, 4096),
                (4, torch.float16, 128, True, False, 8192, 28672), (4, torch.float16, -1, False, False, 4096, 14336),
                (8, torch.float16, 128, True, False, 1024, 800)]
    for i, (bits, dtype, gs, sym, act, K, N) in enumerate(configs):
        label = f"scalefold b{bits} {str(dtype)[6:]} g{gs} {'sym' if sym else 'asym'}{' act' if act else ''} {K}x{N}"
        try:
            if K * N >= 4096 * 4096:
                packed = gpu_packed(bits, gs, sym, act, K, N, seed=500 + i)
            else:
                packed = random_packed(bits, gs, sym, act, K, N, seed=500 + i)
            p = prepare(packed, DEV, dtype)
            w64 = packed.dequantize(torch.float64).to(DEV)
            bias = (torch.randn(N, device=DEV) * 0.5).half() if i % 3 == 0 else None
            expect_same = bits != 4 or gs == 32
            for m in (1, 2, 7, 16, 17, 33, 48, 64, 65):
                x = torch.randn(m, K, device=DEV).to(dtype)
                ref, bound = reference(x, w64, bias)
                for bps in ((0, 1) if m in (1, 16, 33) else (0,)):
                    one(f"{label} M={m} bps={bps}",
                        lambda: ops.gemm(x, p.tiles, p.scales, p.zeros, p.perm, bias, p.bits,
                                         p.group_size, N, -1, bps),
                        m * N, ref, bound, dtype, expect_same)
            counts["cases"] += 1
        except Exception:
            failures.append(f"{label}: {traceback.format_exc(limit=3)}")
    if differed["n"] == 0:
        failures.append("scalefold: no result changed with GPTQ_MARLIN_SCALEFOLD=1 (flag not read?)")
    print(f"scalefold: {differed['n']} calls differed from the default (expected: the 4-bit g>=64 ones)")


def cxx_check_in_subprocess() -> None:
    """The raw op's own C++ argument check must raise, not kill the process (it once died with
    SIGSEGV: NOTES/perf-marlin.md "The SIGSEGV on a bad argument").

    Run in a child so a crash is reported as one failure and the sweep goes on.
    """
    import subprocess

    code = (
        "import torch\n"
        "from gptq_backend_marlin import build\n"
        "build.load()\n"
        "x = torch.randn(4, 64, device='cuda')\n"
        "try:\n"
        "    torch.ops.gptq_marlin.gather_cols(x, torch.arange(64, device='cuda'))\n"
        "    print('no error')\n"
        "except RuntimeError as exc:\n"
        "    print('raised:', str(exc).splitlines()[0])\n"
    )
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True,
                          text=True, timeout=120)
    counts["calls"] += 1
    print(f"raw C++ check: exit {proc.returncode}: {proc.stdout.strip()[:200]}", flush=True)
    if proc.returncode != 0 or "raised: " not in proc.stdout:
        failures.append(f"gather_cols C++ argument check: exit {proc.returncode}, "
                        f"{(proc.stdout + proc.stderr).strip()[-600:]}")


def gather() -> None:
    """The act-order gather kernel (ops.gather_cols) against torch.index_select, bit for bit:
    fp16/bf16, int32/int64 perm, M 1/7/16/65, K multiple of 8 or not, a non-contiguous x;
    argument errors; then gemm on act-order layers with the kernel gather and with
    GPTQ_MARLIN_GATHER=torch (must be bit-identical and pass the float64 check)."""

    g = torch.Generator(device="cpu").manual_seed(11)
    for dtype, idx, K, m in itertools.product((torch.float16, torch.bfloat16), (torch.int32, torch.int64),
                                              (8, 100, 192, 4096, 4097, 28672), (1, 7, 16, 65)):
        label = f"gather {str(dtype)[6:]} {str(idx)[6:]} K={K} M={m}"
        try:
            x = torch.randn(m, K, generator=g).to(dtype=dtype, device=DEV)
            perm = torch.randperm(K, generator=g).to(dtype=idx, device=DEV)
            poison(m * K, dtype)
            y = ops.gather_cols(x, perm)
            counts["calls"] += 1
            if y.shape != x.shape or y.dtype != dtype or not y.is_contiguous():
                failures.append(f"{label}: got {tuple(y.shape)} {y.dtype}")
            elif not torch.equal(y, torch.index_select(x, 1, perm)):
                failures.append(f"{label}: differs from index_select")
        except Exception:
            failures.append(f"{label}: {traceback.format_exc(limit=3)}")
    counts["cases"] += 1
    try:  # non-contiguous x (a column slice), special values, empty M, repeated indices
        base = torch.randn(9, 300, device=DEV).half()
        base[2, 5], base[3, 6], base[4, 7] = float("nan"), float("inf"), -0.0
        x = base[:, 10:210]
        perm = torch.randint(0, 200, (200,), device=DEV)
        if not torch.equal(ops.gather_cols(x, perm).view(torch.int16),
                           torch.index_select(x, 1, perm).view(torch.int16)):
            failures.append("gather non-contiguous / special values / repeated indices: differs")
        if ops.gather_cols(x[:0], perm).shape != (0, 200):
            failures.append("gather empty M: wrong shape")
    except Exception:
        failures.append(f"gather special: {traceback.format_exc(limit=3)}")
    x = torch.randn(4, 64, device=DEV).half()
    bad = {"float32 x": (x.float(), torch.arange(64, device=DEV)),
           "short perm": (x, torch.arange(63, device=DEV)),
           "float perm": (x, torch.arange(64, device=DEV).float()),
           "cpu perm": (x, torch.arange(64))}
    for what, (a, p_) in bad.items():  # refused in Python, before the CUDA op
        try:
            ops.gather_cols(a, p_)
            failures.append(f"gather {what}: no error")
        except ValueError as exc:
            if "gather_cols" not in str(exc):
                failures.append(f"gather {what}: unclear error {str(exc)[:200]}")
    cxx_check_in_subprocess()
    for K, N, dtype in ((1024, 800, torch.bfloat16), (4096, 4096, torch.float16), (8192, 1024, torch.float16)):
        label = f"gather gemm {str(dtype)[6:]} act {K}x{N}"
        try:
            packed = gpu_packed(4, 128, dtype == torch.float16, True, K, N, seed=K + 3)
            p = prepare(packed, DEV, dtype)
            w64 = packed.dequantize(torch.float64).to(DEV)
            for m in (1, 7, 16, 65, 300):
                x = torch.randn(m, K, device=DEV).to(dtype)
                ref, bound = reference(x, w64, None)
                for thr in ((-1, 256) if m == 300 else (-1,)):
                    ab_check("GPTQ_MARLIN_GATHER", ("", "torch"), f"{label} M={m} thr={thr}",
                             lambda: ops.gemm(x, p.tiles, p.scales, p.zeros, p.perm, None, 4, 128,
                                              N, thr, 0),
                             m * N, ref, bound, dtype)
            counts["cases"] += 1
        except Exception:
            failures.append(f"{label}: {traceback.format_exc(limit=3)}")


def special_values() -> None:
    packed = random_packed(4, 64, True, False, 256, 256, seed=3, device=DEV)
    p = prepare(packed, DEV, torch.float16)
    x = torch.randn(4, 256, device=DEV).half()
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    y = ops.gemm(x, p.tiles, p.scales, p.zeros, p.perm, None, 4, 64, 256, -1, 0)
    if not (torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()):
        failures.append("NaN/Inf: a NaN row must stay NaN and other rows finite")
    e = ops.gemm(x[:0], p.tiles, p.scales, p.zeros, p.perm, None, 4, 64, 256, -1, 0)
    if e.shape != (0, 256):
        failures.append(f"empty M: got shape {tuple(e.shape)}")


def through_quantlinear() -> None:
    from gptq_core import QuantLinear
    from gptq_core.testing import random_activations, reference_error

    packed = random_packed(4, 128, False, True, 512, 256, seed=9, bias=True, device=DEV)
    for dtype in (torch.float16, torch.bfloat16):
        layer = QuantLinear.from_packed(packed, backend="marlin", act_dtype=dtype)
        if layer.binding.backend.name != "marlin":
            failures.append(f"QuantLinear chose {layer.binding.backend.name}")
        x = random_activations(2, 3, 512, dtype=dtype, seed=4, device=DEV)
        res = reference_error(layer(x), x, packed)
        if not res.ok:
            failures.append(f"QuantLinear {dtype}: {res.message}")
    try:
        layer = QuantLinear.from_packed(packed, backend="marlin", act_dtype=torch.float16, mode="compile")
        f = torch.compile(layer, fullgraph=True)
        x = random_activations(5, 512, dtype=torch.float16, seed=5, device=DEV)
        res = reference_error(f(x), x, packed)
        if not res.ok:
            failures.append(f"torch.compile: {res.message}")
    except Exception:
        failures.append(f"torch.compile: {traceback.format_exc(limit=4)}")


def dense_cache() -> None:
    """The dense-cache policy through the plugin: F.linear on the cached weight above the
    threshold, the kernel below it; act-order and bias included."""

    from gptq_backend_marlin import plugin, prepare as prep_mod
    from gptq_core.testing import random_activations, reference_error

    os.environ["GPTQ_MARLIN_DENSE_CACHE_MB"] = "64"
    try:
        for dtype in (torch.float16, torch.bfloat16):
            packed = random_packed(4, 64, False, True, 512, 320, seed=21, bias=True, device=DEV)
            p = prep_mod.prepare(packed, DEV, dtype)
            if p.dense is None:
                failures.append("dense cache: no dense weight made within the budget")
                continue
            for m in (3, 64, 65, 300):
                x = random_activations(m, 512, dtype=dtype, seed=m, device=DEV)
                res = reference_error(plugin.gptq_qmatmul(x, p, packed.bias), x, packed)
                if not res.ok:
                    failures.append(f"dense cache {dtype} M={m}: {res.message}")
    finally:
        del os.environ["GPTQ_MARLIN_DENSE_CACHE_MB"]


def opcheck() -> None:
    packed = random_packed(4, 64, False, True, 256, 96, seed=2, device=DEV)
    p = prepare(packed, DEV, torch.float16)
    x = torch.randn(3, 256, device=DEV).half()
    bias = torch.randn(96, device=DEV).half()
    try:
        torch.library.opcheck(ops.gemm, (x, p.tiles, p.scales, p.zeros, p.perm, bias, 4, 64, 96, -1, 0))
        torch.library.opcheck(ops.dequantize, (p.tiles, p.scales, p.zeros, 4, 64, 256, 96))
        # ops.gather_cols is the checking Python wrapper; opcheck wants the op itself.
        gather = torch.ops.gptq_marlin.gather_cols.default
        torch.library.opcheck(gather, (x, p.perm))
        torch.library.opcheck(gather, (x[:, :100].contiguous().bfloat16(), p.perm[:100].int().remainder(100)))
    except Exception:
        failures.append(f"opcheck: {traceback.format_exc(limit=4)}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bits", default="4", help="bit widths of the grid, e.g. 4 or 4,8")
    parser.add_argument("--parts", default="grid,large,finalizer_ab,gather,determinism,special_values,through_quantlinear,dense_cache,opcheck")
    args = parser.parse_args()
    bits_list = tuple(int(b) for b in args.bits.split(","))
    started = time.perf_counter()
    build.load()
    print(f"extension loaded after {time.perf_counter() - started:.1f} s", flush=True)
    for name in args.parts.split(","):
        part = globals()[name]
        t0 = time.perf_counter()
        if part is grid:
            part(args.quick, bits_list)
        else:
            part()
        print(f"{part.__name__}: {time.perf_counter() - t0:.1f} s, failures so far {len(failures)}", flush=True)
    for f in failures[:60]:
        print("FAIL", f)
    print(f"checked {counts['cases']} weights, {counts['calls']} calls: {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
