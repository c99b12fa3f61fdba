"""The selector: ranking by priority, explicit choices, fallback, and its explanations."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from gptq_core import Capabilities, DeviceInfo, LayerSpec, Registry, get_registry, selector
from gptq_core.errors import NoBackendError, NotSupportedError
from gptq_core.testing import StubBackend, random_packed

CPU = DeviceInfo.of("cpu")
ANY = Capabilities(device_kinds=frozenset({"cpu"}), bits=(2, 3, 4, 8))
WEIGHT = random_packed(4, 32, in_features=64, out_features=16, seed=7)
SPEC = LayerSpec.of(WEIGHT, torch.float32)


def registry(*backends: StubBackend) -> Registry:
    reg = Registry()
    for b in backends:
        reg.register(b)
    return reg


@pytest.fixture(autouse=True)
def _no_env_preference(monkeypatch):
    monkeypatch.delenv("GPTQ_BACKEND", raising=False)
    selector.clear_cache()
    yield
    selector.clear_cache()


def four_backends() -> Registry:
    return registry(
        StubBackend("fast", ANY, {"cpu": 50}),
        StubBackend("slow", ANY, {"cpu": 10}),
        StubBackend("anywhere", ANY, {"*": 20}),
        StubBackend("eightbit", replace(ANY, bits=(8,)), {"cpu": 99}),
    )


def test_ranking_follows_declared_priority_and_keeps_reasons():
    plan = selector.plan(SPEC, CPU, registry=four_backends())
    assert [b.name for b in plan.ranked] == ["fast", "anywhere", "slow"]
    assert plan.rejected == {"eightbit": ["4-bit is not supported (supports [8])"]}
    text = plan.explain()
    assert "selected: fast (priority 50)" in text and "fallback: anywhere (priority 20)" in text
    assert "rejected: eightbit: 4-bit is not supported" in text


def test_plans_are_cached_until_the_registry_changes():
    reg = four_backends()
    first = selector.plan(SPEC, CPU, registry=reg)
    assert selector.plan(SPEC, CPU, registry=reg) is first
    reg.register(StubBackend("newcomer", ANY, {"cpu": 70}))
    assert selector.plan(SPEC, CPU, registry=reg).ranked[0].name == "newcomer"


def test_plans_and_failures_are_kept_by_value_per_registry():
    def broken_build(weight, device, spec):
        raise RuntimeError("JIT build failed")

    regs = [registry(StubBackend("failing", ANY, {"cpu": 9}, pack=broken_build),
                     StubBackend("steady", ANY)) for _ in range(2)]
    first = selector.plan(SPEC, CPU, registry=regs[0])
    # an equal device and spec built afresh; one preference spelled two ways
    assert regs[0].selector.plan(replace(SPEC), DeviceInfo.of("cpu")) is first
    assert selector.plan(SPEC, CPU, "steady, failing", regs[0]) is \
        selector.plan(SPEC, CPU, ["steady", "failing"], regs[0])
    for reg in regs:  # each registry's selector remembers its own failures
        for _ in range(2):
            assert selector.bind(WEIGHT, CPU, SPEC, registry=reg).backend.name == "steady"
        assert reg.backends["failing"].plugin.pack_calls == 1
    regs[0].selector.clear()
    selector.bind(WEIGHT, CPU, SPEC, registry=regs[0])
    assert regs[0].backends["failing"].plugin.pack_calls == 2
    assert regs[1].backends["failing"].plugin.pack_calls == 1


@pytest.mark.parametrize(
    ("preference", "ranked"),
    [("slow", ["slow"]), ("slow,fast", ["slow", "fast"]), (["anywhere", "slow"], ["anywhere", "slow"]),
     (" fast , ", ["fast"])],
)
def test_explicit_preference_is_an_ordered_list(preference, ranked):
    plan = selector.plan(SPEC, CPU, backend=preference, registry=four_backends())
    assert [b.name for b in plan.ranked] == ranked
    assert plan.rejected == {}


def test_gptq_backend_environment_variable(monkeypatch):
    reg = four_backends()
    monkeypatch.setenv("GPTQ_BACKEND", "slow,anywhere")
    assert [b.name for b in selector.plan(SPEC, CPU, registry=reg).ranked] == ["slow", "anywhere"]
    # an explicit argument overrides the environment; "auto" means the environment or automatic
    assert [b.name for b in selector.plan(SPEC, CPU, backend="fast", registry=reg).ranked] == ["fast"]
    assert selector.plan(SPEC, CPU, backend="auto", registry=reg).ranked[0].name == "slow"
    monkeypatch.setenv("GPTQ_BACKEND", "auto")
    assert selector.plan(SPEC, CPU, registry=reg).ranked[0].name == "fast"


def test_explicit_choice_that_cannot_serve_fails_loudly_with_its_reasons():
    reg = four_backends()
    with pytest.raises(NoBackendError) as info:
        selector.bind(WEIGHT, CPU, SPEC, backend="eightbit,missing", registry=reg)
    text = str(info.value)
    assert "eightbit: 4-bit is not supported (supports [8])" in text
    assert "missing: no backend named 'missing' is installed" in text
    assert "limits the choice to those backends" in text
    assert "  - fast:" not in text  # the preference is honoured, not silently widened


def test_fallback_when_the_first_backend_fails_to_pack():
    def broken_build(weight, device, spec):
        raise RuntimeError("JIT build failed: nvcc not found")

    failing = StubBackend("failing", ANY, {"cpu": 90}, pack=broken_build)
    reg = registry(failing, StubBackend("steady", ANY, {"cpu": 1}))
    binding = selector.bind(WEIGHT, CPU, SPEC, registry=reg)
    assert binding.backend.name == "steady"
    assert "JIT build failed: nvcc not found" in binding.failures["failing"]
    assert "failed: failing: RuntimeError: JIT build failed" in binding.explain()
    assert binding.explain().endswith("=> steady")
    # a backend that failed to build for this plan is not retried for the next layer
    again = selector.bind(WEIGHT, CPU, SPEC, registry=reg)
    assert again.backend.name == "steady" and failing.pack_calls == 1


def test_pack_refusal_falls_back_without_being_cached():
    def refuse(weight, device, spec):
        raise NotSupportedError("no", ["K=64 is too small for my tiles"])

    picky = StubBackend("picky", ANY, {"cpu": 90}, pack=refuse)
    reg = registry(picky, StubBackend("steady", ANY))
    assert selector.bind(WEIGHT, CPU, SPEC, registry=reg).failures == {
        "picky": "K=64 is too small for my tiles"}
    selector.bind(WEIGHT, CPU, SPEC, registry=reg)
    assert picky.pack_calls == 2


def test_probe_reasons_reject_and_crashing_probes_are_reasons():
    def crash(device, spec):
        raise OSError("libfoo.so: cannot open shared object file")

    reg = registry(
        StubBackend("unbuilt", ANY, {"cpu": 90}, probe=lambda d, s: ["extension not built"]),
        StubBackend("crashy", ANY, {"cpu": 80}, probe=crash),
        StubBackend("plain", ANY),
    )
    plan = selector.plan(SPEC, CPU, registry=reg)
    assert [b.name for b in plan.ranked] == ["plain"]
    assert plan.rejected["unbuilt"] == ["extension not built"]
    assert plan.rejected["crashy"] == ["probe failed: OSError: libfoo.so: cannot open shared object file"]


def test_backend_prepare_refuses_outside_capabilities():
    narrow = StubBackend("narrow", replace(ANY, bits=(4,), act_dtypes=(torch.float16,), k_multiple=128))
    backend = registry(narrow).get("narrow")
    with pytest.raises(NotSupportedError) as info:
        backend.prepare(WEIGHT, CPU, SPEC)
    assert info.value.reasons == [
        "activation dtype float32 is not supported (float16)",
        "K=64 is not divisible by 128",
    ]
    assert "backend 'narrow' cannot serve 4-bit g32 sym, K=64 N=16, float32, inference on cpu (CPU)" \
        in str(info.value)
    assert narrow.pack_calls == 0


def test_no_backend_error_lists_every_installed_backend_and_the_fix():
    reg = get_registry()
    spec = replace(SPEC, act_dtype=torch.float64)  # no backend serves float64 activations
    with pytest.raises(NoBackendError) as info:
        selector.bind(WEIGHT, CPU, spec, registry=reg)
    text = str(info.value)
    assert text.startswith("no backend can serve a 4-bit g32 sym, K=64 N=16, float64, inference "
                           "layer on cpu (CPU):")
    for name in list(reg.backends) + list(reg.broken):
        assert f"  - {name}: " in text, name
    assert "activation dtype float64 is not supported" in text
    assert "pip install gptq-core[all]" in text and "gptq backends list" in text


def test_explain_carries_the_prepared_weights_hint():
    @dataclass
    class Prepared:
        weight: object
        hint: str

    hinted = StubBackend("hinted", ANY, {"cpu": 5},
                         pack=lambda weight, device, spec: Prepared(weight, "option x would serve M 9-32"))
    binding = selector.bind(WEIGHT, CPU, SPEC, registry=registry(hinted))
    assert binding.explain().endswith("=> hinted\n  hint: option x would serve M 9-32")
    quiet = selector.bind(WEIGHT, CPU, SPEC, registry=registry(StubBackend("quiet", ANY, {"cpu": 5})))
    assert "hint" not in quiet.explain()  # a prepared form without a hint says nothing more
