"""Quantizer wall time on a GPU for a synthetic model of real shapes (issue 16's 7B figure).

Builds a random-weight float model of ``--shape`` (gptq_core.synthetic) with ``--layers``
decoder layers, saves it with the shipped Llama tokenizer, then times ``gptq quantize`` end to
end (load, calibrate, quantize, save: a fresh process per method, as a user runs it) for each
method, and reads the driver's own line ``quantized N decoder layers in X s; peak GPU memory``.
The full-depth figure is extrapolated: ``wall + (full_layers - layers) * X / layers`` for the
layers, plus the extra float bytes to load at the load rate this run measured (the reduced
model's load and save are inside ``wall``). Say "extrapolated" wherever the figure is quoted.

    python benchmarks/quantize_synthetic.py --calibration wikitext2.txt [--shape llama-2-7b]
        [--layers 4] [--methods plain,default] [--nsamples 128] [--seqlen 2048] [--work DIR] [--json F]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

#: CLI flags of each method on top of the shared ones (docs/DESIGN.md §6; QuantizeConfig fields).
METHODS: dict[str, list[str]] = {
    "plain": ["--float-target", "0", "--mse", "0"],
    "default": [],
    "default+mse": ["--mse", "2.4"],
}
#: ``<method>-torch-loop``: the same with GPTQ's column loop in torch instead of the Triton
#: kernel (gptq_core/quantize/column_kernel.py), to measure the kernel side by side.
TORCH_LOOP = "-torch-loop"
TORCH_LOOP_PATCH = ("import sys, gptq_core.quantize.column_kernel as k; k.available = lambda device: False; "
                    "from gptq_core.cli.main import main; sys.exit(main(sys.argv[1:]))")
DONE = re.compile(r"quantized (\d+) decoder layers in ([\d.]+) s(?:; peak GPU memory ([\d.]+) GiB)?")


def build_float(shape: str, layers: int, folder: Path, device: str) -> tuple[float, int]:
    """Write the float model; (seconds, bytes of its weights)."""
    from transformers import AutoTokenizer

    from gptq_core.synthetic import TOKENIZER_DIR, llama_config, random_model

    start = time.perf_counter()
    model = random_model(llama_config(shape, layers), torch.device(device), torch.float16)
    model.save_pretrained(folder, max_shard_size="4GB")
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(folder)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - start, size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", required=True, help="calibration text file (WikiText-2 in the issue)")
    p.add_argument("--shape", default="llama-2-7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--methods", default="plain,default", help=f"comma list of {', '.join(METHODS)}, each optionally with {TORCH_LOOP}")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--device", default="cuda")
    p.add_argument("--work", help="folder for the models (default: a temporary folder)")
    p.add_argument("--cprofile", action="store_true",
                   help="run each quantize under cProfile and print its 25 costliest functions (slows it)")
    p.add_argument("--json")
    args = p.parse_args()
    from gptq_core.synthetic import shape_of

    full = shape_of(args.shape).layers
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptq-quantize-synthetic-") as tmp:
        work = Path(args.work or tmp)
        float_dir = work / f"{args.shape}-{args.layers}layers-float"
        shutil.rmtree(float_dir, ignore_errors=True)
        built, size = build_float(args.shape, args.layers, float_dir, args.device)
        print(f"float model ({args.layers} layers, {size / 2**30:.2f} GiB) built in {built:.1f} s", flush=True)
        for method in args.methods.split(","):
            out = work / f"out-{method}"
            profile = work / f"profile-{method}.out"
            base = method.removesuffix(TORCH_LOOP)
            if method.endswith(TORCH_LOOP):
                runner = ["-c", TORCH_LOOP_PATCH]
            elif args.cprofile:
                runner = ["-m", "cProfile", "-o", str(profile), "-m", "gptq_core"]
            else:
                runner = ["-m", "gptq_core"]
            cmd = [sys.executable, *runner, "quantize", str(float_dir), str(out),
                   "--calibration", args.calibration, "--nsamples", str(args.nsamples),
                   "--seqlen", str(args.seqlen), "--device", args.device, "--overwrite", "--no-progress", "-v",
                   *METHODS[base]]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - start
            found = DONE.search(proc.stderr + proc.stdout)
            if found:
                print(found.group(0), flush=True)
            if args.cprofile and profile.exists():
                import pstats

                pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)
            if proc.returncode or not found:
                print(f"{method}: exit {proc.returncode}\n{(proc.stderr + proc.stdout)[-3000:]}", flush=True)
                rows.append({"method": method, "ok": False})
                continue
            layers_s = float(found.group(2))
            per_layer = layers_s / int(found.group(1))
            load_save = wall - layers_s
            # the extra float bytes of the full model, at the rate the reduced one loaded and saved
            s = shape_of(args.shape)
            per_layer_bytes = (size - 2 * s.hidden * s.vocab * 2) / args.layers  # less embeddings and head
            extra_io = load_save * (per_layer_bytes * (full - args.layers)) / size
            total = wall + (full - args.layers) * per_layer + extra_io
            # GPTQ maths per linear from the checkpoint's quantize_log.jsonl; the rest of a layer's
            # time is its forward passes (Hessians, float pass, outputs)
            log = out / "quantize_log.jsonl"
            records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
            maths = sum(r.get("seconds", 0.0) for r in records) / max(1, args.layers)
            slowest = {}
            for r in records:
                key = r["module"]
                slowest[key] = max(slowest.get(key, 0.0), r.get("seconds", 0.0))
            row = {"method": method, "ok": True, "layers": args.layers, "wall_s": round(wall, 1),
                   "gptq_maths_per_layer_s": round(maths, 2), "forwards_per_layer_s": round(per_layer - maths, 2),
                   "slowest_linear_s": {k: round(v, 2) for k, v in slowest.items()},
                   "layers_s": layers_s, "per_layer_s": round(per_layer, 2), "load_save_calib_s": round(load_save, 1),
                   "peak_gpu_gib": float(found.group(3)) if found.group(3) else None,
                   f"extrapolated_{full}_layers_s": round(total, 1)}
            rows.append(row)
            print(f"{method:<12} wall {wall:6.1f} s ({args.layers} layers: {layers_s:.1f} s, {per_layer:.2f} s/layer; "
                  f"load+calibration+save {load_save:.1f} s; per layer: GPTQ maths {maths:.2f} s, forwards "
                  f"{per_layer - maths:.2f} s; per linear: {row['slowest_linear_s']}); peak GPU {row['peak_gpu_gib']} GiB; "
                  f"extrapolated to {full} layers: {total:.0f} s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    plain = next((r for r in rows if r["method"] == "plain" and r["ok"]), None)
    if plain:
        key = f"extrapolated_{full}_layers_s"
        for r in rows:
            if r["ok"] and r is not plain:
                print(f"{r['method']}: {r[key] / plain[key]:.2f}x plain's time", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "device": args.device,
                                               "nsamples": args.nsamples, "seqlen": args.seqlen, "rows": rows}, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
