"""Experiment: the exllama kernel at decode sizes, against another version of its sources, over
split-K counts.

Not part of the product. Builds each ``--variants`` folder (a copy of ``backend_exllama``'s
``csrc``, e.g. the last commit's: ``git archive HEAD backend_exllama/gptq_backend_exllama/csrc``;
"tree" is the working tree's) with a small binding that launches the kernel with a split count
chosen here instead of the op's one-wave rule. Every (variant, splits) is checked against the float64
reference on fresh random inputs before it is timed (CUDA-graph replays of rotated weight
copies, gptq_core.bench.timing). The product op is timed in the same run for the ratio.

    python benchmarks/exllama_decode_sweep.py --variants head=.cache/csrc-head,tree --out $OUT/sweep.txt
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from gptq_backend_exllama import build as ex_build
from gptq_backend_exllama import ops as ex_ops
from gptq_backend_exllama.prepare import prepare, reference_weight
from gptq_core import jit
from gptq_core.bench.layers import random_layer
from gptq_core.bench.timing import time_calls

CSRC = Path(ex_build.EXTENSION.csrc)

BINDING = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include "exllama.h"
using namespace gptq_exllama;

int64_t launch(at::Tensor a, at::Tensor q, at::Tensor sz, at::Tensor acc, at::Tensor counters,
               at::Tensor out, int64_t group_size, int64_t n, int64_t splits) {
  const int64_t k_pad = q.numel() * 8 / n;
  const int64_t units = (k_pad + kSplitAlign - 1) / kSplitAlign;
  splits = std::max<int64_t>(1, std::min(splits, units));
  int64_t k_split = (units + splits - 1) / splits * kSplitAlign;
  if (splits == 1 || k_split >= k_pad) k_split = k_pad;
  splits = (k_pad + k_split - 1) / k_split;
  GemmArgs args{};
  args.a = a.data_ptr(); args.perm = nullptr; args.q = static_cast<const uint4*>(q.data_ptr());
  args.sz = sz.data_ptr(); args.bias = nullptr; args.c = out.data_ptr();
  args.acc = acc.data_ptr<float>(); args.counters = counters.data_ptr<int>();
  args.m = a.size(0); args.n = n; args.k = a.size(1); args.k_pad = k_pad;
  args.group_size = group_size; args.k_split = k_split;
  TORCH_CHECK(gemm_launch_f16(args, splits, c10::cuda::getCurrentCUDAStream()) == cudaSuccess);
  return splits;
}
int64_t occupancy(int64_t rows) { int b = 0; gemm_occupancy_f16(rows, true, &b); return b; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("launch", &launch); m.def("occupancy", &occupancy); }
"""


def build_variant(name: str, csrc: Path, root: Path, arch: str) -> object:
    folder = root / name
    shutil.copytree(csrc, folder)
    (folder / "binding.cpp").write_text(BINDING)
    return load(name=f"exllama_sweep_{name}", sources=[str(folder / "binding.cpp"), str(folder / "exllama_f16.cu")],
                extra_include_paths=[str(folder), str(jit.SHARED_CSRC)],
                extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
                build_directory=str(folder), verbose=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x12288,4096x4096,4096x22016,11008x4096,8192x28672")
    ap.add_argument("--m", default="1")
    ap.add_argument("--variants", default="tree", help="NAME=CSRC_DIR or 'tree', comma-separated")
    ap.add_argument("--out", default="exllama-sweep.txt")
    args = ap.parse_args()
    dev = torch.device("cuda")
    major, minor = torch.cuda.get_device_capability()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ex_build.load()  # the product's extension, for the op timed beside the variants
    root = Path(tempfile.mkdtemp(prefix="exllama-sweep-"))
    t0 = time.perf_counter()
    variants = {}
    for spec in args.variants.split(","):
        name, _, folder = spec.partition("=")
        variants[name] = build_variant(name, Path(folder) if folder else CSRC, root, f"{major}{minor}")
    say(f"built {len(variants)} variants in {time.perf_counter() - t0:.1f} s")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        layer = random_layer(K, N, 4, 128, sym=True, act_order=False, device=dev, seed=1)
        p = prepare(layer, dev, torch.float16)
        copies = max(2, math.ceil(200e6 / (p.q.numel() * 4 + p.sz.numel() * 2)))
        qs = [p.q.clone() for _ in range(copies)]
        szs = [p.sz.clone() for _ in range(copies)]
        w64 = reference_weight(p)
        for M in map(int, args.m.split(",")):
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            ref = x.double() @ w64
            scale = ref.abs().max().item()
            acc = torch.zeros(M * N, dtype=torch.float32, device=dev)
            counters = torch.zeros(8192, dtype=torch.int32, device=dev)
            outs = [torch.empty(M, N, device=dev, dtype=torch.float16) for _ in range(copies)]
            prod = [lambda i=i: ex_ops.gemm(x, qs[i], szs[i], None, None, p.acc, p.counters, p.group_rows, N, 0)
                    for i in range(copies)]
            err = (prod[0]().double() - ref).abs().max().item() / scale
            if not err < 2e-3:
                say(f"{K}x{N} M={M}: product op WRONG, rel err {err:.2e}")
                continue
            base = time_calls(prod, dev).us
            gb = (p.q.numel() * 4 + p.sz.numel() * 2) / 1e9
            say(f"\n{K}x{N} M={M}: product op {base:.1f} us ({gb / base * 1e6 / 1e3:.2f} TB/s)")
            col_blocks = -(-N // 512)
            units = -(-K // 32)
            for variant, mod in variants.items():
                occ = mod.occupancy(M)
                cands = sorted({max(1, min(units, c)) for c in
                                [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256,
                                 -(-sms // col_blocks), -(-2 * sms // col_blocks), -(-4 * sms // col_blocks),
                                 -(-sms * occ // col_blocks), sms * occ // col_blocks]})
                row = []
                for splits in cands:
                    real = mod.launch(x, qs[0], szs[0], acc, counters, outs[0], p.group_rows, N, splits)
                    torch.cuda.synchronize()
                    err = (outs[0].double() - ref).abs().max().item() / scale
                    if not err < 2e-3 or acc.abs().max().item() != 0 or counters.abs().max().item() != 0:
                        say(f"  {variant} splits {real}: WRONG rel err {err:.2e}")
                        continue
                    calls = [lambda i=i: mod.launch(x, qs[i], szs[i], acc, counters, outs[i], p.group_rows, N, splits)
                             for i in range(copies)]
                    us = time_calls(calls, dev).us
                    row.append((us, real))
                best = min(row)
                say(f"  {variant} (occupancy {occ}/SM): " + "  ".join(f"s{r}:{u:.1f}" for u, r in row)
                    + f"  | best {best[0]:.1f} us at {best[1]} splits = {base / best[0]:.2f}x the product op")
    Path(args.out).write_text("\n".join(lines) + "\n")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
