"""What limits the marlin kernel at small M? Two measurements on the GPU (not a unit test).

1. L2-resident against streamed weights: a layer that fits the 50 MB L2 timed on one copy
   (hot: the weights come from L2) and rotated over copies that do not fit (cold: from DRAM),
   with fp16 cuBLAS alongside. If the kernel is barely faster hot than cold, DRAM bandwidth is
   not its limit; the SM side (instruction issue, a pipe, latency) is.
2. Nsight Compute, when `ncu` is installed and may read the counters: one launch of the M=1
   and the M=16 kernel on 8192x28672, with the speed-of-light, warp-state, scheduler,
   instruction and compute-pipe sections and the stall reasons per issued instruction (the
   kernel the dispatch policy picks, or --kind PATH, e.g. marlin:narrow; --tag names the
   reports). With --hopper the layer gets its sm_90a wgmma copy and every row goes to it
   (M = 16 and 32: the BM16 and BM32 main loops, NOTES/hopper-wgmma.md).

    python benchmarks/marlin/limits.py [--out DIR] [--hopper --ncu-only]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import torch

from common import copies_for, gpu_packed, marlin_call, rotated, time_calls
from gptq_backend_marlin import build, policy
from gptq_backend_marlin.options import MarlinOptions
from gptq_backend_marlin.prepare import prepare


KIND: int | None = None  # --kind: the kernel to time instead of the policy's
HOPPER = False  # --hopper: profile the layer's sm_90a copy instead
#: the options --hopper prepares with: a Hopper copy serving every row up to its bound
HOPPER_OPTIONS = MarlinOptions(hopper_cache_mb=1e9, hopper_threshold=0)


def gemm_calls(ps, x):
    return [lambda p=p: marlin_call(p, x, kind=KIND) for p in ps]


def hot_cold() -> None:
    for K, N in ((8192, 8192), (4096, 14336)):
        p = prepare(gpu_packed(4, 128, True, False, K, N, seed=1), torch.device("cuda"), torch.float16)
        nbytes = p.tiles.numel() * 4 + p.scales.numel() * 2
        cold = rotated(p, copies_for(nbytes))
        w = torch.randn(K, N, device="cuda", dtype=torch.float16)
        ws = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
        for m in (1, 16):
            x = torch.randn(m, K, device="cuda", dtype=torch.float16)
            t_hot = time_calls(gemm_calls([p], x))
            t_cold = time_calls(gemm_calls(cold, x))
            f_hot = time_calls([lambda: torch.matmul(x, w)])
            f_cold = time_calls([lambda w=w: torch.matmul(x, w) for w in ws])
            print(f"{K}x{N} M={m}: marlin hot {t_hot:.1f} us ({nbytes / t_hot / 1e3:.0f} GB/s) "
                  f"cold {t_cold:.1f} us ({nbytes / t_cold / 1e3:.0f} GB/s) hot/cold {t_hot / t_cold:.2f}; "
                  f"fp16 hot {f_hot:.1f} cold {f_cold:.1f} us ({K * N * 2 / f_cold / 1e3:.0f} GB/s)",
                  flush=True)
        del cold, ws
        torch.cuda.empty_cache()


def one(K: int, N: int, m: int) -> None:
    """A few eager calls (ncu profiles one of them)."""
    p = prepare(gpu_packed(4, 128, True, False, K, N, seed=1), torch.device("cuda"), torch.float16,
                HOPPER_OPTIONS if HOPPER else None)
    x = torch.randn(m, K, device="cuda", dtype=torch.float16)
    for _ in range(5):
        gemm_calls([p], x)[0]()
    torch.cuda.synchronize()


def profile(out: str, tag: str = "") -> None:
    ncu = shutil.which("ncu") or next((p for p in ("/usr/local/cuda/bin/ncu",) if os.path.exists(p)), None)
    if ncu is None:
        print("ncu: not installed here", flush=True)
        return
    sections = ["SpeedOfLight", "WarpStateStats", "SchedulerStats", "InstructionStats",
                "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "Occupancy"]
    for m in (16, 32) if HOPPER else (1, 16):
        cmd = [ncu, "-k", "regex:hopper_gemm_kernel" if HOPPER else "regex:gemm_kernel", "--launch-skip", "3",
               "--launch-count", "1",
               "--metrics", "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio"]
        for s in sections:
            cmd += ["--section", s]
        cmd += [sys.executable, __file__, "--one", "8192", "28672", str(m)]
        if KIND is not None:
            cmd += ["--kind", next(path for path, k in policy.KINDS.items() if k == KIND)]
        if HOPPER:
            cmd += ["--hopper"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        text = proc.stdout + proc.stderr
        path = os.path.join(out, f"ncu-8192x28672-m{m}{'-hopper' if HOPPER else ''}{tag}.txt")
        with open(path, "w") as f:
            f.write(text)
        print(f"ncu M={m}: exit {proc.returncode}, {len(text)} characters -> {path}", flush=True)
        print("\n".join(ln for ln in text.splitlines() if any(
            key in ln for key in ("Throughput", "Stall", "stalled", "Issue", "Pipe", "Warp Cycles",
                                  "Eligible", "Executed Ipc", "ERR", "Bandwidth", "L2 Hit",
                                  "Achieved Occ", "Duration")))[:8000],
              flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--one", nargs=3, type=int, metavar=("K", "N", "M"))
    parser.add_argument("--ncu-only", action="store_true", help="skip the L2 hot/cold timing")
    parser.add_argument("--tag", default="", help="suffix of the ncu report files")
    parser.add_argument("--kind", choices=[p for p in policy.KINDS if p.startswith("marlin:")],
                        help="time this kernel instead of the one the dispatch policy picks")
    parser.add_argument("--hopper", action="store_true", help="profile the sm_90a copy's kernel (M = 16, 32)")
    args = parser.parse_args()
    global KIND, HOPPER
    KIND = policy.KINDS[args.kind] if args.kind else None
    HOPPER = args.hopper
    build.load()
    if args.one:
        one(*args.one)
        return 0
    os.makedirs(args.out, exist_ok=True)
    if not args.ncu_only:
        hot_cold()
    profile(args.out, args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
