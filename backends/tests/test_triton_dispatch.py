"""The triton backend's options, dispatch policy, workspace and call paths (docs/DESIGN.md §11-12).

Kernels run under Triton's interpreter on a machine without a GPU (a fixture sets
TRITON_INTERPRET=1 for this module), on tiny shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from gptq_core import OptionsError, QuantLinear, get_registry, selector  # noqa: E402
from gptq_core.policy import EXPLAIN_M  # noqa: E402
from gptq_core.testing import random_packed  # noqa: E402
from gptq_backends.triton_kernels import (  # noqa: E402
    configs, dispatch, launch, ops, scratch, target,
)
from gptq_backends.triton_kernels.configs import KernelConfig  # noqa: E402
from gptq_backends.triton_kernels.options import DEFAULT_CACHE_DIR, TritonOptions  # noqa: E402

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
DEVICE = torch.device("cuda:0" if ON_GPU else "cpu")
#: The default rules whatever the machine: no tuning, no shipped table, no user table (a folder
#: that cannot exist, so nothing is read or written).
OPTIONS = TritonOptions(autotune=False, shipped_configs=False,
                        cache_dir=Path(os.devnull) / "no-tuned-tables")


pytestmark = pytest.mark.usefixtures("triton_interpreter")


def weight(K=256, N=48, bits=4, group=128, act=False, bias=True, seed=0):
    return random_packed(bits, group, True, act, K, N, seed=seed, bias=bias, device=DEVICE)


def reference(x, w):
    ref = x.double() @ w.dequantize(torch.float64)
    return ref + w.bias.double() if w.bias is not None else ref


def rel_err(y, ref) -> float:
    return float((y.double() - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------- options
def test_options_parse_values_environment_and_errors(monkeypatch):
    for name in ("GPTQ_TRITON_AUTOTUNE", "GPTQ_TRITON_SHIPPED", "GPTQ_TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert TritonOptions.parse(None) == TritonOptions(True, True, None)
    assert TritonOptions.parse(None).tuned_dir == DEFAULT_CACHE_DIR
    o = TritonOptions.parse({"autotune": "off", "shipped_configs": "no", "cache_dir": "/tmp/t"})
    assert o == TritonOptions(False, False, o.cache_dir) and str(o.tuned_dir) == "/tmp/t"
    # one documented environment fallback per field, one meaning of true and false
    monkeypatch.setenv("GPTQ_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("GPTQ_TRITON_SHIPPED", "false")
    monkeypatch.setenv("GPTQ_TRITON_CACHE_DIR", "/tmp/tuned")
    o = TritonOptions.parse(None)
    assert not o.autotune and not o.shipped_configs and str(o.cache_dir) == "/tmp/tuned"
    assert TritonOptions.parse({"autotune": True}).autotune  # a value given wins
    monkeypatch.setenv("GPTQ_TRITON_AUTOTUNE", "maybe")
    with pytest.raises(OptionsError, match="GPTQ_TRITON_AUTOTUNE='maybe' is not a yes/no"):
        TritonOptions.parse(None)
    with pytest.raises(OptionsError, match="no option 'autotun'"):
        TritonOptions.parse({"autotun": False}, "triton")


def test_backend_declares_its_options_and_binding_passes_them(tmp_path, monkeypatch):
    monkeypatch.delenv("GPTQ_TRITON_SHIPPED", raising=False)
    backend = get_registry().get("triton")
    assert backend.info.options is TritonOptions and backend.pack_takes_options
    names = [row["name"] for row in TritonOptions.fields_table()]
    assert names == ["autotune", "shipped_configs", "cache_dir"]
    w = weight()
    opts = selector.parse_backend_options({"triton": {"autotune": "off", "cache_dir": str(tmp_path)}})
    layer = QuantLinear.from_packed(w, backend="triton", act_dtype=None)
    layer.bind(torch.float16, options=opts)
    p = layer.binding.prepared
    assert p.options == TritonOptions(False, True, tmp_path)


def test_no_environment_reads_but_the_interpreter_flag():
    """Options are read by the core's parser; the backend reads only Triton's own variable."""
    import pathlib
    import re

    root = pathlib.Path(dispatch.__file__).parent
    hits = []
    for path in sorted(root.rglob("*.py")):
        for line in path.read_text().splitlines():
            if re.search(r"os\.environ|getenv", line):
                hits.append(f"{path.name}: {line.strip()}")
    assert hits == ['target.py: return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")']


# ---------------------------------------------------------------------------- policy
def test_policy_of_the_default_rules():
    p = dispatch.prepare(weight(), DEVICE, OPTIONS)
    paths = p.policy.paths(EXPLAIN_M)
    blas = dispatch.blas_name(DEVICE)
    assert paths == {
        1: "triton:splitk 16x64 (default rule)",
        16: "triton:splitk 16x64 (default rule)",
        64: "triton:splitk 32x128 (default rule)",
        256: "triton:dot 128x128 (default rule)",
        4096: f"triton:dequant+{blas} (default rule)",
    }
    # the same policy drives the calls: each bucket's configuration is known before any call
    for m in EXPLAIN_M:
        cfg = p.configs[(configs.m_bucket(m), torch.float16)]
        assert p.policy.path_for(m).startswith(cfg.path_name(blas))
    # 3-bit: dequantize + matmul from M > 64 (its 128-row tiles do not fit shared memory)
    p3 = dispatch.prepare(weight(bits=3), DEVICE, OPTIONS)
    assert p3.policy.path_for(256).startswith("triton:dequant+")


def test_policy_shows_tuned_entries_and_calls_follow_them(tmp_path):
    """A tuned table for this GPU and shape (here the interpreter's, in the user's folder) sets
    the path of its buckets; the others keep the default rule."""
    w = weight(K=256, N=48)
    dtype = torch.float16
    key = configs.shape_key(4, 128, dtype, 256, 48, 2)
    tuned = KernelConfig("fused", 16, 32, 2, 4, 2)
    gpu, _ = target.device_props(DEVICE)
    configs.ConfigTable(gpu, shipped=False, user_dir=tmp_path).store(key, tuned, {"x": 1.0})
    opts = TritonOptions(autotune=False, shipped_configs=False, cache_dir=tmp_path)
    p = dispatch.prepare(w, DEVICE, opts)
    assert p.policy.path_for(2) == "triton:splitk 16x32 (tuned)"
    assert p.policy.path_for(1) == "triton:splitk 16x64 (default rule)"
    assert "M<=1: triton:splitk 16x64 (default rule); M<=2: triton:splitk 16x32 (tuned)" \
        in p.policy.describe()
    x = torch.randn(2, 256, dtype=dtype, device=DEVICE)
    y = ops.qmatmul(x, p, w.bias)
    assert p.plans[(2, dtype, True)].cfg == tuned
    assert rel_err(y, reference(x, w)) < 2e-3


def test_policy_announces_autotuning_on_a_gpu():
    """Autotuning happens at a bucket's first call; at bind time the policy says so."""
    w = weight()
    p = dispatch.prepare(w, DEVICE, TritonOptions(autotune=True, shipped_configs=False))
    if DEVICE.type == "cuda":
        assert p.policy.path_for(1).endswith("(default rule; autotuned at first call)")
        assert (1, torch.float16) not in p.configs
    else:  # the interpreter has nothing to time
        assert p.policy.path_for(1).endswith("(default rule)")


