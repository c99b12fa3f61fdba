"""One conformance suite instance: the backend under test, its device, its cases and its
declared expected failures, resolved once per test class at collection time.

Declarations (``xfail`` / ``skip``: item name pattern -> reason) come from the test class and
from the backend's plugin object (module attributes ``CONFORMANCE_XFAIL`` and
``CONFORMANCE_SKIP``), so ``pytest --pyargs gptq_conformance --gptq-backend=NAME`` honours
them too. A pattern is an item name such as ``test_qmatmul[b3-g128-sym-noact-fp16-K172xN32]``
where ``*`` matches any run of characters. Every pattern must match a generated item and carry
a reason, else collection fails.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
import torch

from gptq_core.backend import Backend
from gptq_core.device import DeviceInfo
from gptq_core.errors import GPTQError, NotSupportedError
from gptq_core.options import BackendOptions, OptionsError
from gptq_core.quant_linear import QuantLinear
from gptq_core.registry import get_registry
from gptq_core.spec import LayerSpec, Mode

from .cases import SuitePlan, build_plan, parse_shapes

#: Why a family can have no cases, shown as the reason of its single skipped placeholder.
_NOT_COMPILABLE = ("the backend declares compile=False; test_declared_limit[limit-compile] "
                   "checks that torch.compile mode is refused")
NOT_APPLICABLE = {
    "compile": _NOT_COMPILABLE,
    "cuda_graph": _NOT_COMPILABLE,
    "compile_replay": _NOT_COMPILABLE,
    "training": "the backend declares training=False; test_declared_limit[limit-training] "
                "checks that training mode is refused",
    "limit": "the backend declares no limit this suite can probe",
}
PLACEHOLDER_ID = "not-applicable"

_SUITES = pytest.StashKey[dict]()


def pattern_regex(pattern: str) -> re.Pattern:
    """``*`` is the only wildcard (item names contain brackets, which fnmatch would eat)."""
    return re.compile("".join(".*" if ch == "*" else re.escape(ch) for ch in pattern) + r"\Z")


def base_test_functions() -> dict[str, object]:
    from .suite import BackendConformance

    return {n: getattr(BackendConformance, n) for n in dir(BackendConformance)
            if n.startswith("test") and callable(getattr(BackendConformance, n))}


@dataclass
class SuiteContext:
    """What every check needs: the backend, where it runs, and the whole case list."""

    cls: type
    name: str
    backend: Backend
    device: DeviceInfo
    seed: int
    quick: bool
    compile_backend: str
    plan: SuitePlan
    #: The backend's typed options (``--gptq-backend-option``), parsed once: every prepare and
    #: bind of the suite uses them, so a run can check a path the defaults do not reach.
    options: BackendOptions = field(default_factory=BackendOptions)
    xfail: dict[str, str] = field(default_factory=dict)
    skip: dict[str, str] = field(default_factory=dict)
    #: op name -> its scratch arguments (the plugin's CONFORMANCE_SCRATCH): written by a call,
    #: meaningless after it; test_opcheck checks every other argument is left unchanged
    scratch: dict[str, tuple[str, ...]] = field(default_factory=dict)
    expected: set[str] = field(default_factory=set)
    allowed_skips: set[str] = field(default_factory=set)

    @property
    def torch_device(self) -> torch.device:
        return self.device.torch_device

    @property
    def options_by_name(self) -> dict[str, BackendOptions]:
        """The options keyed by backend name, as ``selector.bind`` and ``QuantLinear.bind`` take them."""
        return {self.name: self.options}

    # ------------------------------------------------------------------ running
    def prepare(self, weight, spec: LayerSpec):
        """Backend.prepare for a case the backend declared it supports (a refusal fails)."""
        try:
            return self.backend.prepare(weight, self.device, spec, self.options)
        except NotSupportedError as exc:
            pytest.fail(
                f"backend '{self.name}' declares (Capabilities) that it serves "
                f"{spec.describe()} but refused it: {'; '.join(exc.reasons) or exc}. "
                "Declare the limit in its Capabilities, or declare this case in "
                "CONFORMANCE_XFAIL with a reason.",
                pytrace=False,
            )

    def quant_linear(self, weight, act_dtype: torch.dtype, mode: Mode = "inference") -> QuantLinear:
        """``QuantLinear.from_packed(weight, backend=NAME)`` bound with the suite's options (kept
        on the layer, so a rebind uses them too)."""
        layer = QuantLinear.from_packed(weight, backend=self.name, act_dtype=None, mode=mode)
        layer.bind(act_dtype, options=self.options_by_name)
        return layer

    # ------------------------------------------------------------------ collection
    def item_names(self, fn_name: str, family: str | None) -> list[str]:
        if family is None:
            return [fn_name]
        cases = self.plan.families.get(family, [])
        if not cases:
            return [f"{fn_name}[{PLACEHOLDER_ID}]"]
        return [f"{fn_name}[{c.id}]" for c in cases]

    def declared(self, table: Mapping[str, str], item_name: str) -> str | None:
        for pattern, reason in table.items():
            if pattern_regex(pattern).match(item_name):
                return reason
        return None

    def params(self, fn_name: str, family: str) -> list:
        """pytest params of one test function, with declared xfail / skip marks."""
        cases = self.plan.families.get(family, [])
        if not cases:
            reason = self._not_applicable(family)
            self.allowed_skips.add(f"{fn_name}[{PLACEHOLDER_ID}]")
            return [pytest.param(None, id=PLACEHOLDER_ID, marks=pytest.mark.skip(reason=reason))]
        return [pytest.param(c, id=c.id, marks=self.marks(f"{fn_name}[{c.id}]")) for c in cases]

    def marks(self, item: str) -> list:
        """The declared skip or (strict) xfail of one item, if any."""
        skip_reason = self.declared(self.skip, item)
        if skip_reason is not None:
            self.allowed_skips.add(item)
            return [pytest.mark.skip(reason=f"declared by '{self.name}': {skip_reason}")]
        xfail_reason = self.declared(self.xfail, item)
        if xfail_reason is not None:
            return [pytest.mark.xfail(reason=f"declared by '{self.name}': {xfail_reason}",
                                      strict=True)]
        return []

    def _not_applicable(self, family: str) -> str:
        if self.plan.device_reasons:
            return (f"backend '{self.name}' cannot run on {self.device.describe()} "
                    f"(see test_device_supported): {'; '.join(self.plan.device_reasons)}")
        return self.plan.reasons.get(family) or NOT_APPLICABLE.get(
            family, "no case applies to this backend")


def _declarations(cls: type, backend: Backend, attr: str, option: str) -> dict[str, str]:
    merged: dict[str, str] = {}
    for source, table in ((f"{backend.name} plugin {option}", getattr(backend.plugin, option, None)),
                          (f"{cls.__name__}.{attr}", getattr(cls, attr, None))):
        if table is None:
            continue
        if not isinstance(table, Mapping):
            pytest.fail(f"{source} must be a dict of item-name pattern -> reason, "
                        f"got {type(table).__name__}", pytrace=False)
        for pattern, reason in table.items():
            if not isinstance(reason, str) or not reason.strip():
                pytest.fail(f"{source}[{pattern!r}] has no reason: every expected failure or "
                            "skip must say why (a non-empty string)", pytrace=False)
            merged[str(pattern)] = reason.strip()
    return merged


def _check_not_overridden(cls: type) -> None:
    """A subclass may add tests but not replace or remove the suite's own."""
    for name, fn in base_test_functions().items():
        if getattr(cls, name, None) is not fn:
            pytest.fail(
                f"{cls.__name__}.{name} replaces a conformance check; checks cannot be removed "
                "or overridden: declare expected failures in `xfail` (or CONFORMANCE_XFAIL) "
                "with a reason instead", pytrace=False)


