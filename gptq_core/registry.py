"""Discovery of backends through the ``gptq.backends`` entry point group.

Loading is isolated: a plugin whose import or registration fails is recorded as broken with its
error, and every other backend keeps working. Two plugins claiming one backend name are both
marked broken with an error naming both distributions. ``GPTQ_DISABLED_BACKENDS=a,b`` turns
backends off before they are imported; they stay listed, with status "disabled".

``GPTQ_BACKEND`` and ``GPTQ_DISABLED_BACKENDS`` are the only global switches
(docs/DESIGN.md §12); both are lists of backend names read by :func:`names_from_env`.
"""

from __future__ import annotations

import difflib
import inspect
import os
import threading
import traceback
from dataclasses import dataclass, replace
from importlib.metadata import EntryPoint, entry_points

import pluggy

from . import hookspecs
from .backend import Backend, BackendInfo
from .errors import BackendConflictError, GPTQError
from .options import parse_value

#: Backends that ``pip install gptq-core[NAME]`` brings (the extras of the root pyproject).
INSTALL_EXTRAS = ("cuda", "marlin", "exllama", "rocm", "hpu")
REQUIRED_HOOKS = ("gptq_backend_info", "gptq_pack", "gptq_qmatmul")
QMATMUL_PARAMS = ("x", "prepared", "bias")
#: Version or distribution of a plugin registered by hand that declares none.
UNKNOWN = "unknown"
#: The ordered backend preference (docs/DESIGN.md §4), e.g. ``marlin,triton``.
BACKEND_ENV = "GPTQ_BACKEND"
#: Backends not to import at all, e.g. ``triton,example``.
DISABLED_ENV = "GPTQ_DISABLED_BACKENDS"

#: GPTQModel's backend names (gptqmodel/utils/backend.py, BACKEND) -> the gptq-core backend that
#: serves the same role, so a user's ``backend="gptq_marlin"`` or ``GPTQ_BACKEND=gptq_triton``
#: works unchanged. Only names with a counterpart here are listed.
BACKEND_ALIASES: dict[str, str] = {
    "gptq_marlin": "marlin",
    "gptq_triton": "triton",
    "gptq_torch": "torch",
    "gptq_exllama_v2": "exllama",
    "exllama_v2": "exllama",
}


def canonical_backend_name(name: str) -> str:
    """``name`` with GPTQModel's spelling mapped onto gptq-core's (:data:`BACKEND_ALIASES`)."""
    return BACKEND_ALIASES.get(name.strip().lower(), name) if isinstance(name, str) else name


@dataclass(frozen=True)
class BrokenBackend:
    """A plugin that could not be loaded, kept so that ``gptq backends list`` can show why."""

    name: str
    distribution: str
    version: str
    entry_point: str
    error: str
    conflict: bool = False


@dataclass(frozen=True)
class DisabledBackend:
    """A plugin turned off by ``GPTQ_DISABLED_BACKENDS``: listed, never imported."""

    name: str
    distribution: str
    version: str
    entry_point: str
    reason: str = f"disabled by {DISABLED_ENV}"


def names_from_env(variable: str) -> tuple[str, ...]:
    """The backend names listed in environment ``variable`` ("a,b"; blanks ignored), in order.

    Read with the options' own parser (:func:`gptq_core.options.parse_value`), so a list means
    the same in every variable and option.
    """
    names = parse_value(tuple, os.environ.get(variable, ""), variable)
    return tuple(canonical_backend_name(n) for n in names)


def disabled_backends() -> set[str]:
    """Names listed in ``GPTQ_DISABLED_BACKENDS``."""
    return set(names_from_env(DISABLED_ENV))


def _metadata(ep: EntryPoint) -> tuple[str | None, str | None]:
    """(distribution name, version) of the distribution declaring ``ep``, when known."""
    if ep.dist is None:
        return None, None
    return ep.dist.metadata["Name"], ep.dist.version


