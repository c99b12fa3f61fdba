"""Backend discovery: isolation of broken plugins, name conflicts, disabling, registration checks.

The isolation test is for real: tiny distributions are pip-installed into a temporary
``--target`` folder and ``gptq backends list --json`` runs in a subprocess that sees them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest

from gptq_core import (BackendInfo, Capabilities, DeviceInfo, GPTQError, LayerSpec, Registry,
                       get_registry, hookimpl, selector)
from gptq_core.errors import BackendConflictError
from gptq_core.registry import names_from_env
from gptq_core.testing import StubBackend

CPU4 = Capabilities(device_kinds=frozenset({"cpu"}), bits=(4,))
SPEC = LayerSpec(bits=4, group_size=32, in_features=64, out_features=16)


def _distribution(root: Path, dist: str, package: str, entry: str, module_source: str) -> Path:
    """Write a one-module setuptools project registering ``entry`` in gptq.backends."""
    folder = root / dist
    (folder / package).mkdir(parents=True)
    (folder / package / "__init__.py").write_text(textwrap.dedent(module_source))
    (folder / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{dist}"
        version = "1.2.3"
        [project.entry-points."gptq.backends"]
        {entry} = "{package}"
        [tool.setuptools]
        packages = ["{package}"]
    """))
    return folder


_DUPE_SOURCE = """
    import torch
    from gptq_core import BackendInfo, Capabilities, hookimpl

    @hookimpl
    def gptq_backend_info():
        return BackendInfo(name="dupe", version="1.2.3", distribution="{dist}",
                           capabilities=Capabilities(device_kinds=frozenset({{"cpu"}}), bits=(4,)))

    @hookimpl
    def gptq_pack(weight, device, spec):
        return weight

    @hookimpl
    def gptq_qmatmul(x, prepared, bias):
        return x @ prepared.dequantize(x.dtype)
"""


_TYPO_SOURCE = """
    import torch
    from gptq_core import BackendInfo, Capabilities, hookimpl

    @hookimpl
    def gptq_backend_info():
        return BackendInfo(name="typo", version="1.2.3", distribution="gptq-typo-plugin",
                           capabilities=Capabilities(device_kinds=frozenset({"cpu"}), bits=(4,)))

    @hookimpl
    def gptq_prob(device, spec):  # misspelled: pluggy alone would never call it
        return ["never asked"]

    @hookimpl
    def gptq_pack(weight, device, spec):
        return weight

    @hookimpl
    def gptq_qmatmul(x, prepared, bias):
        return x @ prepared.dequantize(x.dtype)
"""


_IDENTITY_SOURCE = """
    from gptq_core import BackendInfo, Capabilities, hookimpl

    @hookimpl
    def gptq_backend_info():
        return BackendInfo({declared}
                           capabilities=Capabilities(device_kinds=frozenset({{"cpu"}}), bits=(4,)))

    @hookimpl
    def gptq_pack(weight, device, spec):
        return weight

    @hookimpl
    def gptq_qmatmul(x, prepared, bias):
        return x @ prepared.dequantize(x.dtype)
"""


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory) -> Path:
    """A --target folder holding real distributions: one broken, one with a misspelled hook,
    two claiming 'dupe', one declaring no identity, one renaming itself and mis-declaring its
    version and distribution."""
    root = tmp_path_factory.mktemp("plugins")
    projects = [
        _distribution(root, "gptq-broken-plugin", "gptq_broken_plugin", "broken",
                      'raise RuntimeError("this plugin is broken on purpose")\n'),
        _distribution(root, "gptq-typo-plugin", "gptq_typo_plugin", "typo", _TYPO_SOURCE),
        _distribution(root, "gptq-minimal-plugin", "gptq_minimal_plugin", "minimal",
                      _IDENTITY_SOURCE.format(declared="")),
        _distribution(root, "gptq-renamed-plugin", "gptq_renamed_plugin", "alias",
                      _IDENTITY_SOURCE.format(
                          declared='name="renamed", version="9.9.9", distribution="wrong",')),
        _distribution(root, "gptq-dupe-one", "gptq_dupe_one", "dupe",
                      _DUPE_SOURCE.format(dist="gptq-dupe-one")),
        _distribution(root, "gptq-dupe-two", "gptq_dupe_two", "dupe",
                      _DUPE_SOURCE.format(dist="gptq-dupe-two")),
    ]
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), *map(str, projects)],
        check=True, capture_output=True, timeout=300,
    )
    return target


