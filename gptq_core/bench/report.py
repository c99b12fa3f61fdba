"""Presenting benchmark rows: a table per shape, CSV, JSON and a PNG of speed-up against M."""

from __future__ import annotations

import csv
import json
import math
from collections import OrderedDict
from pathlib import Path

from .runner import Result

FIELDS = list(Result.__dataclass_fields__)


def _fmt(v: float, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(rows: list[Result]) -> str:
    """One block per shape: a line per M, for each implementation its graph-replay us, its
    eager us (called from Python one after another), TB/s and speed-ups."""
    out = []
    shapes = OrderedDict((r.shape, (r.k, r.n)) for r in rows)
    for shape, (k, n) in shapes.items():
        sub = [r for r in rows if r.shape == shape]
        impls = list(OrderedDict.fromkeys(r.impl for r in sub if r.m))
        cols = ["M"]
        for i in impls:
            cols += [f"{i} us", "eager", "TB/s", "x fp16"] + ([] if i in ("fp16", "tinygemm") else ["x tiny"])
        lines = [cols]
        for m in sorted({r.m for r in sub if r.m}):
            line = [str(m)]
            for i in impls:
                r = next((r for r in sub if r.m == m and r.impl == i), None)
                extra = i not in ("fp16", "tinygemm")
                if r is None or r.status != "ok":
                    line += ["FAIL" if r is not None else "-", "-", "-", "-"] + (["-"] if extra else [])
                    continue
                line += [_fmt(r.us, ".1f"), _fmt(r.eager_us, ".1f"), _fmt(r.tbps, ".2f"), _fmt(r.x_fp16, ".2f")]
                if extra:
                    line.append(_fmt(r.x_tinygemm, ".2f"))
            lines.append(line)
        widths = [max(len(row[c]) for row in lines) for c in range(len(cols))]
        quant = sub[0].quant
        out.append(f"{shape}: K={k} N={n}, {quant}, {sub[0].copies} weight copies rotated")
        for row in lines:
            out.append("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        notes = OrderedDict()
        for r in sub:
            if r.status != "ok":
                notes.setdefault((r.impl, r.status, r.note), []).append(str(r.m) if r.m else "all")
        for (impl, status, note), ms in notes.items():
            out.append(f"  {impl}: {status} (M={','.join(ms)}): {note}")
        for impl in impls:  # which of a backend's paths each M timed (options can move them)
            paths = [f"M={r.m} {r.path}" for r in sub if r.impl == impl and r.m and r.path]
            if paths:
                out.append(f"  {impl} paths: {', '.join(paths)}")
        out.append("")
    return "\n".join(out)


def write_csv(rows: list[Result], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(r.as_dict())


def write_json(rows: list[Result], path: str | Path, meta: dict | None = None) -> None:
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    data = {"meta": meta or {}, "results": [{k: clean(v) for k, v in r.as_dict().items()}
                                            for r in rows]}
    Path(path).write_text(json.dumps(data, indent=1))


def plot(rows: list[Result], path: str | Path, title: str = "") -> None:
    """Speed-up over fp16 against M (log x), one panel per shape, one line per implementation."""
    import matplotlib  # noqa: PLC0415 - optional dependency (gptq-core[plot])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    shapes = list(OrderedDict.fromkeys(r.shape for r in rows))
    cols = min(4, len(shapes)) or 1
    nrows = math.ceil(len(shapes) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        sub = [r for r in rows if r.shape == shape and r.status == "ok"]
        impls = list(OrderedDict.fromkeys(r.impl for r in sub))
        for impl in impls:
            pts = sorted((r.m, r.x_fp16) for r in sub if r.impl == impl and math.isfinite(r.x_fp16))
            if pts:
                style = "--" if impl in ("fp16", "tinygemm") else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3,
                        label=impl)
        k, n = next(((r.k, r.n) for r in rows if r.shape == shape), (0, 0))
        ax.set_title(f"{shape} ({k}x{n})", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_xlabel("M (tokens)", fontsize=8)
        ax.set_ylabel("speed-up over fp16", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
