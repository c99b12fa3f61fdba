"""``gptq bench``: time every available backend against fp16 cuBLAS and PyTorch's tinygemm."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from ..bench.cases import DTYPES
from ..errors import GPTQError


def _run(args: argparse.Namespace) -> int:
    from ..bench import BenchConfig, cpu_shapes, parse_m, parse_shapes, run  # noqa: PLC0415
    from ..bench import report  # noqa: PLC0415
    from ..bench.cases import CPU_M  # noqa: PLC0415

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = torch.device(device).type == "cpu"
    shapes = parse_shapes(args.shapes) if args.shapes else (cpu_shapes() if on_cpu else None)
    m_values = parse_m(args.m) if args.m else (list(CPU_M) if on_cpu else None)
    cfg = BenchConfig(
        bits=args.bits, group_size=args.group_size, sym=not args.asym, act_order=args.act_order,
        dtype=DTYPES[args.dtype], device=device, copies=args.copies,
        backends=[b.strip() for b in args.backends.split(",")] if args.backends else None,
        baselines=not args.no_baselines, target_seconds=args.seconds,
    )
    if shapes is not None:
        cfg.shapes = shapes
    if m_values is not None:
        cfg.m_values = m_values
    if args.bits not in (2, 3, 4, 8):
        raise GPTQError(f"--bits {args.bits} is not a GPTQ bit width; use 2, 3, 4 or 8")
    if args.group_size != -1 and args.group_size <= 0:
        raise GPTQError(f"--group-size {args.group_size} is invalid; use -1 or a positive size")

    csv_file = writer = None
    if args.csv:  # rows are appended as they come, so an interrupted run keeps what it measured
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        csv_file = open(args.csv, "w", newline="")  # noqa: SIM115
        writer = csv.DictWriter(csv_file, fieldnames=report.FIELDS)
        writer.writeheader()

    def on_result(r):
        if writer is not None:
            writer.writerow(r.as_dict())
            csv_file.flush()

    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        rows = run(cfg, log=log, on_result=on_result)
    finally:
        if csv_file is not None:
            csv_file.close()
    print(report.table(rows))
    meta = {"device": str(device), "config": cfg.describe(), "command": " ".join(sys.argv)}
    if device != "cpu" and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(torch.device(device))
    meta["torch"] = torch.__version__
    if args.json:
        report.write_json(rows, args.json, meta)
    if args.plot:
        report.plot(rows, args.plot, f"{cfg.describe()} on {meta.get('gpu', device)}")
    failed = [r for r in rows if r.status in ("check failed", "error")]
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark every available backend against fp16 cuBLAS and tinygemm",
        description=(
            "Benchmark every available backend side by side with fp16 torch.matmul (cuBLAS) and "
            "torch's tinygemm (4-bit), over the shapes and M values of DESIGN.md section 9. "
            "Every implementation is checked against the float64 reference before it is timed; "
            "the exit status is 1 if any check failed."
        ),
    )
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="group size, -1 for one group")
    p.add_argument("--act-order", action="store_true", help="shuffled g_idx (desc_act)")
    p.add_argument("--asym", action="store_true", help="asymmetric zero points")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="activation dtype")
    p.add_argument("--shapes", help="KxN list, design shape names, 'all' or 'cpu' "
                                    "(default: all of DESIGN.md on a GPU, 'cpu' on a CPU)")
    p.add_argument("--m", help="comma-separated batch sizes, or 'all' (default: all on a GPU)")
    p.add_argument("--backends", help="comma-separated backend names (default: every one)")
    p.add_argument("--no-baselines", action="store_true", help="skip fp16 and tinygemm")
    p.add_argument("--device", help="device to run on (default: cuda if present, else cpu)")
    p.add_argument("--copies", type=int, default=0,
                   help="weight copies to rotate (default: enough to overflow the L2 cache)")
    p.add_argument("--seconds", type=float, default=0.05,
                   help="timing budget per measurement (default 0.05)")
    p.add_argument("--csv", help="write every row to this CSV file")
    p.add_argument("--json", help="write rows and metadata to this JSON file")
    p.add_argument("--plot", help="write a PNG of speed-up over fp16 against M")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_run)