def _backends_list(target: Path, **env: str) -> tuple[int, list[dict], str]:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(target), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep), **env}
    environ.pop("GPTQ_BACKEND", None)
    code = "import sys; from gptq_core.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "backends", "list", "--json",
                           "--device", "cpu"], capture_output=True, text=True, env=environ,
                          timeout=300)
    rows = json.loads(proc.stdout) if proc.stdout.strip() else []
    return proc.returncode, rows, proc.stderr


def test_broken_and_conflicting_plugins_are_isolated(installed_plugins):
    code, rows, stderr = _backends_list(installed_plugins, GPTQ_DISABLED_BACKENDS="example")
    assert code == 0, stderr
    by_name = {r["name"]: r for r in rows}
    broken = by_name["broken"]
    assert broken["status"] == "broken"
    assert broken["distribution"] == "gptq-broken-plugin" and broken["version"] == "1.2.3"
    assert "this plugin is broken on purpose" in broken["reasons"][0]
    assert "RuntimeError" in broken["reasons"][0]
    typo = by_name["typo"]
    assert typo["status"] == "broken" and typo["distribution"] == "gptq-typo-plugin"
    assert "unknown hook 'gptq_prob' (did you mean gptq_probe?)" in typo["reasons"][0]
    dupe = by_name["dupe"]
    assert dupe["status"] == "broken"
    assert "gptq-dupe-one" in dupe["reasons"][0] and "gptq-dupe-two" in dupe["reasons"][0]
    torch_row = by_name["torch"]
    assert torch_row["status"] == "available" and torch_row["bits"] == [2, 3, 4, 8]
    example = by_name["example"]  # GPTQ_DISABLED_BACKENDS turns it off; it stays listed
    assert (example["status"], example["distribution"]) == ("disabled", "gptq-backend-example")
    assert example["reasons"] == ["disabled by GPTQ_DISABLED_BACKENDS"]


def test_identity_comes_from_the_entry_point_and_its_distribution(installed_plugins):
    code, rows, stderr = _backends_list(installed_plugins)
    assert code == 0, stderr
    by_name = {r["name"]: r for r in rows}
    minimal = by_name["minimal"]  # declares nothing: all three from the entry point
    assert (minimal["status"], minimal["distribution"], minimal["version"]) == (
        "available", "gptq-minimal-plugin", "1.2.3")
    renamed = by_name["renamed"]  # the name may be overridden; version and distribution not
    assert (renamed["status"], renamed["distribution"], renamed["version"]) == (
        "available", "gptq-renamed-plugin", "1.2.3")
    assert "alias" not in by_name
    assert (by_name["torch"]["distribution"], by_name["torch"]["version"]) == (
        "gptq-backends", version("gptq-backends"))


def test_disabled_plugins_are_listed_and_never_imported(installed_plugins):
    code, rows, stderr = _backends_list(installed_plugins,
                                        GPTQ_DISABLED_BACKENDS=" broken , dupe,renamed")
    assert code == 0, stderr
    by_name = {r["name"]: r for r in rows}
    # importing 'broken' raises: listed as disabled, not broken, proves it was not imported
    for name, dist in (("broken", "gptq-broken-plugin"), ("dupe", "gptq-dupe-"),
                       ("renamed", "gptq-renamed-plugin")):
        row = by_name[name]
        assert (row["status"], row["version"]) == ("disabled", "1.2.3")
        assert row["distribution"].startswith(dist)
        assert row["reasons"] == ["disabled by GPTQ_DISABLED_BACKENDS"]
    assert by_name["torch"]["status"] == "available"


# ---------------------------------------------------------------------- in-process registry
def test_conflict_names_both_distributions_and_keeps_others():
    reg = Registry()
    reg.register(StubBackend("same", CPU4, distribution="dist-a"))
    with pytest.raises(BackendConflictError, match="'dist-a' and 'dist-b'"):
        reg.register(StubBackend("same", CPU4, distribution="dist-b"))
    assert "same" not in reg.backends and reg.broken["same"].conflict
    with pytest.raises(BackendConflictError, match="dist-a"):
        reg.get("same")
    reg.register(StubBackend("other", CPU4))
    assert reg.get("other").name == "other"


def test_registration_rejects_incomplete_plugins():
    class NoQmatmul:
        gptq_backend_info = StubBackend.gptq_backend_info
        info = StubBackend("partial", CPU4).info

    with pytest.raises(GPTQError, match="required hooks.*gptq_pack"):
        Registry().register(NoQmatmul())

    class SwappedArguments(StubBackend):
        @hookimpl
        def gptq_qmatmul(self, prepared, x, bias):  # the core calls it positionally
            return x

    with pytest.raises(GPTQError, match=r"\('x', 'prepared', 'bias'\)"):
        Registry().register(SwappedArguments("sig", CPU4))

    class UnknownArgument(StubBackend):
        @hookimpl
        def gptq_qmatmul(self, inp, prepared, bias):
            return inp

    with pytest.raises(GPTQError, match="(?s)could not be registered.*inp"):
        Registry().register(UnknownArgument("arg", CPU4))

    class WrongInfo(StubBackend):
        @hookimpl
        def gptq_backend_info(self):
            return {"name": "dict"}

    with pytest.raises(GPTQError, match="expected BackendInfo"):
        Registry().register(WrongInfo("info", CPU4))


