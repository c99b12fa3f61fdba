"""``gptq bench`` on the CPU: tiny shapes, every output file written and sane, checks enforced.

No timing is asserted (CPU numbers mean nothing); what is tested is that every implementation
is checked against the float64 reference before it is timed, and what gets written.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from gptq_core import BackendInfo, Capabilities, get_registry, hookimpl
from gptq_core.bench import BenchConfig, parse_m, parse_shapes, run
from gptq_core.bench.baselines import tinygemm_baseline, tinygemm_reason
from gptq_core.bench.layers import random_layer
from gptq_core.cli.main import main
from gptq_core.errors import GPTQError


@pytest.fixture()
def interpret(monkeypatch):
    """Let the triton backend run on the CPU (its interpreter), so the bench times it too."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_cli_writes_table_csv_json_and_plot(tmp_path, capsys, interpret):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    rc = main(["bench", "--shapes", "128x64", "--m", "1,5", "--backends", "torch,triton",
               "--seconds", "0.001", "--quiet", "--csv", str(out / "r.csv"),
               "--json", str(out / "r.json"), "--plot", str(out / "r.png")])
    assert rc == 0
    table = capsys.readouterr().out
    assert "128x64: K=128 N=64, 4-bit g128 sym" in table and "triton us" in table

    with open(out / "r.csv") as f:
        rows = list(csv.DictReader(f))
    impls = {r["impl"] for r in rows}
    assert impls == {"fp16", "tinygemm", "torch", "triton"}
    assert len(rows) == 2 * len(impls)
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["us"]) > 0 and float(r["rel_err"]) < 5e-3
        assert int(r["copies"]) >= 2
    fp16 = [r for r in rows if r["impl"] == "fp16"]
    assert all(math.isclose(float(r["x_fp16"]), 1.0) for r in fp16)

    data = json.loads((out / "r.json").read_text())
    assert data["meta"]["config"] == "4-bit g128 sym, float16 activations"
    assert {r["impl"] for r in data["results"]} == impls

    png = (out / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bench_act_order_3bit_reports_why_tinygemm_is_absent():
    cfg = BenchConfig(bits=3, group_size=64, act_order=True, shapes=[("t", 128, 32)],
                      m_values=[2], backends=["torch"], device="cpu", target_seconds=0.001)
    rows = run(cfg, log=lambda s: None)
    by_impl = {r.impl: r for r in rows}
    assert by_impl["tinygemm"].status == "unavailable" and "3-bit" in by_impl["tinygemm"].note
    assert by_impl["torch"].status == "ok" and by_impl["fp16"].status == "ok"
    assert by_impl["torch"].quant == "3-bit g64 sym act-order, float16 activations"


class WrongBackend:
    """A real plugin whose kernel is off by one scale: the bench must refuse to time it."""

    @hookimpl
    def gptq_backend_info(self):
        return BackendInfo(name="wrong", version="0", distribution="tests",
                           capabilities=Capabilities(device_kinds=frozenset({"cpu"}), bits=(4,)))

    @hookimpl
    def gptq_pack(self, weight, device, spec):
        return weight.dequantize(torch.float32)

    @hookimpl
    def gptq_qmatmul(self, x, prepared, bias):
        return (x.float() @ prepared * 1.01).to(x.dtype)


def test_a_wrong_backend_is_checked_and_not_timed():
    reg = get_registry()
    reg.register(WrongBackend(), name="wrong")
    try:
        cfg = BenchConfig(shapes=[("t", 128, 32)], m_values=[3], backends=["wrong"],
                          device="cpu", target_seconds=0.001, baselines=False)
        (row,) = run(cfg, log=lambda s: None)
    finally:
        reg.unregister("wrong")
    assert row.status == "check failed" and math.isnan(row.us)
    assert row.rel_err == pytest.approx(0.01, rel=0.05)


def test_tinygemm_packing_matches_the_layer():
    w = random_layer(256, 64, 4, 64, sym=False, act_order=False, device=torch.device("cpu"), seed=3)
    assert tinygemm_reason(w) is None
    impl = tinygemm_baseline([w], torch.device("cpu"))
    x = torch.randn(5, 256).to(impl.dtype)
    ref = x.double() @ w.dequantize(torch.float64)
    err = float((impl.calls[0](x).double() - ref).norm() / ref.norm())
    assert err < 2e-3


def test_parsing_shapes_and_m():
    assert parse_shapes("4096x11008,llama3-70b up") == [
        ("llama2-7b up", 4096, 11008), ("llama3-70b up", 8192, 28672)]
    assert len(parse_shapes("all")) == 7 and parse_shapes("300x20") == [("300x20", 300, 20)]
    assert parse_m("1, 16,64") == [1, 16, 64] and len(parse_m("all")) == 11
    for bad in ("4096", "ax3", "0x5"):
        with pytest.raises(GPTQError):
            parse_shapes(bad)
    with pytest.raises(GPTQError):
        parse_m("1,-2")


@pytest.fixture()
def cpu_kernels():
    """The cpu backend's C++ kernels (built or found in their cache), whose policy has two paths."""
    from gptq_backends.cpu_kernels import build

    try:
        build.load()
    except build.BuildError as exc:  # pragma: no cover - a machine without g++
        pytest.skip(f"C++ kernels not built here: {exc}")


def test_backend_option_moves_the_cpu_backend_onto_its_gemm_path(tmp_path, cpu_kernels):
    from gptq_backends.cpu_kernels.policy import GEMM, GEMV

    def bench(*extra: str) -> tuple[dict, dict]:
        out = tmp_path / f"r{len(extra)}.json"
        assert main(["bench", "--device", "cpu", "--backends", "cpu,torch", "--shapes", "128x64",
                     "--m", "1,32", "--dtype", "fp32", "--seconds", "0", "--no-baselines",
                     "--quiet", "--json", str(out), *extra]) == 0
        data = json.loads(out.read_text())
        assert all(r["status"] == "ok" for r in data["results"]), data["results"]
        return data, {(r["impl"], r["m"]): r["path"] for r in data["results"]}

    data, default = bench()
    assert (default[("cpu", 1)], default[("cpu", 32)]) == (GEMV, GEMM)
    assert "backend_options" not in data["meta"]
    data, forced = bench("--backend-option", "cpu.gemm_threshold=0")
    assert (forced[("cpu", 1)], forced[("cpu", 32)]) == (GEMM, GEMM)
    assert forced[("torch", 1)] == default[("torch", 1)]  # not named: its defaults
    assert data["meta"]["backend_options"] == {"cpu": {"gemm_threshold": "0"}}


@pytest.mark.parametrize("option, message", [
    ("cpu.nope=1", "backend 'cpu' has no option 'nope' (its options: build_dir, gemm_threshold)"),
    ("cpu.gemm_threshold=few", "backend 'cpu' option gemm_threshold='few' cannot be read as int"),
    ("cpu.gemm_threshold=-1", "cpu option gemm_threshold=-1 must be >= 0"),
    ("triton.autotune=0", "names backend 'triton', which this run does not bench (backends: cpu, torch)"),
    ("nosuch.x=1", "names backend 'nosuch', which is not installed"),
    ("gemm_threshold=0", "is not of the form BACKEND.NAME=VALUE"),
])
def test_bad_backend_options_are_one_line_before_any_file(option, message, tmp_path, capsys):
    csv_path = tmp_path / "r.csv"
    assert main(["bench", "--device", "cpu", "--backends", "cpu,torch", "--shapes", "128x64",
                 "--m", "1", "--csv", str(csv_path), "--backend-option", option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptq bench: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not csv_path.exists()


def test_cli_rejects_bad_bits(capsys):
    assert main(["bench", "--bits", "5", "--shapes", "128x32", "--m", "1"]) == 2
    assert "--bits 5" in capsys.readouterr().err


def test_triton_is_reported_unavailable_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = BenchConfig(shapes=[("t", 128, 32)], m_values=[1], backends=["triton"], device="cpu",
                      baselines=False)
    (row,) = run(cfg, log=lambda s: None)
    assert row.status == "unavailable" and "TRITON_INTERPRET=1" in row.note
