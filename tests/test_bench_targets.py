"""benchmarks/targets.py reads what `gptq bench --csv` writes (a CPU run of tiny shapes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gptq_core.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def _targets():
    spec = importlib.util.spec_from_file_location("targets", ROOT / "benchmarks" / "targets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_targets_reads_bench_csv(tmp_path, capsys):
    plain, act = tmp_path / "plain.csv", tmp_path / "act.csv"
    common = ["bench", "--shapes", "64x96", "--m", "1,3", "--seconds", "0.001"]
    assert main([*common, "--bits", "4", "--group-size", "32", "--csv", str(plain)]) == 0
    assert main([*common, "--bits", "4", "--group-size", "32", "--act-order", "--csv", str(act)]) == 0
    capsys.readouterr()
    t = _targets()
    rows = t.read([str(plain), str(act)])
    assert {(impl, m) for impl, k, n, m, q in rows if "act-order" not in q} >= {("fp16", 1), ("fp16", 3)}
    cost = t.act_order_cost(rows, markdown=False)
    assert "fp16  4-bit g32 sym, float16 activations  64x96  1" in cost
    assert t.ratio(rows, "fp16", 64, 96, 1, "4-bit g32 sym, float16 activations") == 1.0
    table = t.target_table(rows, "triton", markdown=True)
    assert table.splitlines()[0].startswith("| K x N | M=1 |") and "nan" in table  # no such shapes here
