"""The pytest plugin (entry point ``pytest11: gptq_conformance``).

Adds the ``--gptq-*`` options, parametrizes :class:`~gptq_conformance.BackendConformance`
subclasses with the cases generated from the backend's capabilities, and keeps the suite
whole: a conformance item that was generated but is not run (deselected with ``-k`` /
``--deselect``, dropped by a conftest, or skipped at run time) fails the run unless the
backend declared it with a reason. Heavy imports (torch, gptq_core) happen only when a
conformance class is collected, so the plugin costs nothing in other test runs.
"""

from __future__ import annotations

import pytest

COMPLETENESS_ITEM = "gptq-conformance-completeness"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gptq-conformance", "gptq backend conformance suite")
    group.addoption("--gptq-backend", default=None, metavar="NAME",
                    help="backend to test with `pytest --pyargs gptq_conformance`")
    group.addoption("--gptq-backend-option", action="append", default=[], metavar="NAME=VALUE",
                    help="a typed option of the backend under test, no backend prefix, e.g. "
                         "dequant_threshold=0 (repeatable; `gptq backends list --options` "
                         "lists them): every prepare and bind of the suite uses it")
    group.addoption("--gptq-shapes", default=None, metavar="KxN[,KxN]",
                    help="the layer shapes of the qmatmul grid instead of the suite's small ones "
                         "(rounded up to the backend's tiles), e.g. 4096x256 to reach a path "
                         "that only serves wider layers")
    group.addoption("--gptq-quick", action="store_true", default=False,
                    help="the small case set, for slow backends (e.g. TRITON_INTERPRET=1)")
    group.addoption("--gptq-device", default=None, metavar="DEVICE",
                    help="torch device to test on (default: cuda if present, else cpu)")
    group.addoption("--gptq-seed", type=int, default=0, metavar="N",
                    help="mixed into every case's random seed (default 0)")
    group.addoption("--gptq-compile-backend", default="aot_eager", metavar="NAME",
                    help="torch.compile backend of the compile checks (default aot_eager)")
    group.addoption("--gptq-partial", action="store_true", default=False,
                    help="allow running a subset of the cases (debugging; not a conformance pass)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gptq_conformance: an item of the gptq conformance suite")


def _is_suite(cls: type | None) -> bool:
    return cls is not None and getattr(cls, "__gptq_conformance__", False)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not _is_suite(metafunc.cls):
        return
    from .context import suite_for

    ctx = suite_for(metafunc.config, metafunc.cls)
    family = getattr(metafunc.function, "_gptq_family", None)
    if family is not None:
        metafunc.parametrize("case", ctx.params(metafunc.function.__name__, family))


class CompletenessFailure(pytest.Item):
    """A synthetic item that fails with the list of conformance items not run."""

    def __init__(self, *, message: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.message = message

    def runtest(self) -> None:
        raise AssertionError(self.message)

    def repr_failure(self, excinfo, style=None) -> str:
        return self.message

    def reportinfo(self):
        return self.path, None, self.name


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items) -> None:
    from .context import known_suites

    suites = known_suites(config)
    if not suites:
        return
    for item in items:
        cls = getattr(item, "cls", None)
        if cls in suites:
            item.add_marker("gptq_conformance")
            if not hasattr(item, "callspec"):  # parametrized items got their marks as params
                for mark in suites[cls].marks(item.name):
                    item.add_marker(mark)
    if config.getoption("gptq_partial"):
        return
    problems = []
    for cls, ctx in suites.items():
        ran = {item.name for item in items if getattr(item, "cls", None) is cls}
        missing = sorted(ctx.expected - ran)
        if missing:
            shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            problems.append(f"{cls.__name__} (backend '{ctx.name}'): {len(missing)} of "
                            f"{len(ctx.expected)} cases were removed from the run: {shown}")
    if problems:
        message = (
            "the conformance suite must run whole; cases may only be left out through the "
            "backend's declared `skip` / `xfail` mappings, each with a reason "
            "(--gptq-partial allows a partial run for debugging, which is not a pass):\n  "
            + "\n  ".join(problems)
        )
        items.append(CompletenessFailure.from_parent(session, name=COMPLETENESS_ITEM,
                                                     message=message))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    cls = getattr(item, "cls", None)
    if not (_is_suite(cls) and report.skipped and not hasattr(report, "wasxfail")):
        return
    from .context import known_suites

    ctx = known_suites(item.config).get(cls)
    if ctx is None or item.name in ctx.allowed_skips:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"{item.name} was skipped ({reason}) but conformance cases may only be skipped through "
        f"the backend's declared `skip` mapping, with a reason"
    )


@pytest.fixture
def gptq_suite(request: pytest.FixtureRequest):
    """The :class:`~gptq_conformance.context.SuiteContext` of the current conformance class."""
    if not _is_suite(request.cls):
        pytest.fail("gptq_suite is only available inside BackendConformance subclasses",
                    pytrace=False)
    from .context import suite_for

    return suite_for(request.config, request.cls)