def test_misspelled_hook_is_an_error_naming_it():
    class Misspelled(StubBackend):
        @hookimpl
        def gptq_prob(self, device, spec):
            return ["never asked"]

        @hookimpl
        def gptq_qmatmull(self, x, prepared, bias):
            return x

    reg = Registry()
    with pytest.raises(GPTQError) as info:
        reg.register(Misspelled("typo", CPU4))
    text = str(info.value)
    assert "unknown hook 'gptq_prob' (did you mean gptq_probe?)" in text
    assert "unknown hook 'gptq_qmatmull' (did you mean gptq_qmatmul?)" in text
    assert "typo" not in reg.backends and not reg.pm.get_plugins()
    reg.register(StubBackend("fine", CPU4))  # the refused plugin leaves nothing pending behind
    assert set(reg.backends) == {"fine"}


def test_plugin_registered_by_hand_keeps_its_declared_identity():
    reg = Registry()
    stub = reg.register(StubBackend("declared", CPU4, distribution="dist-declared"))
    assert (stub.info.distribution, stub.info.version) == ("dist-declared", "0.0.0")

    class Anonymous(StubBackend):
        @hookimpl
        def gptq_backend_info(self):
            return BackendInfo(capabilities=CPU4)

    with pytest.raises(GPTQError, match=r"no name.*BackendInfo\(name=\.\.\.\)"):
        reg.register(Anonymous("ignored", CPU4))
    named = reg.register(Anonymous("ignored", CPU4), name="anonymous")
    assert (named.name, named.info.distribution, named.info.version) == (
        "anonymous", "unknown", "unknown")


def test_get_unknown_backend_lists_installed():
    reg = Registry()
    reg.register(StubBackend("alpha", CPU4))
    with pytest.raises(GPTQError, match=r"no backend named 'beta' is installed \(installed: alpha\)"):
        reg.get("beta")


def test_unregister_allows_registering_the_name_again():
    reg = Registry()
    reg.register(StubBackend("again", CPU4))
    generation = reg.generation
    reg.unregister("again")
    assert reg.generation > generation and "again" not in reg.backends
    reg.register(StubBackend("again", CPU4))
    assert "again" in reg.backends


def test_discover_honours_disabled_backends(monkeypatch):
    monkeypatch.setenv("GPTQ_DISABLED_BACKENDS", "example;triton")
    reg = Registry.discover()
    assert "torch" in reg.backends
    assert "example" not in reg.backends and "triton" not in reg.backends
    assert set(reg.disabled) == {"example", "triton"} and "example" not in reg.broken
    with pytest.raises(GPTQError, match="'example' is disabled by GPTQ_DISABLED_BACKENDS; remove"):
        reg.get("example")
    plan = selector.plan(SPEC, DeviceInfo.of("cpu"), registry=reg)
    assert plan.rejected["example"] == ["disabled by GPTQ_DISABLED_BACKENDS"]
    monkeypatch.setenv("GPTQ_DISABLED_BACKENDS", "")
    reg = Registry.discover()
    assert "example" in reg.backends and not reg.disabled


def test_environment_lists_share_one_reading(monkeypatch):
    monkeypatch.setenv("GPTQ_BACKEND", " marlin, ;triton ,")
    assert names_from_env("GPTQ_BACKEND") == ("marlin", "triton")
    assert selector.parse_preference(None) == ("marlin", "triton")
    assert selector.parse_preference("torch ; example") == ("torch", "example")
    monkeypatch.setenv("GPTQ_BACKEND", "auto")
    assert selector.parse_preference(None) is None
    monkeypatch.delenv("GPTQ_BACKEND")
    assert names_from_env("GPTQ_BACKEND") == () and selector.parse_preference("auto") is None


def test_global_registry_has_the_installed_backends():
    reg = get_registry()
    assert {"torch", "example"} <= set(reg.backends)
    torch_backend = reg.get("torch")
    assert torch_backend.info.capabilities.bits == (2, 3, 4, 8)
    assert torch_backend.info.capabilities.training and torch_backend.info.capabilities.compile
    assert callable(torch_backend.qmatmul)
