"""The conformance checks, as a base class a backend's own tests subclass::

    from gptq_conformance import BackendConformance

    class TestMyKernel(BackendConformance):
        backend = "mykernel"
        xfail = {"test_qmatmul[b3-*]": "3-bit lands in 0.3, tracked in #12"}

Every check targets the backend by name (``Backend.prepare`` and
``QuantLinear.from_packed(..., backend=NAME)``, both with the run's ``--gptq-backend-option``
values), never the automatic choice, and compares with the float64 reference of
:mod:`gptq_core.testing` on fresh random data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from gptq_core import selector
from gptq_core.backend import ALL_DTYPES, policy_of
from gptq_core.device import DEVICE_KINDS
from gptq_core.errors import NoBackendError, NotSupportedError
from gptq_core.packing import SUPPORTED_BITS
from gptq_core.training import WeightSource, differentiable_qmatmul
from gptq_core.testing import (
    TOLERANCES,
    assert_matches_reference,
    changed,
    check_close,
    packed_tensors,
    random_activations,
    random_packed,
    snapshot,
    tensors_of,
)

from .cases import Case, LimitCase
from .context import SuiteContext
from .graphs import capture, capture_ms, warm_up
from .ops import CustomOpRecorder, opcheck_with_scratch, without_grad

#: Calls per batch size in the capture checks: cudagraph trees warm up on the first, record
#: on the second and replay from the third on; a captured graph replays as many fresh inputs.
REPLAYS = 4


def family(name: str) -> Callable:
    """Parametrize a check over the cases of family ``name`` (see cases.build_plan)."""

    def mark(fn: Callable) -> Callable:
        fn._gptq_family = name
        return fn

    return mark


def make_weight(ctx: SuiteContext, case: Case, salt: str = "w"):
    return random_packed(
        case.bits, case.group_size, case.sym, case.desc_act, case.in_features,
        case.out_features, seed=case.seed(ctx.seed, salt), bias=case.bias,
        zero_format=case.zero_format, device=ctx.torch_device,
    )


def make_x(ctx: SuiteContext, case: Case, *shape: int, salt: str = "x") -> torch.Tensor:
    return random_activations(*shape, dtype=case.dtype, seed=case.seed(ctx.seed, salt),
                              device=ctx.torch_device)


def strided_inputs(ctx: SuiteContext, case: Case) -> dict[str, torch.Tensor]:
    """Inputs a model hands a linear: batch dims, empty batches, views with odd strides."""
    K = case.in_features

    def r(*shape: int, salt: str) -> torch.Tensor:
        return make_x(ctx, case, *shape, salt=salt)

    return {
        "3d": r(2, 3, K, salt="3d"),
        "4d": r(2, 1, 2, K, salt="4d"),
        "empty-3d": r(2, 0, K, salt="e"),
        "every-other-column": r(5, 2 * K, salt="s")[:, ::2],
        "transposed": r(K, 4, salt="t").t(),
        "permuted-3d": r(3, K, 2, salt="p").permute(0, 2, 1),
        "expanded": r(1, K, salt="b").expand(3, K),
        "offset-view": r(7, K + 1, salt="o")[2:, 1:],
    }


class BackendConformance:
    """Subclass as ``TestSomething`` and set ``backend``; see the module docstring.

    ``xfail`` / ``skip`` map item-name patterns (``*`` wildcard) to the reason; they are merged
    with the backend plugin's ``CONFORMANCE_XFAIL`` / ``CONFORMANCE_SKIP``. ``quick`` and
    ``device`` override ``--gptq-quick`` / ``--gptq-device``.
    """

    __gptq_conformance__ = True
    backend: str | None = None
    xfail: dict[str, str] = {}
    skip: dict[str, str] = {}
    quick: bool | None = None
    device: str | None = None

    # ------------------------------------------------------------------ identity
    def test_identity(self, gptq_suite: SuiteContext) -> None:
        """The declared info is well formed (the selector and `gptq backends list` rely on it)."""
        info, caps = gptq_suite.backend.info, gptq_suite.backend.info.capabilities
        assert info.name == gptq_suite.name
        assert isinstance(info.version, str) and info.version, "version must be a non-empty str"
        assert isinstance(info.distribution, str) and info.distribution
        assert caps.bits and set(caps.bits) <= set(SUPPORTED_BITS), caps.bits
        assert caps.device_kinds and set(caps.device_kinds) <= set(DEVICE_KINDS), caps.device_kinds
        assert caps.act_dtypes and set(caps.act_dtypes) <= set(ALL_DTYPES), caps.act_dtypes
        assert caps.sym or caps.asym
        if caps.group_sizes is not None:
            assert caps.group_sizes and all(g == -1 or g > 0 for g in caps.group_sizes)
        assert caps.k_multiple >= 1 and caps.n_multiple >= 1
        for kind, rank in info.priority.items():
            assert kind == "*" or kind in DEVICE_KINDS, f"priority for unknown device kind {kind}"
            assert isinstance(rank, int)

    def test_device_supported(self, gptq_suite: SuiteContext) -> None:
        """The backend can serve the device the suite runs on (else nothing can be checked)."""
        reasons = gptq_suite.plan.device_reasons
        assert not reasons, (
            f"backend '{gptq_suite.name}' cannot run on {gptq_suite.device.describe()}: "
            f"{'; '.join(reasons)}; run the suite where it can (--gptq-device)"
        )

    # ------------------------------------------------------------------ capture
    # First in the class, so that in an in-order run they are the first calls into the
    # backend: a per-device cache made on first use is then made inside their warm-up.
    @family("cuda_graph")
    def test_cuda_graph_capture(self, gptq_suite: SuiteContext, case: Case) -> None:
        """qmatmul captured by torch.cuda.graph: neither the warm-up nor the capture keeps
        memory beyond its output, the first replay equals an eager call, and replays of fresh
        inputs match the reference."""
        ctx = gptq_suite
        packed = make_weight(ctx, case)
        prepared = ctx.prepare(packed, case.spec("compile"))
        K = case.in_features
        with torch.cuda.device(ctx.torch_device):
            for m in capture_ms(case.m_values, policy_of(ctx.backend, prepared)):
                x = make_x(ctx, case, m, K, salt=f"captured-m{m}")

                def call() -> torch.Tensor:
                    return ctx.backend.qmatmul(x, prepared, packed.bias)

                kept = warm_up(call)
                assert kept <= 0, (
                    f"M={m}: eager calls left {kept} bytes allocated after they returned (a "
                    "cache or workspace made on first use?); inside a capture that memory "
                    "lands in the graph's pool, which cudagraph trees reject: allocate it when "
                    "the weight is prepared (docs/DESIGN.md §11)"
                )
                captured = capture(call, f"qmatmul of {case.id} at M={m}")
                assert not captured.kept, (
                    f"M={m}: the capture left {len(captured.kept)} block(s) of "
                    f"{sum(captured.kept)} bytes allocated in the graph's pool besides its "
                    "output: an op allocated memory inside the capture that outlives the call, "
                    "which cudagraph trees reject (docs/DESIGN.md §11)"
                )
                captured.graph.replay()
                eager, again = call(), call()
                if torch.equal(eager, again):  # a deterministic op replays bit for bit
                    assert torch.equal(captured.output, eager), \
                        f"M={m}: the replay differs from an eager call on the same input"
                assert_matches_reference(captured.output, x, packed,
                                         context=f"{case.id} M={m} first replay")
                for i in range(REPLAYS):
                    x.copy_(make_x(ctx, case, m, K, salt=f"replay{i}-m{m}"))
                    captured.graph.replay()
                    assert_matches_reference(captured.output, x, packed,
                                             context=f"{case.id} M={m} replay {i}")
                del captured

    @family("compile_replay")
    def test_compile_replay(self, gptq_suite: SuiteContext, case: Case) -> None:
        """A model-like call, ``layer(x)``, under torch.compile(fullgraph=True) with inductor
        on fresh inputs; on CUDA in mode="reduce-overhead", i.e. CUDA graphs through
        cudagraph trees, which must not fall back to eager nor find memory an op left in
        their pool."""
        import torch._inductor.config as inductor_config  # noqa: PLC0415 (torch.compile's cost)
        from torch._dynamo.utils import counters  # noqa: PLC0415

        ctx = gptq_suite
        packed = make_weight(ctx, case)
        layer = ctx.quant_linear(packed, case.dtype, mode="compile")
        on_cuda = ctx.torch_device.type == "cuda"
        ms = (capture_ms(case.m_values, policy_of(ctx.backend, layer.binding.prepared))
              if on_cuda else case.m_values)

        def step(x: torch.Tensor) -> torch.Tensor:
            return layer(x)

        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead" if on_cuda else None)
        skips = counters["inductor"]["cudagraph_skips"]
        try:
            with inductor_config.patch({"triton.cudagraph_or_error": on_cuda}):
                for m in ms:
                    for i in range(REPLAYS):
                        x = make_x(ctx, case, 1, m, case.in_features, salt=f"compiled{i}-m{m}")
                        assert_matches_reference(compiled(x), x, packed,
                                                 context=f"{case.id} compiled, M={m} call {i}")
        finally:
            torch._dynamo.reset()
        assert counters["inductor"]["cudagraph_skips"] == skips, \
            "inductor ran the compiled layer without CUDA graphs (see the warning it logged)"

    # ------------------------------------------------------------------ numerics
    @family("qmatmul")
    def test_qmatmul(self, gptq_suite: SuiteContext, case: Case) -> None:
        """qmatmul on contiguous [M, K] inputs for every M, against the float64 reference."""
        ctx = gptq_suite
        packed = make_weight(ctx, case)
        prepared = ctx.prepare(packed, case.spec())
        for m in case.m_values:
            x = make_x(ctx, case, m, case.in_features, salt=f"m{m}")
            y = ctx.backend.qmatmul(x, prepared, packed.bias)
            assert isinstance(y, torch.Tensor), f"qmatmul returned {type(y).__name__}"
            assert y.device == x.device, f"output on {y.device}, input on {x.device}"
            assert_matches_reference(y, x, packed, context=f"{case.id} M={m} (seed {ctx.seed})")

    @family("routes")
    def test_every_route_on_a_model_shape(self, gptq_suite: SuiteContext, case: Case) -> None:
        """qmatmul of a model-sized layer at each bound of the backend's dispatch policy and the
        row after it, against the float64 reference: the paths a backend picks by layer size."""
        ctx = gptq_suite
        packed = make_weight(ctx, case)
        prepared = ctx.prepare(packed, case.spec())
        policy = policy_of(ctx.backend, prepared)
        for m in capture_ms(case.m_values, policy):
            x = make_x(ctx, case, m, case.in_features, salt=f"route-m{m}")
            y = ctx.backend.qmatmul(x, prepared, packed.bias)
            assert_matches_reference(y, x, packed, context=f"{case.id} M={m} ({policy.path_for(m)})")

    @family("module")
    def test_quant_linear_inputs(self, gptq_suite: SuiteContext, case: Case) -> None:
        """QuantLinear bound to this backend: batch dims, M=0, non-contiguous and odd strides."""
        ctx = gptq_suite
        packed = make_weight(ctx, case)
        layer = ctx.quant_linear(packed, case.dtype)
        assert layer.binding.backend is ctx.backend, layer.binding.explain()
        for label, x in strided_inputs(ctx, case).items():
            before = snapshot({"x": x})
            y = layer(x)
            assert not changed(before, {"x": x}), f"{label}: the input was modified"
            assert_matches_reference(y, x, packed, context=f"{case.id} input {label}")

    @family("property")
    def test_nan_inf_propagate(self, gptq_suite: SuiteContext, case: Case) -> None:
        """NaN and +-Inf in a row of x reach that row's outputs (as IEEE says) and no other."""
        ctx = gptq_suite
        packed = make_weight(ctx, case)
        prepared = ctx.prepare(packed, case.spec())
        K = case.in_features
        x = make_x(ctx, case, 4, K)
        x[0, K // 3] = math.nan
        x[1, K - 1] = math.inf
        x[2, 0] = -math.inf
        y = ctx.backend.qmatmul(x, prepared, packed.bias)
        assert_matches_reference(y, x, packed, context=f"{case.id} with NaN/Inf inputs")
        assert bool(torch.isfinite(y[3]).all()), "non-finite values leaked into a finite row"

    # ------------------------------------------------------------------ pack properties
    @family("property")
    def test_pack_deterministic(self, gptq_suite: SuiteContext, case: Case) -> None:
        """Preparing one weight twice (and a copy of it) gives bit-identical prepared tensors."""
        ctx = gptq_suite
        packed = make_weight(ctx, case)
        copy = packed.replace(**{k: v.clone() for k, v in packed_tensors(packed).items()})
        first = tensors_of(ctx.prepare(packed, case.spec()))
        for label, again in (("same weight", packed), ("copied weight", copy)):
            second = tensors_of(ctx.prepare(again, case.spec()))
            assert first.keys() == second.keys(), f"{label}: prepared structure differs"
            for key in first:
                a, b = first[key], second[key]
                assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{label}: {key} differs"
                assert not changed(snapshot({key: a}), {key: b}), f"{label}: {key} differs"
        if not first:  # opaque prepared form: compare what it computes
            x = make_x(ctx, case, 3, case.in_features)
            y1 = ctx.backend.qmatmul(x, ctx.prepare(packed, case.spec()), packed.bias)
            y2 = ctx.backend.qmatmul(x, ctx.prepare(copy, case.spec()), packed.bias)
            assert torch.equal(y1, y2), "two preparations of one weight compute differently"

    @family("property")
    def test_no_mutation(self, gptq_suite: SuiteContext, case: Case) -> None:
        """prepare, qmatmul and a QuantLinear forward leave the caller's tensors untouched."""
        ctx = gptq_suite
        packed = make_weight(ctx, case)
        x = make_x(ctx, case, 5, case.in_features)
        watched = {**packed_tensors(packed), "x": x}
        before = snapshot(watched)
        prepared = ctx.prepare(packed, case.spec())
        ctx.backend.qmatmul(x, prepared, packed.bias)
        assert not changed(before, watched), f"modified: {changed(before, watched)}"
        layer = ctx.quant_linear(packed, case.dtype)
        layer(x)
        assert not changed(before, watched), f"QuantLinear modified: {changed(before, watched)}"

    # ------------------------------------------------------------------ declared limits
    @family("limit")
    def test_declared_limit(self, gptq_suite: SuiteContext, case: LimitCase) -> None:
        """A combination outside the capabilities raises NotSupportedError, with reasons."""
        ctx = gptq_suite
        weight = make_weight(ctx, case.weight)
        device = case.device or ctx.device
        with pytest.raises(NotSupportedError) as info:
            ctx.backend.prepare(weight, device, case.spec, ctx.options)
        reasons = info.value.reasons
        assert reasons and all(isinstance(r, str) and r for r in reasons), \
            f"{case.what}: refused without reasons"
        with pytest.raises(NoBackendError) as info:
            selector.bind(weight, device, case.spec, backend=ctx.name, options=ctx.options_by_name)
        assert reasons[0] in str(info.value), \
            f"the selector's error does not carry the backend's reason: {info.value}"

    # ------------------------------------------------------------------ torch integration
    @family("opcheck")
    def test_opcheck(self, gptq_suite: SuiteContext, case: Case) -> None:
        """Every custom op qmatmul dispatches passes opcheck (in training, run as QuantLinear
        runs it: inside the core's autograd function, forward and backward)."""
        ctx = gptq_suite
        training = ctx.backend.info.capabilities.training
        packed = make_weight(ctx, case)
        prepared = ctx.prepare(packed, case.spec("training" if training else "inference"))
        x = make_x(ctx, case, 7, case.in_features).requires_grad_(training)
        with CustomOpRecorder() as recorder:
            if training:
                y = differentiable_qmatmul(ctx.backend.qmatmul, x, prepared, packed.bias,
                                           WeightSource.of(packed))
                y.backward(torch.ones_like(y))
            else:
                ctx.backend.qmatmul(x, prepared, packed.bias)
        assert recorder.calls, (
            f"backend '{ctx.name}' computed without any torch.library custom op; register its "
            "kernel as a custom op with a fake implementation so torch.compile can capture it"
        )
        for call in recorder.calls.values():
            # The core's autograd function owns the gradient (gptq_core/training.py): a backend
            # op runs below it, so it is checked without autograd on its inputs.
            args, kwargs = without_grad(call.args), without_grad(call.kwargs)
            scratch = ctx.scratch.get(call.op._schema.name)
            if scratch:
                opcheck_with_scratch(call.op, args, kwargs, scratch)
            else:
                torch.library.opcheck(call.op, args, kwargs)

    @family("compile")
    def test_compile(self, gptq_suite: SuiteContext, case: Case) -> None:
        """torch.compile(fullgraph=True) of a QuantLinear on this backend matches the reference."""
        ctx = gptq_suite
        packed = make_weight(ctx, case)
        layer = ctx.quant_linear(packed, case.dtype, mode="compile")
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend=ctx.compile_backend)
        for shape in ((1, case.in_features), (2, 5, case.in_features)):
            x = make_x(ctx, case, *shape, salt=str(shape))
            assert_matches_reference(compiled(x), x, packed, context=f"compiled, x {shape}")
        torch._dynamo.reset()

    @family("training")
    def test_backward(self, gptq_suite: SuiteContext, case: Case) -> None:
        """The input gradient through QuantLinear equals grad @ W in float64."""
        ctx = gptq_suite
        packed = make_weight(ctx, case)
        layer = ctx.quant_linear(packed, case.dtype, mode="training")
        x = make_x(ctx, case, 2, 3, case.in_features).requires_grad_(True)
        y = layer(x)
        assert_matches_reference(y.detach(), x.detach(), packed, context="training forward")
        grad = make_x(ctx, case, 2, 3, case.out_features, salt="grad")
        y.backward(grad)
        assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype
        w = packed.to("cpu").dequantize(torch.float64)  # [K, N]
        g64 = grad.to("cpu", torch.float64).reshape(-1, case.out_features)
        ref = g64 @ w.t()
        check = check_close(x.grad, ref, g64.abs() @ w.abs().t() + ref.abs(), case.dtype,
                            TOLERANCES[case.dtype])
        assert check.ok, f"input gradient: {check.message}"
