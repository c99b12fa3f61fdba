"""Quantizer speed on stories260K: wall time, peak memory and held-out perplexity per setting.

Each setting (calibration batch size x seed) runs in its own Python process, so the peak
resident memory (CPU) or peak allocated GPU memory it reports belongs to that setting alone.
The model is the shipped stories260K, calibrated on the first 2/3 of the shipped TinyStories
sample (``--nsamples`` x ``--seqlen`` windows) and evaluated on the rest (stories split at
``<|endoftext|>``, each starting with BOS, 512-token windows), as in accuracy_stories.py.
The first row, ``plain`` batch 1, is the old path (one sample at a time, one Hessian per
linear, every pass recomputing the whole layer); ``--plain-batch-sizes`` adds more plain
rows, to separate what batching and what the reuse of finished outputs contribute. The
speed-up column is relative to the first row.

    python benchmarks/quantize_bench.py [--device cpu|cuda] [--batch-sizes 1 8 32]
        [--plain-batch-sizes 1 8] [--seeds 0 1 2] [--bits 4] [--group-size 32] [--nsamples 128] [--seqlen 256]
        [--float-target 0] [--json F]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy_stories import GROUPS, MODEL, load, split_sample  # noqa: E402


def _plain() -> None:
    """Switch off shared Hessians and the reuse of finished outputs (the pre-batching path)."""
    import functools

    from gptq_core.quantize import driver
    from gptq_core.quantize.reuse import FinishedOutputs

    driver._collect_hessians = functools.partial(driver._collect_hessians, share=False)
    FinishedOutputs._wrap = lambda self, name, forward, inside: forward


def one(args: argparse.Namespace) -> dict:
    """Quantize once with ``args.batch_sizes[0]`` and ``args.seeds[0]``; the figures as a dict."""
    if args.plain:
        _plain()
    from transformers import AutoTokenizer

    from gptq_core import QuantizeConfig
    from gptq_core.eval import perplexity
    from gptq_core.quantize import prepare_calibration, quantize_model, token_stream

    tok = AutoTokenizer.from_pretrained(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        calib_file, held_file = split_sample(Path(tmp))
        calib = prepare_calibration(calib_file, tok, args.nsamples, args.seqlen, args.seeds[0])
        docs = token_stream(held_file, tok)
    model = load(args.device)
    cfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, float_target=args.float_target)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = quantize_model(model, calib, cfg, model.model.layers, GROUPS, device=args.device,
                            progress=False, batch_size=args.batch_sizes[0])
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gptq_seconds = sum(r["seconds"] for r in result.records)
    peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"plain": args.plain, "batch_size": args.batch_sizes[0], "seed": args.seeds[0], "seconds": seconds,
            "gptq_seconds": gptq_seconds, "peak_mib": peak / 2**20,
            "ppl": perplexity(model, docs, 512)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    p.add_argument("--plain-batch-sizes", type=int, nargs="*", default=[1, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--float-target", type=float, default=0.0,
                   help="QuantizeConfig.float_target (default 0: the paper's GPTQ, as issue 16's speed target)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process mode
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return 0
    common = ["--device", args.device, "--bits", str(args.bits), "--group-size", str(args.group_size),
              "--float-target", str(args.float_target),
              "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--one"]
    settings = [(True, bs) for bs in args.plain_batch_sizes] + [(False, bs) for bs in args.batch_sizes]
    rows = []
    for seed in args.seeds:  # seeds outermost: every setting sees the same machine state
        for plain, bs in settings:
            cmd = [sys.executable, __file__, *common, "--batch-sizes", str(bs), "--seeds", str(seed)]
            out = subprocess.run(cmd + (["--plain"] if plain else []), check=True, capture_output=True,
                                 text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {'plain' if plain else 'new'} batch {bs:3d} seed {seed}: {rows[-1]['seconds']:.2f} s",
                  file=sys.stderr, flush=True)
    base = statistics.mean(r["seconds"] for r in rows if (r["plain"], r["batch_size"]) == settings[0])
    print(f"stories260K w{args.bits} g{args.group_size}, {args.nsamples} x {args.seqlen} tokens, "
          f"{args.device}, seeds {args.seeds} (mean; ppl range in brackets)")
    print("| path | batch | wall s | GPTQ maths s | speed-up | peak MiB | held-out ppl |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for plain, bs in settings:
        sel = [r for r in rows if (r["plain"], r["batch_size"]) == (plain, bs)]
        sec = statistics.mean(r["seconds"] for r in sel)
        ppls = [r["ppl"] for r in sel]
        print(f"| {'plain' if plain else 'new'} | {bs} | {sec:.2f} | "
              f"{statistics.mean(r['gptq_seconds'] for r in sel):.2f} | {base / sec:.1f}x | "
              f"{max(r['peak_mib'] for r in sel):.0f} | "
              f"{statistics.mean(ppls):.3f} [{min(ppls):.3f}-{max(ppls):.3f}] |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