def _resolve_backend(name: str | None) -> Backend:
    reg = get_registry()
    if not name:
        installed = ", ".join(sorted(reg.backends)) or "none"
        pytest.fail("no backend to test: pass --gptq-backend=NAME (installed: "
                    f"{installed}) or set `backend = NAME` on your BackendConformance subclass",
                    pytrace=False)
    try:
        return reg.get(name)
    except GPTQError as exc:
        pytest.fail(f"cannot test backend '{name}': {exc}", pytrace=False)


def _parse_options(backend: Backend, items: list[str]) -> BackendOptions:
    """``--gptq-backend-option NAME=VALUE`` items as the backend's options class, as a model's
    load parses them; a malformed item, unknown name or bad value fails collection in one line."""
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            pytest.fail(f"--gptq-backend-option {item!r} is not of the form NAME=VALUE (an option "
                        f"of backend '{backend.name}', no prefix, e.g. dequant_threshold=0)",
                        pytrace=False)
        values[name.strip()] = value.strip()
    try:
        return backend.info.options.parse(values, backend.name)
    except OptionsError as exc:
        problem = str(exc)
    pytest.fail(f"--gptq-backend-option: {problem}", pytrace=False)  # outside the except: one line


def _shapes(text: str | None) -> tuple[tuple[int, int], ...] | None:
    """``--gptq-shapes``, or None for the grid's own; a bad item fails collection in one line."""
    if not text:
        return None
    try:
        return parse_shapes(text)
    except ValueError as exc:
        problem = str(exc)
    pytest.fail(problem, pytrace=False)  # outside the except: one line


