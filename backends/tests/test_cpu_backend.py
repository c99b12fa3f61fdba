"""The cpu backend: its layout read back, every compiled kernel body against float64, the
dispatch policy and options, and what serves when the C++ kernels cannot be built.

The conformance suite (``pytest --pyargs gptq_conformance --gptq-backend=cpu``) covers the
declared grid; this file covers what is particular to the backend: shapes that reach the
kernels' tails (odd group sizes, partial column blocks, every row-tile remainder), every
instruction set this CPU runs, and the fallback.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gptq_core import QuantLinear, get_registry
from gptq_core.device import DeviceInfo
from gptq_core.errors import NotSupportedError
from gptq_core.options import OptionsError
from gptq_core.policy import EXPLAIN_M
from gptq_core.spec import LayerSpec
from gptq_core.testing import assert_matches_reference, random_activations, random_packed
from gptq_backends.cpu_kernels import build, fallback, layout, ops, plugin, policy
from gptq_backends.cpu_kernels.options import CpuOptions

LAYOUT_GRID = list(itertools.product((2, 3, 4, 8), (-1, 7, 48, 128), (True, False), (False, True)))


@pytest.fixture(scope="module")
def kernels():
    """The extension, built (or found in its cache folder) once for the module."""
    try:
        build.load()
    except build.BuildError as exc:  # pragma: no cover - a machine without g++
        pytest.skip(f"C++ kernels not built here: {exc}")


@pytest.mark.parametrize("bits,group,sym,act", LAYOUT_GRID,
                         ids=[f"b{b}-g{g}-{'sym' if s else 'asym'}{'-act' if a else ''}"
                              for b, g, s, a in LAYOUT_GRID])
def test_layout_reads_back_the_weight(bits, group, sym, act):
    """Repacking loses nothing: every weight, scale and zero comes back, in the original row
    order, including segments that end mid-unit and a partial last column block."""
    w = random_packed(bits, group, sym, act, 150, 80, seed=bits + group)
    lay = layout.repack(w)
    assert lay.qdata.shape[0] == 2 and lay.qdata.shape[2] == layout.BLOCK_N
    assert (lay.perm is not None) == (act and group != -1)  # one group: no order to restore
    assert (lay.zeros is None) == sym
    assert torch.equal(layout.unpack_layout(lay, bits), w.dequantize(torch.float64))


def test_sort_rows_keeps_a_monotonic_g_idx_in_place():
    perm, groups, rows = layout.sort_rows(torch.tensor([0, 0, 1, 1, 1, 3], dtype=torch.int32))
    assert perm is None and groups.tolist() == [0, 1, 3] and rows.tolist() == [2, 3, 1]
    perm, groups, rows = layout.sort_rows(torch.tensor([1, 0, 1, 0], dtype=torch.int32))
    assert perm.tolist() == [1, 3, 0, 2] and rows.tolist() == [2, 2]


def _isas() -> list[str]:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    found = ["generic"]
    if " avx2" in flags and " fma" in flags:
        found.append("avx2")
    if all(f" {f}" in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
        found.append("avx512")
    return found


def test_the_widest_instruction_set_is_chosen(kernels):
    assert build.isa() == _isas()[-1]


KERNEL_CASES = [(4, 128, True, False, 256, 200), (4, 48, False, True, 172, 72),
                (3, 7, False, True, 150, 64), (2, -1, True, False, 96, 130),
                (8, 32, False, False, 130, 40), (3, 64, True, False, 256, 16)]


@pytest.mark.parametrize("isa", _isas())
def test_every_kernel_body_matches_float64(kernels, isa):
    """Each compiled body (the CPU's own and the narrower ones) on both paths, at row counts
    that reach every tile remainder, in every activation dtype, with and without bias."""
    previous = build.use_isa(isa)
    try:
        for i, (bits, group, sym, act, K, N) in enumerate(KERNEL_CASES):
            w = random_packed(bits, group, sym, act, K, N, seed=i, bias=i % 2 == 0)
            lay = layout.repack(w)
            for kind, ms in ((ops.KIND_GEMV, (1, 2, 3, 4, 7)), (ops.KIND_GEMM, (1, 5, 6, 13))):
                for m, dtype in zip(ms, itertools.cycle((torch.float32, torch.bfloat16,
                                                         torch.float16))):
                    x = random_activations(m, K, dtype=dtype, seed=100 * i + m)
                    y = ops.qmatmul(x, lay.qdata, lay.scales, lay.zeros, lay.segs, lay.perm,
                                    w.bias, lay.vals_per_byte, lay.sym_zero, N, kind)
                    assert_matches_reference(y, x, w, context=f"{isa} case {i} kind {kind} M={m}")
    finally:
        build.use_isa(previous)


def test_an_unknown_instruction_set_is_refused(kernels):
    with pytest.raises(RuntimeError, match="not compiled in or not supported"):
        build.use_isa("sve")


def test_serves_cpu_layers_by_default(kernels):
    """Ranked above the torch reference on the CPU: a layer bound without naming a backend
    gets cpu, and its output matches float64."""
    w = random_packed(4, 128, False, True, 256, 96, seed=7, bias=True)
    q = QuantLinear.from_packed(w, act_dtype=torch.float32)
    assert q.binding.backend.name == "cpu", q.binding.explain()
    x = random_activations(2, 3, 256, dtype=torch.float32, seed=8)
    assert_matches_reference(q(x), x, w)


def test_policy_gemv_for_decode_gemm_above(kernels):
    w = random_packed(4, 64, True, False, 128, 64, seed=9)
    q = QuantLinear.from_packed(w, backend="cpu", act_dtype=torch.float32)
    paths = q.binding.prepared.policy.paths(EXPLAIN_M)
    assert paths[1] == paths[16] == policy.GEMV and paths[64] == paths[4096] == policy.GEMM
    assert q.binding.prepared.policy.path_for(policy.GEMM_ABOVE_M) == policy.GEMV
    assert q.binding.prepared.policy.path_for(policy.GEMM_ABOVE_M + 1) == policy.GEMM


def test_gemm_threshold_option_moves_the_switch(kernels):
    w = random_packed(4, 64, True, False, 128, 64, seed=9)
    backend = get_registry().get("cpu")
    options = CpuOptions.parse({"gemm_threshold": "8"}, "cpu")
    p = backend.prepare(w, DeviceInfo.of("cpu"), LayerSpec.of(w, torch.float32), options)
    assert p.gemm_above == 8 and p.policy.path_for(8) == policy.GEMV
    assert p.policy.path_for(9) == policy.GEMM
    assert policy.kernel_policy(0).paths(EXPLAIN_M) == {m: policy.GEMM for m in EXPLAIN_M}
    x = random_activations(16, 128, dtype=torch.float32, seed=1)
    assert_matches_reference(backend.qmatmul(x, p, None), x, w)


def test_options_are_typed_and_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTQ_CPU_BUILD_DIR", str(tmp_path))
    assert CpuOptions.parse(None, "cpu").build_dir == tmp_path
    assert CpuOptions.parse({"build_dir": "/x"}, "cpu").build_dir.as_posix() == "/x"
    with pytest.raises(OptionsError, match="gemm_threshold=-1 must be >= 0"):
        CpuOptions.parse({"gemm_threshold": -1}, "cpu")
    with pytest.raises(OptionsError, match="cannot be read as int"):
        CpuOptions.parse({"gemm_threshold": "many"}, "cpu")
    with pytest.raises(OptionsError, match="has no option 'threads'"):
        CpuOptions.parse({"threads": 2}, "cpu")


def test_build_folder_is_keyed_by_sources_and_overridable(tmp_path):
    assert build.build_dir(tmp_path) == tmp_path
    default = build.build_dir()
    assert build.source_hash() in default.name and "+" not in default.name


@pytest.mark.filterwarnings("ignore:gptq cpu backend")
def test_int4_fallback_matches_float64():
    """torch's int4 kernel, as served for bf16 layers when nothing can be compiled: sym and
    asym, act-order rows sorted at load, bias."""
    for i, (group, sym, act) in enumerate(((128, True, False), (32, False, True), (64, True, True))):
        w = random_packed(4, group, sym, act, 256, 48, seed=i, bias=i != 1)
        prepared = plugin._fallback(w, "test: no compiler", torch.bfloat16)
        assert prepared.layout is None and "no compiler" in prepared.policy.path_for(1)
        for m in (1, 5):
            x = random_activations(m, 256, dtype=torch.bfloat16, seed=m)
            assert_matches_reference(plugin.gptq_qmatmul(x, prepared, w.bias), x, w)


@pytest.mark.filterwarnings("ignore:gptq cpu backend")
def test_int4_fallback_refuses_what_torch_cannot_take():
    assert "3-bit" in fallback.int4_reason(3, 128, 256)
    assert "group size 48" in fallback.int4_reason(4, 48, 192)
    assert "not divisible" in fallback.int4_reason(4, 128, 160)
    assert "float32 activations" in fallback.int4_reason(4, 128, 256, torch.float32)
    with pytest.raises(NotSupportedError, match="cannot serve it: 8-bit"):
        plugin._fallback(random_packed(8, 128, True, False, 256, 32), "test: no compiler",
                         torch.bfloat16)
    with pytest.raises(NotSupportedError, match="cannot serve it: float16 activations"):
        plugin._fallback(random_packed(4, 128, True, False, 256, 32), "test: no compiler",
                         torch.float16)


def test_without_a_compiler_4bit_uses_torch_int4_and_the_rest_the_next_backend(tmp_path):
    """A fresh process whose C++ compiler does not exist: the build fails in one line, 4-bit
    bf16 layers are served through torch's int4 kernel, 3-bit and fp32 ones by the torch
    reference."""
    script = textwrap.dedent("""
        import warnings, torch
        from gptq_core import QuantLinear
        from gptq_core.testing import random_packed, random_activations, assert_matches_reference
        from gptq_backends.cpu_kernels import build
        print("problems:", build.toolchain_problems())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w4 = random_packed(4, 128, False, True, 256, 64, seed=1)
            q4 = QuantLinear.from_packed(w4, act_dtype=torch.bfloat16)
        print("warning:", [str(c.message) for c in caught if "cpu backend" in str(c.message)])
        print("4-bit:", q4.binding.backend.name, q4.binding.prepared.policy.path_for(1))
        x = random_activations(3, 256, dtype=torch.bfloat16, seed=2)
        assert_matches_reference(q4(x), x, w4)
        q3 = QuantLinear.from_packed(random_packed(3, 128, True, False, 256, 64), act_dtype=torch.bfloat16)
        print("3-bit:", q3.binding.backend.name)
        print("fp32:", QuantLinear.from_packed(w4, act_dtype=torch.float32).binding.backend.name)
    """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), GPTQ_CPU_BUILD_DIR=str(tmp_path),
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    assert "not found: install g++ (or set CXX)" in lines["problems"]
    assert "4-bit bfloat16 layers use torch's int4 CPU kernel" in lines["warning"]
    assert lines["4-bit"].startswith(f"cpu {policy.INT4} (C++ kernels not built: C++ compiler")
    assert lines["3-bit"] == lines["fp32"] == "torch"


def test_probe_reports_without_building(monkeypatch):
    monkeypatch.setattr(build, "toolchain_problems", lambda: ["ninja not found: pip install ninja"])
    cpu = DeviceInfo.of("cpu")
    assert plugin.gptq_probe(cpu, None) == []
    assert plugin.gptq_probe(cpu, LayerSpec(4, 128, 256, 64, act_dtype=torch.bfloat16)) == []
    (reason,) = plugin.gptq_probe(cpu, LayerSpec(2, 128, 256, 64, act_dtype=torch.bfloat16))
    assert reason.startswith("C++ kernels not built (ninja not found") and "2-bit" in reason
