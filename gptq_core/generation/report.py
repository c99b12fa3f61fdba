"""Presenting ``gptq bench generate`` rows: a table per batch size, JSON, and a PNG."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from ..errors import GPTQError
from .benchmark import ModelEntry, Row
from .spread import DevicePlacement, LayerSum
from .profile import describe


def _f(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _tokens(r: Row) -> str:
    if r.tokens_match is None:
        return "ref" if r.mode == "eager" and r.status == "ok" else "-"
    if r.tokens_match:
        return "same"
    gap = f" gap {r.mismatch_gap:.3g}" if r.mismatch_gap is not None else ""
    return f"DIFFER@{r.first_mismatch}{gap}"


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def placement_line(p: DevicePlacement, layers: int) -> str:
    """One device of a placement: its decoder layers, other modules, weights and backends."""
    what = [f"layers {_ranges(p.layers)} ({len(p.layers)} of {layers})" if p.layers else "no decoder layers"]
    what += p.modules
    what.append(f"{p.weights_gb:.2f} GB of weights" if p.weights_gb >= 0.01 else f"{p.weights_gb * 1024:.2f} MB of weights")
    if p.backends:
        what.append("linears: " + ", ".join(f"{n} x {c}" for n, c in sorted(p.backends.items())))
    return f"  {p.device}: " + ", ".join(what)


def layer_sum_line(label: str, s: LayerSum, rows: list[Row]) -> str:
    """The single-device per-layer time sum of one model and batch, and each mode against it."""
    against = [f"{r.mode} {r.ms_per_step:.2f} ms = {r.layer_sum_ratio:.2f}x" for r in rows
               if r.model == label and r.batch == s.batch and r.layer_sum_ratio is not None and r.ms_per_step]
    return (f"  {label} per-layer time sum (one layer's eager decode step alone on {s.device}): "
            f"{s.layers} x {s.layer_ms:.3f} ms + embeddings/norm/head {s.head_ms:.3f} ms = {s.total_ms:.2f} ms"
            + ("; ms/step against it: " + ", ".join(against) if against else ""))


def table(rows: list[Row], models: list[ModelEntry]) -> str:
    """One block per batch size: a line per model x mode, quantized against float per mode."""
    out = []
    for m in models:
        weights = f", {m.weights_gb:.2f} GB on the device(s)" if m.weights_gb is not None else ""
        load = f"loaded in {m.load_s:.1f} s" if m.load_s is not None else "not loaded"
        out.append(f"{m.label}: {m.folder} ({load}{weights}){'; ' + m.note if m.note else ''}")
        layers = sum(len(p.layers) for p in m.placement)
        out += [placement_line(p, layers) for p in m.placement]
    out.append("")
    with_sum = any(r.layer_sum_ratio is not None for r in rows)
    head = ["model", "mode", "tok/s", "ms/step", "x float", "prefill ms", "warm-up s", "peak GB", "path", "tokens"]
    if with_sum:
        head.append("x layer sum")
    for batch in sorted({r.batch for r in rows}):
        sub = [r for r in rows if r.batch == batch]
        lines = [head]
        for r in sub:
            ref = next((f for f in sub if f.model == "float" and f.mode == r.mode and f.tok_s), None)
            ratio = r.tok_s / ref.tok_s if r.model != "float" and ref is not None and r.tok_s else None
            if r.status != "ok":
                lines.append([r.model, r.mode, "ERROR", "-", "-", "-", "-", "-", r.note[:60], "-"] + ["-"] * with_sum)
                continue
            lines.append([r.model, r.mode, _f(r.tok_s, ".1f"), _f(r.ms_per_step, ".2f"), _f(ratio, ".2f"),
                          _f(r.prefill_ms, ".1f"), _f(r.warmup_s, ".1f"), _f(r.peak_gb, ".2f"), r.path, _tokens(r)]
                         + [_f(r.layer_sum_ratio, ".2f")] * with_sum)
        widths = [max(len(line[c]) for line in lines) for c in range(len(head))]
        first = sub[0]
        out.append(f"batch {batch}: prompt {first.prompt_len} tokens, {first.new_tokens} new tokens")
        for line in lines:
            out.append("  ".join(v.ljust(w) if c in (0, 1, 8) else v.rjust(w)
                                 for c, (v, w) in enumerate(zip(line, widths))))
        for m in models:
            for s in m.layer_sums:
                if s.batch == batch:
                    out.append(layer_sum_line(m.label, s, sub))
        for r in sub:
            if r.breakdown:
                how = ("as the fast path replays it (compiled, CUDA graph)" if "gaps_ms" in r.breakdown
                       else "run eagerly, uncompiled")
                out.append(f"  one {r.model} decode step {how}: {describe(r.breakdown)}; "
                           f"the fast path's step takes {_f(r.ms_per_step, '.3f')} ms")
            if r.status == "ok" and r.note:
                out.append(f"  {r.model} {r.mode}: {r.note}")
        out.append("")
    mismatches = [r for r in rows if r.tokens_match is False]
    if mismatches:
        out.append("GREEDY TOKENS DIFFER FROM EAGER: " + ", ".join(
            f"{r.model} {r.mode} batch {r.batch} from token {r.first_mismatch}"
            + (f" (eager's top-1/top-2 gap {r.mismatch_gap:.4f})" if r.mismatch_gap is not None else "")
            for r in mismatches))
    return "\n".join(out)


def write_json(rows: list[Row], models: list[ModelEntry], path: str | Path, meta: dict) -> None:
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    data = {
        "meta": meta,
        "models": [{"label": m.label, "folder": str(m.folder), "backend": m.backend, "load_s": m.load_s,
                    "weights_gb": m.weights_gb, "note": m.note,
                    "placement": [asdict(p) for p in m.placement],
                    "layer_sums": [{**asdict(s), "total_ms": s.total_ms} for s in m.layer_sums]}
                   for m in models],
        "rows": [{k: clean(v) for k, v in r.as_dict().items()} for r in rows],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1))


def check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        raise GPTQError("--plot needs matplotlib; install it with pip install 'gptq-core[plot]'") from None


def plot(rows: list[Row], path: str | Path, title: str = "") -> None:
    """tok/s bars: one panel per batch size, one bar per model x mode."""
    check_plot_available()
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    batches = sorted({r.batch for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.6), squeeze=False)
    for ax, batch in zip(axes.flat, batches):
        sub = [r for r in rows if r.batch == batch and r.tok_s]
        labels = [f"{r.model}\n{r.mode}" for r in sub]
        colors = ["tab:grey" if r.model == "float" else "tab:blue" for r in sub]
        ax.bar(range(len(sub)), [r.tok_s for r in sub], color=colors)
        ax.set_xticks(range(len(sub)), labels, fontsize=7)
        ax.set_title(f"batch {batch}", fontsize=9)
        ax.set_ylabel("tokens / s", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