def _hook_callers(pm: pluggy.PluginManager) -> dict[str, pluggy.HookCaller]:
    return {name: caller for name, caller in vars(pm.hook).items() if not name.startswith("_")}


def _unknown_hook_message(pm: pluggy.PluginManager, plugin: object) -> str:
    """"unknown hook 'gptq_prob' (did you mean gptq_probe?)" for each of ``plugin``'s
    implementations that matches no hook of the spec."""
    callers = _hook_callers(pm)
    known = sorted(name for name, caller in callers.items() if caller.has_spec())
    parts = []
    for name, caller in sorted(callers.items()):
        if caller.has_spec() or all(impl.plugin is not plugin for impl in caller.get_hookimpls()):
            continue
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"unknown hook {name!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    return "; ".join(parts) + f" (the hooks are {', '.join(known)})"


def _own_impls(pm: pluggy.PluginManager, plugin: object) -> dict[str, object]:
    """The hook functions that ``plugin`` itself implements, by hook name."""
    found = {}
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin:
                found[caller.name] = impl.function
    return found


class Registry:
    """Every backend found, by name, plus the broken and the disabled ones. Build with
    :meth:`discover`."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.backends: dict[str, Backend] = {}
        self.broken: dict[str, BrokenBackend] = {}
        self.disabled: dict[str, DisabledBackend] = {}
        self.generation = 0
        self._sources: dict[str, str] = {}  # backend name -> distribution
        # Imported here: selector.py imports this module for get_registry and the env names.
        from .selector import Selector

        #: Chooses backends for layers; its caches belong to this registry.
        self.selector = Selector(self)

    # ------------------------------------------------------------------ loading
    @classmethod
    def discover(cls, group: str = hookspecs.ENTRY_POINT_GROUP) -> Registry:
        """Load every entry point of ``group``, isolating failures."""
        reg = cls()
        off = disabled_backends()
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            if ep.name in off:
                reg._mark_disabled(ep.name, *_metadata(ep), ep.value)
            else:
                reg._load_entry_point(ep, off)
        return reg

    def _load_entry_point(self, ep: EntryPoint, off: set[str]) -> None:
        dist, version = _metadata(ep)
        try:
            plugin = ep.load()
        except BaseException as exc:  # noqa: BLE001 - a plugin may raise anything on import
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self._mark_broken(ep.name, dist, version, ep.value, f"import failed: {detail}")
            return
        try:
            backend = self.register(plugin, name=ep.name, distribution=dist, version=version,
                                    entry_point=ep.value)
        except BackendConflictError:
            return  # already recorded as broken on both sides
        except Exception as exc:  # noqa: BLE001
            self._mark_broken(ep.name, dist, version, ep.value, f"registration failed: {exc}")
            return
        if backend.name in off:  # disabled by the name it gave itself, not its entry point's
            self.unregister(backend.name)
            self._mark_disabled(backend.name, dist, version, ep.value)

    def _mark_disabled(self, name, dist, version, entry_point) -> None:
        self.disabled[name] = DisabledBackend(name, dist or UNKNOWN, version or UNKNOWN, entry_point)
        self.generation += 1

    def _mark_broken(self, name, dist, version, entry_point, error, conflict=False) -> None:
        self.broken[name] = BrokenBackend(name, dist or UNKNOWN, version or UNKNOWN,
                                          entry_point, error, conflict)
        self.generation += 1

    def register(
        self,
        plugin: object,
        name: str | None = None,
        distribution: str | None = None,
        version: str | None = None,
        entry_point: str = "",
    ) -> Backend:
        """Register one plugin object (module or instance) as a backend and return it.

        ``name``, ``distribution`` and ``version`` are those of the entry point that found the
        plugin (:meth:`discover` passes them); the plugin's :class:`BackendInfo` may override
        the name only. Registered by hand without them, the plugin's declared values are kept,
        "unknown" where it declares none.
        """
        # Unique per plugin object: two distributions may use one entry-point name, and that
        # conflict must surface as a name conflict naming both, not as a pluggy error.
        pm_name = f"gptq-backend-{name or 'plugin'}-{id(plugin)}"
        try:
            self.pm.register(plugin, name=pm_name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise GPTQError(f"plugin {name!r} could not be registered: {exc}") from exc
        try:
            # pluggy accepts an implementation of a hook it has no spec for (it might be
            # declared later); every hook is declared up front here, so one is a misspelling.
            try:
                self.pm.check_pending()
            except pluggy.PluginValidationError as exc:
                raise GPTQError(_unknown_hook_message(self.pm, plugin)) from exc
            impls = _own_impls(self.pm, plugin)
            missing = [h for h in REQUIRED_HOOKS if h not in impls]
            if missing:
                raise GPTQError(f"does not implement the required hooks {missing}")
            declared = impls["gptq_backend_info"]()
            if not isinstance(declared, BackendInfo):
                raise GPTQError(
                    f"gptq_backend_info returned {type(declared).__name__}, expected BackendInfo"
                )
            if not (declared.name or name):
                raise GPTQError(
                    "the plugin has no name: it was registered without an entry point and its "
                    "BackendInfo sets no name; pass BackendInfo(name=...) or register(..., name=...)"
                )
            info = replace(
                declared,
                name=declared.name or name,
                distribution=distribution or declared.distribution or UNKNOWN,
                version=version or declared.version or UNKNOWN,
            )
            params = tuple(inspect.signature(impls["gptq_qmatmul"]).parameters)
            if params != QMATMUL_PARAMS:
                raise GPTQError(
                    f"gptq_qmatmul must take parameters {QMATMUL_PARAMS} in that order, has {params}"
                )
            if info.name in self.backends or info.name in self._sources:
                other = self._sources.get(info.name, UNKNOWN)
                message = (
                    f"backend name '{info.name}' is registered by two distributions: "
                    f"'{other}' and '{info.distribution}'; uninstall one of them or disable one "
                    f"with GPTQ_DISABLED_BACKENDS"
                )
                self.backends.pop(info.name, None)
                self._mark_broken(info.name, f"{other} + {info.distribution}", info.version,
                                  entry_point, message, conflict=True)
                raise BackendConflictError(message)
            backend = Backend(
                info=info,
                plugin=plugin,
                probe_fn=impls.get("gptq_probe"),
                pack_fn=impls["gptq_pack"],
                qmatmul=impls["gptq_qmatmul"],
                pack_takes_options="options" in inspect.signature(impls["gptq_pack"]).parameters,
            )
        except Exception:
            self.pm.unregister(plugin)
            raise
        self._sources[info.name] = info.distribution
        self.backends[info.name] = backend
        self.generation += 1
        return backend

    def unregister(self, name: str) -> None:
        """Remove a backend registered with :meth:`register` (tests, notebooks)."""
        backend = self.backends.pop(name)
        self._sources.pop(name, None)
        self.pm.unregister(backend.plugin)
        self.generation += 1

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> Backend:
        """The backend called ``name`` (or a GPTQModel alias of it), or a clear error saying
        what is installed."""
        name = canonical_backend_name(name)
        if name in self.backends:
            return self.backends[name]
        if name in self.broken:
            broken = self.broken[name]
            cls = BackendConflictError if broken.conflict else GPTQError
            raise cls(f"backend '{name}' is broken: {broken.error}")
        if name in self.disabled:
            raise GPTQError(
                f"backend '{name}' is {self.disabled[name].reason}; remove it from that "
                "variable to use it"
            )
        known = ", ".join(sorted(self.backends)) or "none"
        hint = (
            f"`pip install gptq-core[{name}]` installs it"
            if name in INSTALL_EXTRAS
            else f"the extras {', '.join(INSTALL_EXTRAS)} of gptq-core install more"
        )
        raise GPTQError(f"no backend named '{name}' is installed (installed: {known}); {hint}")


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, discovered on first use (``refresh=True`` discovers again)."""
    global _registry
    with _lock:
        if _registry is None or refresh:
            _registry = Registry.discover()
        return _registry