def test_explain_shows_the_paths():
    w = weight()
    layer = QuantLinear.from_packed(w, backend="triton", act_dtype=torch.float16)
    assert layer.binding.policy is layer.binding.prepared.policy
    assert "paths: M<=16: triton:splitk 16x64" in layer.binding.explain()


# ---------------------------------------------------------------------------- workspace
def _module_state() -> dict:
    return {"scratch": dict(scratch._shared), "props": dict(target._device_props),
            "tables": dict(configs._tables), "replaced": dict(ops._replaced)}


def test_workspace_belongs_to_the_prepared_weight():
    """Split-K calls of two M use the workspace reserved at prepare: no module-level state
    grows and no workspace is allocated while calling."""
    w = weight(K=1024, N=64, group=128, bias=False)
    p = dispatch.prepare(w, DEVICE, OPTIONS)
    need = dispatch.workspace_need(p, {1: [configs.default_config(1, 4)]})
    assert need[0] > 0 and p.scratch.holds(*need)  # the default M=1 path splits K here
    before, part = _module_state(), p.scratch.partials
    for m in (1, 5, 1):
        x = torch.randn(m, 1024, dtype=torch.float16, device=DEVICE)
        assert rel_err(ops.qmatmul(x, p, None), reference(x, w)) < 2e-3
        assert p.plans[(m, torch.float16, False)].split > 1
    after = _module_state()
    assert after.keys() == before.keys()
    for name in before:
        assert after[name] == before[name], f"module-level {name} changed during calls"
    assert p.scratch.partials is part and int(p.scratch.tickets.abs().sum()) == 0
    assert set(p.plans) == {(1, torch.float16, False), (5, torch.float16, False)}


