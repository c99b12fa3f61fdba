"""Run the conformance suite's capture checks for a few backends and print one table.

For the GPU check of docs/DESIGN.md §11 (every GPU backend capturable): per backend, in a
process of its own so that caches made on first use are made inside the checks,
``test_cuda_graph_capture`` and ``test_compile_replay``; with ``--baseline`` also
``test_qmatmul``, to tell a backend that fails everywhere from one that fails only under
capture. JUnit XML and the full log of each run land in ``--out``; the table goes to stdout::

    python conformance_tests/scripts/capture_check.py --backends torch,triton,marlin --out $OUT
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

CHECKS = ("test_cuda_graph_capture", "test_compile_replay")
BASELINE = "test_qmatmul"


def run_backend(name: str, checks: tuple[str, ...], files: Path, quick: bool,
                timeout: int) -> tuple[int, float]:
    """One pytest run of ``checks`` for backend ``name``, writing ``files`` .xml and .log;
    (exit code, seconds)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           "--pyargs", "gptq_conformance", f"--gptq-backend={name}", "--gptq-partial",
           "-k", " or ".join(checks), f"--junitxml={files.with_suffix('.xml')}"]
    if quick:
        cmd.append("--gptq-quick")
    start = time.monotonic()
    with open(files.with_suffix(".log"), "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.monotonic() - start


def outcomes(xml_path: Path, checks: tuple[str, ...]) -> dict[str, tuple[Counter, list[str]]]:
    """Per check: outcome counts and the first line of each failure."""
    table: dict[str, tuple[Counter, list[str]]] = {c: (Counter(), []) for c in checks}
    if not xml_path.exists():
        return table
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        check = case.get("name", "").split("[")[0]
        if check not in table:
            continue
        counts, failures = table[check]
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if failed is not None:
            counts["failed"] += 1
            first = (failed.get("message") or failed.text or "").strip().splitlines()
            failures.append(f"{case.get('name')}: {first[0][:160] if first else '?'}")
        elif skipped is not None:
            kind = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
            counts[kind] += 1
        else:
            counts["passed"] += 1
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,triton,marlin",
                        help="comma-separated backend names (default: torch,triton,marlin)")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT") or "capture_check_out"),
                        help="folder for the XML and logs (default: $OUT, else ./capture_check_out)")
    parser.add_argument("--full", action="store_true", help="the full case set, not --gptq-quick")
    parser.add_argument("--baseline", action="store_true",
                        help=f"also run {BASELINE} (in a second process per backend)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per run (default 240)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'backend':10s} {'check':26s} {'pass':>5s} {'fail':>5s} {'xfail':>6s} {'skip':>5s}")
    status = 0
    runs = [(CHECKS, "")] + ([((BASELINE,), "-baseline")] if args.baseline else [])
    for name in [n.strip() for n in args.backends.split(",") if n.strip()]:
        for checks, tag in runs:
            files = args.out / f"{name}{tag}"
            rc, seconds = run_backend(name, checks, files, not args.full, args.timeout)
            status |= rc != 0
            notes = []
            for check, (counts, failures) in outcomes(files.with_suffix(".xml"), checks).items():
                print(f"{name:10s} {check:26s} {counts['passed']:5d} {counts['failed']:5d} "
                      f"{counts['xfailed']:6d} {counts['skipped']:5d}")
                notes += failures[:3]
            print(f"{name:10s} exit {rc} in {seconds:.0f}s (log: {files.with_suffix('.log')})")
            for note in notes:
                print(f"    {note}")
    return status


if __name__ == "__main__":
    sys.exit(main())
