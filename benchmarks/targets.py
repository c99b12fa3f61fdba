"""Read `gptq bench --csv` files and print each backend's speed-ups against the issue targets.

The targets are the H100 tables of the Triton and Marlin issues (4-bit g128 sym, fp16
activations, ratio over fp16 cuBLAS measured in the same run). A cell reads "2.46 (3.5 !)":
the measured ratio, the target, and "!" where it is missed or "ok" where it is met.

    python benchmarks/targets.py benchmarks/results/h100-bench-4bit-g128.csv
    python benchmarks/targets.py BENCH.csv --backend marlin --markdown

Act-order, 2/3/8-bit and bf16 rows of other CSVs are summarized as plain ratios by
``--compare``, and act-order as its cost over the same shape without it by ``--act-cost``
(give both CSVs).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict

#: backend -> (K, N) -> {M: target speed-up over fp16}
TARGETS: dict[str, dict[tuple[int, int], dict[int, float]]] = {
    "triton": {
        (8192, 28672): {1: 3.0, 16: 2.5, 64: 1.5, 256: 0.7, 4096: 0.85},
        (4096, 4096): {1: 2.0, 16: 1.8, 64: 1.2, 256: 0.7, 4096: 0.85},
    },
    "marlin": {
        (8192, 28672): {1: 3.5, 16: 3.3, 64: 2.2, 128: 1.3, 256: 0.8, 4096: 0.9},
        (4096, 14336): {1: 3.0, 16: 2.8, 64: 1.8, 128: 1.2, 256: 0.8, 4096: 0.9},
        (4096, 4096): {1: 2.5, 16: 2.3, 64: 1.5, 128: 1.1, 256: 0.8, 4096: 0.9},
    },
}


def read(paths: list[str]) -> dict[tuple[str, int, int, int, str], dict]:
    """(impl, K, N, M, quant) -> row, over every file (a later file wins)."""
    rows = {}
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["status"] != "ok":
                    continue
                rows[(r["impl"], int(r["k"]), int(r["n"]), int(r["m"]), r["quant"])] = r
    return rows


def ratio(rows, impl, k, n, m, quant="4-bit g128 sym, float16 activations") -> float:
    r = rows.get((impl, k, n, m, quant))
    return float(r["x_fp16"]) if r else math.nan


def target_table(rows, backend: str, markdown: bool) -> str:
    targets = TARGETS[backend]
    ms = sorted({m for t in targets.values() for m in t})
    lines = []
    head = ["K x N"] + [f"M={m}" for m in ms]
    sep = " | " if markdown else "  "
    if markdown:
        lines += ["| " + sep.join(head) + " |", "|" + " --- |" * len(head)]
    else:
        lines.append(sep.join(f"{h:>16}" for h in head))
    for (k, n), t in targets.items():
        cells = [f"{k}x{n}"]
        for m in ms:
            if m not in t:
                cells.append("-")
                continue
            got = ratio(rows, backend, k, n, m)
            mark = "ok" if got >= t[m] else "!"
            cells.append(f"{got:.2f} ({t[m]} {mark})")
        lines.append(("| " + sep.join(cells) + " |") if markdown
                     else sep.join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def compare(rows, backends: list[str], markdown: bool) -> str:
    """Speed-up over fp16 for every (quant, shape, M) found, one column per backend."""
    table = defaultdict(dict)
    for (impl, k, n, m, quant), r in rows.items():
        if impl in backends:
            table[(quant, k, n, m)][impl] = float(r["x_fp16"])
    lines = []
    sep = " | " if markdown else "  "
    head = ["quant", "K x N", "M"] + backends
    if markdown:
        lines += ["| " + sep.join(head) + " |", "|" + " --- |" * len(head)]
    for (quant, k, n, m), got in sorted(table.items()):
        cells = [quant, f"{k}x{n}", str(m)] + [f"{got.get(b, math.nan):.2f}" for b in backends]
        lines.append(("| " + sep.join(cells) + " |") if markdown else sep.join(cells))
    return "\n".join(lines)


def act_order_cost(rows, markdown: bool) -> str:
    """time with act-order / time without, per implementation, shape and M (1.10 = +10%).

    fp16 rows (the same dense matmul twice) show the run's noise; the torch reference is left out.
    """
    lines = []
    sep = " | " if markdown else "  "
    head = ["impl", "quant", "K x N", "M", "act / plain"]
    if markdown:
        lines += ["| " + sep.join(head) + " |", "|" + " --- |" * len(head)]
    for (impl, k, n, m, quant), r in sorted(rows.items()):
        if " act-order" not in quant or impl == "torch":
            continue
        plain = rows.get((impl, k, n, m, quant.replace(" act-order", "")))
        if plain is None:
            continue
        cost = float(r["us"]) / float(plain["us"])
        cells = [impl, quant.replace(" act-order", ""), f"{k}x{n}", str(m), f"{cost:.2f}"]
        lines.append(("| " + sep.join(cells) + " |") if markdown else sep.join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+", help="gptq bench --csv files of one run")
    ap.add_argument("--backend", choices=sorted(TARGETS), action="append",
                    help="backend(s) to hold against their targets (default: all)")
    ap.add_argument("--compare", nargs="*", metavar="IMPL",
                    help="instead: every row's speed-up for these implementations")
    ap.add_argument("--act-cost", action="store_true",
                    help="instead: act-order's time over the same shape without it")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    rows = read(args.csv)
    if args.act_cost:
        print(act_order_cost(rows, args.markdown))
        return 0
    if args.compare is not None:
        print(compare(rows, args.compare or ["tinygemm", "marlin", "triton"], args.markdown))
        return 0
    for backend in args.backend or sorted(TARGETS):
        print(f"\n{backend}: speed-up over fp16 (target, ok/!)")
        print(target_table(rows, backend, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
