"""The conformance suite itself: it passes a correct backend and catches broken ones.

Each test registers a small backend (delegating to the torch reference, with or without an
injected bug) in the process-wide registry under its own name, runs the suite against it in
process with pytester (quick grid, tiny capabilities), and checks the outcome counts.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import pytest
import torch

from gptq_core import (BackendOptions, Capabilities, DeviceInfo, DispatchPolicy, get_registry,
                       hookimpl, option, selector)
from gptq_core.testing import StubBackend

pytest_plugins = ("pytester",)

TINY = Capabilities(
    device_kinds=frozenset({"cpu"}), bits=(4,), group_sizes=(128,), asym=False,
    desc_act=False, act_dtypes=(torch.float32,), training=False, compile=False,
)


def _branches_on_values(tp, x, p, b):
    """Right numbers, but the path is picked by reading the data: a host sync, and a graph
    break that torch.compile(fullgraph=True) refuses."""
    if bool(x.isfinite().all()):
        return tp.gptq_qmatmul(x, p, b)
    return tp.gptq_qmatmul(x.clone(), p, b)  # as if non-finite rows took a safer path


BUGS = {
    # name -> qmatmul(torch_plugin, x, prepared, bias) with that bug; None: no bug
    None: lambda tp, x, p, b: tp.gptq_qmatmul(x, p, b),
    "off-by-bias": lambda tp, x, p, b: tp.gptq_qmatmul(x, p, b) + (1e-2 if b is None else 0),
    "small-error": lambda tp, x, p, b: tp.gptq_qmatmul(x, p, b) * (1 + 1e-3 * (x.shape[0] >= 16)),
    "drops-nan": lambda tp, x, p, b: torch.nan_to_num(tp.gptq_qmatmul(x, p, b)),
    "mutates-input": lambda tp, x, p, b: tp.gptq_qmatmul(x.index_fill_(1, torch.tensor([0]), 0.5),
                                                          p, b),
    "probe-refuses-g128": lambda tp, x, p, b: tp.gptq_qmatmul(x, p, b),  # see the probe
    "branches-on-values": _branches_on_values,
}
COMPILABLE = replace(TINY, compile=True)


def meta_backend(name: str, caps: Capabilities = TINY, bug: str | None = None,
                 xfail: dict | None = None) -> StubBackend:
    """The torch backend's kernel under another name, with at most one bug.

    ``no-custom-op``: right numbers through plain ATen (StubBackend's default), which
    torch.compile cannot treat as one opaque kernel.
    """
    from gptq_backends.torch_ref import plugin as tp

    def probe(device, spec):
        if bug == "probe-refuses-g128" and spec is not None and spec.group_size == 128:
            return ["group size 128 is refused at run time"]
        return []

    parts = {} if bug == "no-custom-op" else {
        "pack": lambda w, d, s: tp.gptq_pack(weight=w, device=d, spec=s),
        "qmatmul": lambda x, p, b: BUGS[bug](tp, x, p, b),
    }
    backend = StubBackend(name, caps, {"cpu": -100}, probe=probe, distribution="meta-tests",
                          **parts)
    if xfail is not None:
        backend.CONFORMANCE_XFAIL = xfail
    return backend


@pytest.fixture(scope="session")
def torch_warm() -> None:
    """Import torch's lazily loaded compile and opcheck machinery before pytester snapshots
    sys.modules: re-importing it inside an in-process run would register its ops twice."""
    from gptq_core import QuantLinear
    from gptq_core.testing import random_packed

    layer = QuantLinear.from_packed(random_packed(4, 32, in_features=64, out_features=8),
                                    backend="torch", act_dtype=torch.float32, mode="training")
    x = torch.randn(2, 64, requires_grad=True)
    b = layer.binding
    torch.library.opcheck(torch.ops.gptq_torch.qmatmul.default,
                          (x, b.prepared.qweight, b.prepared.zeros, b.prepared.scales,
                           b.prepared.g_idx, None, 4))
    torch.compile(layer, fullgraph=True, backend="aot_eager")(x.detach())
    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True)(x.detach())  # inductor, as test_compile_replay
    torch._dynamo.reset()


@pytest.fixture
def suite(pytester, torch_warm):
    """Run the suite against a meta_backend: suite(backend, *args, cls_body="") -> RunResult."""
    registered: list[str] = []

    def run(backend: StubBackend, *args: str, cls_body: str = "", extra: str = ""):
        reg = get_registry()
        reg.register(backend, name=backend.name)
        registered.append(backend.name)
        selector.clear_cache()
        pytester.makepyfile(test_meta=(
            "from gptq_conformance import BackendConformance\n"
            f"{extra}\n"
            "class TestMeta(BackendConformance):\n"
            f"    backend = {backend.name!r}\n"
            "    quick = True\n"
            f"{cls_body}\n"
        ))
        return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist", *args)

    yield run
    for name in registered:
        get_registry().unregister(name)
    selector.clear_cache()


def test_correct_backend_passes_with_limits_checked(suite):
    result = suite(meta_backend("meta_ok"), "-v")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0, result.stdout.str()
    assert outcomes["passed"] > 20
    result.stdout.no_fnmatch_line("*error*")
    # tiny capabilities: compile and training checks are placeholders, refused as limits
    collected = item_names(result)
    assert "test_declared_limit[limit-compile]" in collected
    assert "test_declared_limit[limit-training]" in collected
    assert "test_declared_limit[limit-bits3]" in collected
    assert "test_declared_limit[limit-group64]" in collected


def item_names(result) -> set[str]:
    """Item names of a ``-v`` run's output."""
    return {line.split("::")[-1].split(" ")[0] for line in result.outlines if "::" in line}


@pytest.mark.parametrize(
    ("bug", "failing"),
    [
        ("off-by-bias", "test_qmatmul"),
        ("small-error", "test_qmatmul"),
        ("mutates-input", "test_no_mutation"),
        ("drops-nan", "test_nan_inf_propagate"),
        ("no-custom-op", "test_opcheck"),
        ("probe-refuses-g128", "test_qmatmul"),
    ],
)
def test_suite_catches_bug(suite, bug, failing):
    result = suite(meta_backend(f"meta_{bug.replace('-', '_')}", bug=bug), "-rf", "-v")
    assert result.ret != 0
    failed = [line for line in result.outlines if line.startswith("FAILED")]
    assert any(failing in line for line in failed), result.stdout.str()


def test_compilable_backend_gets_compiled_replay_and_a_reasoned_graph_skip(suite):
    result = suite(meta_backend("meta_compilable", caps=COMPILABLE), "-v", "-rs")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0, result.stdout.str()
    collected = item_names(result)
    assert "test_compile_replay[b4-g128-sym-noact-fp32-K172xN32-bias]" in collected
    assert "test_cuda_graph_capture[not-applicable]" in collected
    assert "test_declared_limit[limit-compile]" not in collected
    result.stdout.fnmatch_lines(["*test_compile_replay*PASSED*",
                                 "*SKIPPED*torch.cuda.graph capture needs a CUDA*"])


def test_compiled_replay_catches_a_branch_on_values(suite):
    result = suite(meta_backend("meta_branches", caps=COMPILABLE, bug="branches-on-values"),
                   "-rf", "-v")
    assert result.ret != 0
    failed = [line for line in result.outlines if line.startswith("FAILED")]
    assert any("test_compile_replay" in line for line in failed), result.stdout.str()


def test_declared_xfail_with_reason_turns_failure_into_xfail(suite):
    backend = meta_backend("meta_xfail", bug="small-error",
                           xfail={"test_qmatmul[*]": "M >= 16 is 0.1% off (issue 7)"})
    result = suite(backend, "-rx")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0, result.stdout.str()
    assert outcomes["xfailed"] >= 1
    result.stdout.fnmatch_lines(["*M >= 16 is 0.1% off (issue 7)*"])


def test_xfail_of_a_passing_case_fails_strictly(suite):
    result = suite(meta_backend("meta_xpass"),
                   cls_body="    xfail = {'test_identity': 'claimed broken'}")
    assert result.parseoutcomes().get("failed", 0) == 1, result.stdout.str()
    result.stdout.fnmatch_lines(["*XPASS(strict)*"])


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        ("    xfail = {'test_qmatmul[*]': ''}", "*has no reason*"),
        ("    xfail = {'test_qmatmul[b5-*]': 'no such case'}", "*matches no conformance case*"),
        ("    skip = {'test_identity': '   '}", "*has no reason*"),
        ("    def test_qmatmul(self, gptq_suite, case):\n        pass",
         "*replaces a conformance check*"),
        ("    test_compile = None", "*replaces a conformance check*"),
    ],
)
def test_bad_declarations_fail_collection(suite, declaration, message):
    name = f"meta_decl_{zlib.crc32(declaration.encode())}"
    result = suite(meta_backend(name), cls_body=declaration)
    assert result.ret != 0
    result.stdout.fnmatch_lines([message])