def test_workspace_is_shared_and_only_grows_at_prepare():
    small = dispatch.prepare(weight(K=256, N=32, bias=False), DEVICE, OPTIONS)
    again = dispatch.prepare(weight(K=256, N=32, bias=False, seed=1), DEVICE, OPTIONS)
    assert again.scratch is small.scratch  # one per device while it is large enough
    need = small.scratch.partials.numel() + 1
    bigger = scratch.reserve(DEVICE, need, 1)
    assert bigger.partials.numel() >= need and scratch.current(DEVICE) is bigger
    assert small.scratch.partials.numel() < need  # earlier layers keep theirs


def test_a_split_larger_than_the_workspace_is_reduced():
    """A configuration met only at the call (e.g. another dtype) whose split needs more
    workspace than was reserved runs with a smaller split, still right."""
    w = weight(K=1024, N=64, bias=False)
    p = dispatch.prepare(w, DEVICE, OPTIONS)
    tiny = scratch.Scratch(torch.empty(64 * 16 * 2, dtype=torch.float32, device=DEVICE),
                           torch.zeros(64, dtype=torch.int32, device=DEVICE),
                           p.scratch.int16, p.scratch.float16)
    import dataclasses
    q = dataclasses.replace(p, scratch=tiny, plans={})
    x = torch.randn(1, 1024, dtype=torch.float16, device=DEVICE)
    y = ops.launch(x, q, None, KernelConfig("fused", 16, 64, 8, 4, 2))
    assert rel_err(y, reference(x, w)) < 2e-3
    plan = launch.Plan(x, q, None, KernelConfig("fused", 16, 64, 8, 4, 2))
    assert plan.split == 2  # 2 x 16 rows x 64 columns fit the 2048 partials


# ---------------------------------------------------------------------------- call paths
@pytest.mark.parametrize("act", (False, True))
@pytest.mark.parametrize("m", (1, 3, 300))
def test_eager_path_equals_the_custom_op(m, act):
    """The eager path (worked-out launch) and the traced path (custom op) give equal results,
    for the split-K, act-order and dequantize-once paths."""
    w = weight(K=256, N=48, act=act, seed=m)
    p = dispatch.prepare(w, DEVICE, OPTIONS)
    x = torch.randn(m, 256, dtype=torch.float16, device=DEVICE)
    eager = ops.qmatmul(x, p, w.bias)
    again = ops.qmatmul(x, p, w.bias)  # the kept plan, when M is small enough to keep one
    assert ((m, torch.float16, True) in p.plans) == (m <= ops.PLAN_MAX_M)
    o = p.options
    op = torch.ops.gptq_triton.qmatmul(x, p.qweight, p.qhigh, p.scales, p.zeros, p.perm, w.bias,
                                       p.bits, p.group_size, p.sub, p.in_features,
                                       p.out_features, p.k_pad, o.autotune, o.shipped_configs,
                                       str(o.cache_dir))
    assert torch.equal(eager, op) and torch.equal(eager, again)
    assert rel_err(eager, reference(x, w)) < 2e-3


def test_eager_calls_skip_the_custom_op_and_traces_use_it(monkeypatch):
    from gptq_conformance.ops import CustomOpRecorder

    w = weight()
    p = dispatch.prepare(w, DEVICE, OPTIONS)
    x = torch.randn(2, 256, dtype=torch.float16, device=DEVICE)
    ops.qmatmul(x, p, w.bias)
    plan = p.plans[(2, torch.float16, True)]
    monkeypatch.setattr(ops, "run", lambda *a: pytest.fail("a second call must reuse its plan"))
    monkeypatch.setattr(ops, "qmatmul_op", lambda *a: pytest.fail("no custom op when eager"))
    ops.qmatmul(x, p, w.bias)
    assert p.plans[(2, torch.float16, True)] is plan
    monkeypatch.undo()
    with CustomOpRecorder() as recorder:  # a dispatch mode: the op must show
        ops.qmatmul(x, p, w.bias)
    assert list(recorder.calls) == ["gptq_triton.qmatmul.default"]


def test_compile_fullgraph_sees_the_custom_op():
    w = weight()
    layer = QuantLinear.from_packed(w, backend="triton", act_dtype=torch.float16, mode="compile")
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 256, dtype=torch.float16, device=DEVICE)
    assert torch.equal(compiled(x), layer(x))
    torch._dynamo.reset()


def test_odd_calls_take_the_slow_path_and_keep_no_plan():
    w = weight()
    p = dispatch.prepare(w, DEVICE, OPTIONS)
    base = torch.randn(2, 257, dtype=torch.float16, device=DEVICE)
    x = base[:, 1:]  # 2-byte offset, row stride 257: not what a kept plan may serve
    y = ops.qmatmul(x, p, w.bias)
    assert not p.plans and rel_err(y, reference(x, w)) < 2e-3
    assert ops.qmatmul(x[:0], p, w.bias).shape == (0, 48)