def _share_cpu_between_workers() -> None:
    """Under pytest-xdist, split the cores between workers: the cases are tiny, and
    oversubscribed intra-op threads only spin."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def suite_for(config: pytest.Config, cls: type) -> SuiteContext:
    """The suite of test class ``cls`` (resolved once, kept in the config's stash)."""
    suites = config.stash.setdefault(_SUITES, {})
    if cls in suites:
        return suites[cls]
    _check_not_overridden(cls)
    _share_cpu_between_workers()
    name = getattr(cls, "backend", None) or config.getoption("gptq_backend")
    backend = _resolve_backend(name)
    quick = getattr(cls, "quick", None)
    quick = config.getoption("gptq_quick") if quick is None else quick
    dev = getattr(cls, "device", None) or config.getoption("gptq_device")
    if dev is None:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = DeviceInfo.of(dev)
    plan = build_plan(backend.info.capabilities, backend.reasons(device), quick, device.type,
                      _shapes(config.getoption("gptq_shapes")))
    ctx = SuiteContext(
        cls=cls, name=backend.name, backend=backend, device=device,
        seed=config.getoption("gptq_seed"), quick=quick,
        compile_backend=config.getoption("gptq_compile_backend"), plan=plan,
        options=_parse_options(backend, config.getoption("gptq_backend_option")),
        xfail=_declarations(cls, backend, "xfail", "CONFORMANCE_XFAIL"),
        skip=_declarations(cls, backend, "skip", "CONFORMANCE_SKIP"),
        scratch={op: tuple(names) for op, names in getattr(backend.plugin, "CONFORMANCE_SCRATCH", {}).items()},
    )
    for fn_name, fn in base_test_functions().items():
        ctx.expected.update(ctx.item_names(fn_name, getattr(fn, "_gptq_family", None)))
    for kind, table in (("xfail", ctx.xfail), ("skip", ctx.skip)):
        for pattern in table:
            if not any(pattern_regex(pattern).match(n) for n in ctx.expected):
                pytest.fail(
                    f"declared {kind} {pattern!r} for backend '{ctx.name}' matches no "
                    f"conformance case; the cases are generated from the backend's "
                    f"Capabilities ({len(ctx.expected)} items, e.g. "
                    f"{sorted(ctx.expected)[0]!r}): remove or correct the declaration",
                    pytrace=False)
    suites[cls] = ctx
    return ctx


def known_suites(config: pytest.Config) -> dict[type, SuiteContext]:
    return config.stash.get(_SUITES, {})