def test_deselecting_cases_fails_the_run(suite):
    result = suite(meta_backend("meta_deselect"), "-k", "not test_no_mutation")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*cases were removed from the run: test_no_mutation*"])


def test_partial_run_is_allowed_when_asked(suite):
    result = suite(meta_backend("meta_partial"), "-k", "test_identity", "--gptq-partial")
    assert result.ret == 0, result.stdout.str()
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == 1 and outcomes["deselected"] > 20 and "failed" not in outcomes


def test_declared_skip_with_reason_is_allowed(suite):
    result = suite(meta_backend("meta_skip"),
                   cls_body="    skip = {'test_opcheck[*]': 'opcheck hangs on this box'}")
    outcomes = result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()
    assert outcomes["skipped"] >= 1


def test_runtime_skip_is_a_failure(suite):
    body = ("    @pytest.fixture(autouse=True)\n"
            "    def _skip_opcheck(self, request):\n"
            "        if 'opcheck' in request.node.name:\n"
            "            pytest.skip('not today')\n")
    result = suite(meta_backend("meta_rtskip"), cls_body=body, extra="import pytest")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*was skipped*not today*declared*"])


def test_unknown_backend_is_a_clear_collection_error(pytester, torch_warm):
    pytester.makepyfile(test_meta=(
        "from gptq_conformance import BackendConformance\n"
        "class TestMeta(BackendConformance):\n"
        "    backend = 'no_such_backend'\n"
    ))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*no backend named 'no_such_backend' is installed*"])


