"""Quality methods of the quantizer on stories260K: held-out perplexity, wall time and peak
memory per method and bit width (issue 16; DESIGN.md §6).

Every (setting, method, seed) runs in its own Python process, so wall time and peak memory
belong to it alone; seeds are outermost so every method sees the same machine state. The
model is the shipped stories260K, calibrated on ``--nsamples`` x ``--seqlen`` windows of the
first 2/3 of the shipped TinyStories sample; perplexity is on the rest, tokenized as one
string ("raw", how issue 16's figures were measured) and story by story with BOS ("docs"),
512-token windows. Methods are QuantizeConfig overrides (:data:`METHODS`); "plain" is the
paper's GPTQ (every method off), "default" is ``QuantizeConfig()``'s own settings.

    python benchmarks/quantize_methods.py [--settings w4g32 w3g32 w2g16] [--methods plain default ...]
        [--seeds 0 1 2] [--device cpu|cuda] [--json F]
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

#: Method name -> QuantizeConfig overrides. "plain" turns every quality method off.
METHODS: dict[str, dict] = {
    "plain": {"mse": 0.0, "act_group_aware": False, "float_target": 0.0},
    "default": {},
    "mse": {"mse": 2.4, "act_group_aware": False, "float_target": 0.0},
    "group-aware": {"mse": 0.0, "act_group_aware": True, "float_target": 0.0},
    "act-order": {"mse": 0.0, "desc_act": True, "float_target": 0.0},
    "float-0.25": {"mse": 0.0, "act_group_aware": False, "float_target": 0.25},
    "float-0.5": {"mse": 0.0, "act_group_aware": False, "float_target": 0.5},
    "float-1": {"mse": 0.0, "act_group_aware": False, "float_target": 1.0},
    "float-0.5+mse": {"mse": 2.4, "act_group_aware": False, "float_target": 0.5},
    "float-0.5+group-aware": {"mse": 0.0, "act_group_aware": True, "float_target": 0.5},
    "all": {"mse": 2.4, "act_group_aware": True, "float_target": 0.5},
}


def parse_setting(text: str) -> tuple[int, int]:
    """``w4g32`` -> (4, 32)."""
    bits, _, group = text.lstrip("w").partition("g")
    return int(bits), int(group)


def one(args: argparse.Namespace) -> dict:
    """Quantize once (first setting, method and seed); the figures as a dict."""
    from transformers import AutoTokenizer

    from gptq_core import QuantizeConfig
    from gptq_core.eval import perplexity
    from gptq_core.quantize import prepare_calibration, quantize_model, token_stream

    bits, group = parse_setting(args.settings[0])
    method, seed = args.methods[0], args.seeds[0]
    tok = AutoTokenizer.from_pretrained(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        calib_file, held_file = split_sample(Path(tmp))
        calib = prepare_calibration(calib_file, tok, args.nsamples, args.seqlen, seed)
        raw = torch.tensor(tok(held_file.read_text(encoding="utf-8"), verbose=False)["input_ids"])
        docs = token_stream(held_file, tok)
    model = load(args.device)
    cfg = QuantizeConfig(bits=bits, group_size=group).replace(**METHODS[method])
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    quantize_model(model, calib, cfg, model.model.layers, GROUPS, device=args.device, progress=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"setting": args.settings[0], "method": method, "seed": seed, "seconds": seconds,
            "peak_mib": peak / 2**20, "raw": perplexity(model, raw, 512), "docs": perplexity(model, docs, 512),
            "config": {k: getattr(cfg, k) for k in ("mse", "act_group_aware", "float_target", "desc_act")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=["w4g32", "w3g32", "w2g16"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--json", type=Path, help="also write every run here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return 0
    rows = []
    for seed in args.seeds:
        for setting in args.settings:
            for method in args.methods:
                cmd = [sys.executable, __file__, "--one", "--device", args.device, "--nsamples", str(args.nsamples),
                       "--seqlen", str(args.seqlen), "--settings", setting, "--methods", method, "--seeds", str(seed)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"  seed {seed} {setting} {method:<22} raw {r['raw']:8.3f} {r['seconds']:.2f} s",
                      file=sys.stderr, flush=True)
    print(f"stories260K, {args.nsamples} x {args.seqlen} calibration tokens, {args.device}, seeds {args.seeds} "
          "(mean; min-max in brackets); time relative to plain in the same setting")
    print("| setting | method | held-out ppl, raw | ppl, docs | wall s | x plain time | peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for setting in args.settings:
        base = [r["seconds"] for r in rows if r["setting"] == setting and r["method"] == "plain"]
        for method in args.methods:
            sel = [r for r in rows if (r["setting"], r["method"]) == (setting, method)]
            raw = [r["raw"] for r in sel]
            sec = statistics.mean(r["seconds"] for r in sel)
            ratio = f"{sec / statistics.mean(base):.2f}x" if base else "-"
            print(f"| {setting} | {method} | {statistics.mean(raw):.3f} [{min(raw):.2f}-{max(raw):.2f}] | "
                  f"{statistics.mean(r['docs'] for r in sel):.3f} | {sec:.2f} | {ratio} | "
                  f"{max(r['peak_mib'] for r in sel):.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