def test_direct_launch_passes_what_triton_would():
    """The direct relaunch hands the compiled kernel's launcher every argument in Triton's
    parameter order, pointers as addresses, the varying ones replaced per call (checked with a
    stand-in for the compiled kernel: the real one needs a GPU, see
    benchmarks/triton_h200_check.py)."""
    w = weight(K=256, N=48, act=True)
    p = dispatch.prepare(w, DEVICE, OPTIONS)
    x = torch.randn(1, 256, dtype=torch.float16, device=DEVICE)
    plan = launch.Plan(x, p, w.bias, configs.default_config(1))
    qmm = plan.qmm
    calls = []

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *args):
            calls.append(args)

    gpu = torch.device("cuda", 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "interpreting", lambda: False)
        mp.setattr(launch, "_stream_getter", lambda: (lambda index: 1234 + index))
        qmm.direct = launch.Direct.of(Compiled(), qmm, gpu)
    assert qmm.direct is not None
    xs = torch.randn(1, 256, dtype=torch.float16, device=DEVICE)
    out = torch.empty(1, 48, dtype=torch.float16, device=DEVICE)
    qmm(xs, w.bias, out)
    (args,) = calls
    assert args[:9] == (*qmm.grid, 1234, "function", "metadata", None, None, None)
    values = {**qmm.args, "x_ptr": xs, "bias_ptr": w.bias, "out_ptr": out}
    names = qmm.kernel.arg_names
    expected = tuple(v.data_ptr() if isinstance(v, torch.Tensor) else v
                     for v in (values[n] for n in names))
    assert args[9:] == expected and len(names) == len(set(names))


def test_capturing_never_autotunes(monkeypatch):
    """Under CUDA-graph capture a bucket waiting for autotuning takes the default rule and keeps
    nothing, so the next eager call still tunes."""
    w = weight()
    p = dispatch.prepare(w, DEVICE, TritonOptions(autotune=True, shipped_configs=False))
    monkeypatch.setattr(dispatch, "bucket_config", lambda p, b, d: (None, dispatch.AUTOTUNE))
    monkeypatch.setattr(ops, "_capturing", lambda x: True)
    monkeypatch.setattr(ops, "tune", lambda *a: pytest.fail("tuned during capture"))
    x = torch.randn(1, 256, dtype=torch.float16, device=DEVICE)
    p.configs.clear()
    assert ops.choose(x, p) == (configs.default_config(1, 4), False)
    ops.qmatmul(x, p, None)
    assert not p.configs and not p.plans


def test_tuned_entries_written_by_autotune_serve_later_layers(tmp_path, monkeypatch):
    """What one layer tuned at its first call is in the process's table for the next layer of
    the same shape (and in the user's file for the next process). The GPU's part (a bucket no
    table holds waits for autotuning, ``tune`` times candidates) is stood in for."""
    def bucket_config(p, bucket, dtype):
        cfg = configs.table_for(p.gpu, p.options).lookup(dispatch.shape_key(p, dtype, bucket))
        return (cfg, dispatch.TUNED) if cfg else (None, dispatch.AUTOTUNE)

    winner = KernelConfig("fused", 16, 32, 2, 4, 2)
    monkeypatch.setattr(dispatch, "bucket_config", bucket_config)
    monkeypatch.setattr(ops, "tune", lambda x, p, bias: (winner, {winner.label(): 1.0}))
    opts = TritonOptions(autotune=True, shipped_configs=False, cache_dir=tmp_path)
    p = dispatch.prepare(weight(), DEVICE, opts)
    assert p.policy.path_for(1).endswith("(default rule; autotuned at first call)")
    x = torch.randn(1, 256, dtype=torch.float16, device=DEVICE)
    ops.qmatmul(x, p, None)
    assert p.configs[(1, torch.float16)] == winner
    monkeypatch.setattr(ops, "tune", lambda *a: pytest.fail("tuned twice"))
    q = dispatch.prepare(weight(seed=3), DEVICE, opts)
    assert q.policy.path_for(1) == "triton:splitk 16x32 (tuned)"
    ops.qmatmul(x, q, None)
    assert q.plans[(1, torch.float16, False)].cfg == winner
    gpu, _ = target.device_props(DEVICE)
    saved = json.loads((tmp_path / configs.gpu_file_name(gpu)).read_text())["entries"]
    assert saved[dispatch.shape_key(p, torch.float16, 1)]["config"]["block_n"] == 32