def test_backend_that_cannot_run_here_fails_with_its_reasons(suite):
    gpu_only = replace(TINY, device_kinds=frozenset({"cuda"}))
    result = suite(meta_backend("meta_gpu", caps=gpu_only))
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*FAILED*test_device_supported*"])
    assert result.parseoutcomes()["failed"] == 1


@dataclass(frozen=True)
class PathOptions(BackendOptions):
    wrong_above: int | None = option(None, "rows above which the second (1% off) path serves")


class TwoPathBackend(StubBackend):
    """The torch kernel, plus a second path that is 1% off and serves only the rows an option
    sends to it (as marlin's dequant_threshold sends calls to dequantize + cuBLAS)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, TINY, {"cpu": -100}, distribution="meta-tests")
        self.info = replace(self.info, options=PathOptions)

    @hookimpl
    def gptq_pack(self, weight, device, spec, options):
        from gptq_backends.torch_ref import plugin as tp

        prepared = tp.gptq_pack(weight=weight, device=device, spec=spec)
        if options.wrong_above is None:
            return prepared
        return replace(prepared, policy=DispatchPolicy.from_thresholds(
            (options.wrong_above, "torch"), (None, "wrong")))

    @hookimpl
    def gptq_qmatmul(self, x, prepared, bias):
        from gptq_backends.torch_ref import plugin as tp

        y = tp.gptq_qmatmul(x, prepared, bias)
        rows = x.numel() // x.shape[-1]
        return y * 1.01 if prepared.policy.path_for(rows) == "wrong" else y


def test_backend_option_reaches_prepare_and_every_bind(suite):
    """Defaults pass; wrong_above=0 sends every call down the wrong path, and both the hook
    checks (prepare) and the QuantLinear checks (bind) catch it."""
    result = suite(TwoPathBackend("meta_paths"), "-q")
    assert result.ret == 0, result.stdout.str()
    result = suite(TwoPathBackend("meta_paths_forced"), "-rf", "-v",
                   "--gptq-backend-option", "wrong_above=0")
    failed = " ".join(line for line in result.outlines if line.startswith("FAILED"))
    for check in ("test_qmatmul", "test_quant_linear_inputs", "test_nan_inf_propagate"):
        assert check in failed, result.stdout.str()
    assert "test_identity" not in failed and "test_declared_limit" not in failed


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("wrong_abov=0", "*--gptq-backend-option: backend 'meta_opt_*' has no option 'wrong_abov' "
                         "(its options: wrong_above)*"),
        ("wrong_above=many", "*wrong_above='many' cannot be read as int*"),
        ("wrong_above", "*--gptq-backend-option 'wrong_above' is not of the form NAME=VALUE*"),
    ],
)
def test_bad_backend_option_fails_collection_in_one_line(suite, item, message):
    result = suite(TwoPathBackend(f"meta_opt_{zlib.crc32(item.encode())}"),
                   "--gptq-backend-option", item)
    assert result.ret != 0
    result.stdout.fnmatch_lines([message])
    result.stdout.no_fnmatch_line("*During handling of the above exception*")
    assert result.parseoutcomes().get("passed", 0) == 0


def test_shapes_option_replaces_the_grids_shapes_rounded_to_the_tiles():
    from gptq_conformance.cases import build_plan, parse_shapes

    caps = replace(TINY, k_multiple=64, n_multiple=128)
    plan = build_plan(caps, [], quick=True, shapes=parse_shapes("300x200, 64x128"))
    assert {(c.in_features, c.out_features) for c in plan.families["qmatmul"]} == {(320, 256), (64, 128)}
    assert all(c.out_features % 128 == 0 for c in plan.families["cuda_graph"] + plan.families["compile"])
    with pytest.raises(ValueError, match="'4096by256' is not KxN"):
        parse_shapes("4096by256")


def test_bad_shapes_option_fails_collection_in_one_line(suite):
    result = suite(TwoPathBackend("meta_shapes"), "--gptq-shapes", "0x64")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*--gptq-shapes item '0x64' is not KxN*"])
    result.stdout.no_fnmatch_line("*During handling of the above exception*")


def test_wide_backend_gets_hundreds_of_cases():
    """The full grid of a backend declaring everything (torch) is hundreds of cases."""
    from gptq_conformance.cases import build_plan

    torch_backend = get_registry().get("torch")
    plan = build_plan(torch_backend.info.capabilities, [], quick=False)
    qm = plan.families["qmatmul"]
    assert len(qm) >= 400
    assert {c.bits for c in qm} == {2, 3, 4, 8}
    assert {c.group_size for c in qm} >= {-1, 32, 64, 128, 48}
    assert any(c.in_features == 172 and c.out_features == 32 for c in qm)
    assert {0, 1, 2, 7, 16, 64} <= set(qm[0].m_values)
    quick = build_plan(torch_backend.info.capabilities, [], quick=True)
    assert len(quick.families["qmatmul"]) < len(qm) / 4


def test_tile_constraints_round_shapes_and_become_limits():
    from gptq_conformance.cases import build_plan

    caps = replace(TINY, k_multiple=64, n_multiple=64, k_divisible_by_group=True)
    plan = build_plan(caps, [], quick=False)
    for case in plan.families["qmatmul"]:
        assert case.in_features % 64 == 0 and case.out_features % 64 == 0
        assert case.in_features % case.group_size == 0
    limits = {c.id: c for c in plan.families["limit"]}
    assert {"limit-K288", "limit-N96", "limit-K192-g128"} <= set(limits), sorted(limits)
    for case in limits.values():  # every generated limit really is outside the capabilities
        device = case.device or DeviceInfo.of("cpu")
        assert caps.layer_reasons(case.spec) or caps.device_reasons(device), case.id


def test_limit_cases_of_the_tiny_backend():
    from gptq_conformance.cases import limit_cases

    ids = {c.id for c in limit_cases(TINY)}
    assert {"limit-bits2", "limit-bits3", "limit-bits8", "limit-bits5", "limit-group32",
            "limit-asym", "limit-desc_act", "limit-dtype-fp16", "limit-dtype-fp64",
            "limit-training", "limit-compile", "limit-device-cuda"} <= ids


def test_capture_cases_follow_the_device():
    """On CUDA: captures per bits x act-order, 4-bit first, with and without bias; elsewhere
    only two small compiled cases, and the CUDA graph family says why it is empty."""
    from gptq_conformance.cases import CAPTURE, CPU_COMPILED, build_plan

    caps = get_registry().get("torch").info.capabilities
    for quick in (False, True):
        cuda = build_plan(caps, [], quick=quick, device_type="cuda")
        graphs = cuda.families["cuda_graph"]
        assert len(graphs) == CAPTURE["graph_limit"][quick]
        assert graphs[0].bits == 4 and {c.desc_act for c in graphs[:2]} == {False, True}
        assert {c.bias for c in graphs} == {False, True}
        assert all(c.m_values == CAPTURE["m_values"] for c in graphs)
        assert cuda.families["compile_replay"] == graphs[:CAPTURE["compiled_limit"][quick]]
        assert "cuda_graph" not in cuda.reasons
        cpu = build_plan(caps, [], quick=quick, device_type="cpu")
        assert cpu.families["cuda_graph"] == [] and "CUDA" in cpu.reasons["cuda_graph"]
        compiled = cpu.families["compile_replay"]
        assert [(c.bits, c.group_size) for c in compiled] == [(4, 128), (3, -1)]
        assert all(c.m_values == CPU_COMPILED["m_values"] for c in compiled)
    refused = build_plan(TINY, [], quick=False, device_type="cuda")
    assert refused.families["cuda_graph"] == refused.families["compile_replay"] == []
    assert not refused.reasons  # compile=False: the declared limit explains it


def test_capture_reaches_every_path_of_the_policy():
    from gptq_conformance.graphs import MAX_CAPTURE_M, capture_ms
    from gptq_core.policy import DispatchPolicy

    policy = DispatchPolicy.from_thresholds((8, "gemv"), (256, "mma"), (65536, "wide"),
                                            (None, "dequant"))
    ms = capture_ms((0, 1, 7), policy)
    assert ms == (1, 7, 8, 9, 256, 257, MAX_CAPTURE_M)
    assert {policy.path_for(m) for m in ms} == {"gemv", "mma", "wide"}
    assert capture_ms((1, 7), DispatchPolicy.single("torch")) == (1, 7)


_scratch_lib = torch.library.Library("gptq_conformance_scratch_test", "DEF")
_scratch_lib.define("scaled(Tensor x, Tensor ws, Tensor other, bool touch_other) -> Tensor")


def _scaled(x, ws, other, touch_other):
    ws.copy_(x[: ws.numel()])  # the scratch write opcheck's schema test objects to
    if touch_other:
        other.add_(1)
    return x * 2


_scratch_lib.impl("scaled", _scaled, "CPU")


@torch.library.register_fake("gptq_conformance_scratch_test::scaled")
def _scaled_fake(x, ws, other, touch_other):
    return torch.empty_like(x)


def test_declared_scratch_is_exempt_and_every_other_argument_still_checked():
    from gptq_conformance.ops import opcheck_with_scratch

    op = torch.ops.gptq_conformance_scratch_test.scaled.default
    args = lambda touch: (torch.randn(8), torch.zeros(4), torch.zeros(3), touch)  # noqa: E731
    with pytest.raises(Exception, match="not defined as mutable but was mutated"):
        torch.library.opcheck(op, args(False))  # undeclared: the schema test fails
    opcheck_with_scratch(op, args(False), {}, ("ws",))
    with pytest.raises(AssertionError, match="mutated argument 'other'"):
        opcheck_with_scratch(op, args(True), {}, ("ws",))
    with pytest.raises(AssertionError, match=r"scratch argument\(s\) \['slots'\]"):
        opcheck_with_scratch(op, args(False), {}, ("slots",))


def test_route_cases_are_model_shapes_on_cuda_only():
    """On CUDA: 4- and 8-bit g128 fp16 cases on the model shapes, fitted to the tiles, their
    batch sizes completed by the policy at run time; elsewhere none, with the reason."""
    from gptq_conformance.cases import ROUTES, build_plan

    caps = get_registry().get("torch").info.capabilities
    for quick in (False, True):
        cases = build_plan(caps, [], quick=quick, device_type="cuda").families["routes"]
        assert [(c.bits, c.in_features, c.out_features) for c in cases] == [
            (b, K, N) for b in ROUTES["bits"] for K, N in ROUTES["shapes"][quick]]
        assert all(c.group_size == 128 and c.sym and not c.desc_act and c.dtype == torch.float16
                   and c.m_values == ROUTES["m_values"] for c in cases)
        cpu = build_plan(caps, [], quick=quick, device_type="cpu")
        assert cpu.families["routes"] == [] and "CUDA only" in cpu.reasons["routes"]
    tiled = replace(TINY, k_multiple=96, n_multiple=80, k_divisible_by_group=True)
    fitted = build_plan(tiled, [], quick=True, device_type="cuda").families["routes"]
    assert [(c.in_features, c.out_features, c.dtype) for c in fitted] == [(4224, 14400, torch.float32)]
