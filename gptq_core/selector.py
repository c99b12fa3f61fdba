"""Choosing a backend for each layer, and explaining every choice and every rejection.

1. An explicit choice (``backend="marlin"``, or ``GPTQ_BACKEND=marlin,triton`` as an ordered
   preference list) is honoured or fails loudly with those backends' reasons.
2. Otherwise every backend is asked; the accepted ones are ranked by their declared priority
   for the device kind (data in each backend's :class:`BackendInfo`), the rest keep reasons.
3. The ranked list is the fallback chain: a backend that fails while packing or building is
   recorded with its error and the next one serves.
4. If nothing accepts, one error lists the layer, the device and every backend's reasons.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .backend import Backend, hint_of, policy_of
from .device import DeviceInfo
from .errors import GPTQError, NoBackendError, NotSupportedError
from .options import BackendOptions, check_backend_names, parse_value
from .policy import DispatchPolicy
from .registry import BACKEND_ENV, Registry, canonical_backend_name, get_registry, names_from_env
from .spec import LayerSpec

logger = logging.getLogger("gptq_core.selector")

INSTALL_HINT = (
    "install more backends with `pip install gptq-core[all]` (or [cuda], [marlin], [exllama], "
    "[rocm], [hpu]); `gptq backends list` shows what is installed and why each is usable or not"
)


def parse_preference(backend: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"auto"``/None -> GPTQ_BACKEND or None (automatic); ``"a,b"`` or [a, b] -> ("a", "b").

    GPTQModel's names (``gptq_marlin``...) are read as their gptq-core counterparts
    (:data:`gptq_core.registry.BACKEND_ALIASES`)."""
    if backend is None or backend == "auto":
        names = names_from_env(BACKEND_ENV)
    else:
        names = tuple(canonical_backend_name(n) for n in parse_value(tuple, backend, "backend"))
    return None if names in ((), ("auto",)) else names


@dataclass(frozen=True)
class Plan:
    """The outcome of asking every backend about one (device, layer spec)."""

    device: DeviceInfo
    spec: LayerSpec
    preference: tuple[str, ...] | None
    ranked: tuple[Backend, ...]
    rejected: dict[str, list[str]]

    def explain(self) -> str:
        """Multi-line explanation: the chain in order, then every rejection with reasons."""
        lines = [f"{self.spec.describe()} on {self.device.describe()}"]
        if self.preference:
            lines.append(f"  preference: {', '.join(self.preference)}")
        for i, b in enumerate(self.ranked):
            tag = "selected" if i == 0 else "fallback"
            lines.append(f"  {tag}: {b.name} (priority {b.info.priority_for(self.device)})")
        for name, reasons in self.rejected.items():
            lines.append(f"  rejected: {name}: {'; '.join(reasons)}")
        return "\n".join(lines)

    def no_backend_error(self, failures: dict[str, str] | None = None) -> NoBackendError:
        lines = [f"no backend can serve a {self.spec.describe()} layer on {self.device.describe()}:"]
        for name, reasons in self.rejected.items():
            lines.append(f"  - {name}: {'; '.join(reasons)}")
        for name, error in (failures or {}).items():
            lines.append(f"  - {name}: failed while preparing: {error}")
        if self.preference:
            lines.append(
                f"the preference {','.join(self.preference)} (backend= or GPTQ_BACKEND) limits the "
                "choice to those backends; use backend='auto' to let every backend compete"
            )
        lines.append(INSTALL_HINT)
        return NoBackendError("\n".join(lines))


@dataclass
class Binding:
    """A layer bound to one backend: the prepared weight and the function that computes it."""

    backend: Backend
    prepared: Any
    plan: Plan
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def qmatmul(self):
        return self.backend.qmatmul

    @property
    def policy(self) -> DispatchPolicy:
        """Which path of the backend serves which batch size (decided when it was prepared)."""
        return policy_of(self.backend, self.prepared)

    def explain(self) -> str:
        text = self.plan.explain()
        for name, error in self.failures.items():
            text += f"\n  failed: {name}: {error}"
        text += f"\n  => {self.backend.name}"
        policy = self.policy
        if policy != DispatchPolicy.single(self.backend.name):
            text += f"\n  paths: {policy.describe()}"
        if hint := hint_of(self.prepared):
            text += f"\n  hint: {hint}"
        return text


def parse_backend_options(
    values: Mapping[str, Mapping[str, object]] | None, registry: Registry | None = None
) -> dict[str, BackendOptions]:
    """``{"marlin": {"dense_cache_mb": "512"}}`` -> each named backend's typed options.

    Parsed once per load; an unknown backend or option is one clear :class:`OptionsError`.
    """
    registry = registry or get_registry()
    if values:
        values = {canonical_backend_name(name): fields for name, fields in values.items()}
    check_backend_names(values, set(registry.backends) | set(registry.broken) | set(registry.disabled))
    parsed = {}
    for name, fields in (values or {}).items():
        if name in registry.backends:
            backend = registry.backends[name]
            parsed[name] = backend.info.options.parse(fields, name)
    return parsed


#: What a plan depends on besides the registry: equal requests share one plan.
PlanKey = tuple[DeviceInfo, LayerSpec, "tuple[str, ...] | None"]


class Selector:
    """Chooses backends for one :class:`Registry` (its ``selector``), remembering its choices.

    Plans, and the backends that failed to build for a plan (not retried for the next layer),
    are kept by value: (device, layer spec, preference). A change to the registry (a backend
    registered or removed) forgets both.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._generation = registry.generation
        self._plans: dict[PlanKey, Plan] = {}
        self._failed: dict[tuple[PlanKey, str], str] = {}

    def clear(self) -> None:
        """Forget every plan and failure (after installing backends at run time)."""
        self._plans.clear()
        self._failed.clear()
        self._generation = self.registry.generation

    def _key(self, spec: LayerSpec, device: DeviceInfo, backend) -> PlanKey:
        if self.registry.generation != self._generation:
            self.clear()
        return (device, spec, parse_preference(backend))

    def plan(self, spec: LayerSpec, device: DeviceInfo,
             backend: str | Sequence[str] | None = None) -> Plan:
        """Rank the backends able to serve ``spec`` on ``device``."""
        return self._plan(self._key(spec, device, backend))

    def _plan(self, key: PlanKey) -> Plan:
        cached = self._plans.get(key)
        if cached is None:
            cached = self._plans[key] = self._rank(*key)
        return cached

    def _rank(self, device: DeviceInfo, spec: LayerSpec,
              preference: tuple[str, ...] | None) -> Plan:
        registry = self.registry
        rejected: dict[str, list[str]] = {}
        accepted: list[Backend] = []
        if preference is not None:
            for name in preference:
                try:
                    b = registry.get(name)
                except GPTQError as exc:
                    rejected[name] = [str(exc)]
                    if name in registry.disabled:  # asked for by name: never skip it silently
                        logger.warning("backend %r was asked for but is %s, so it is skipped; "
                                       "remove it from that variable to use it", name,
                                       registry.disabled[name].reason)
                    continue
                reasons = b.reasons(device, spec)
                if reasons:
                    rejected[name] = reasons
                else:
                    accepted.append(b)
        else:
            for name in sorted(registry.backends):
                b = registry.backends[name]
                reasons = b.reasons(device, spec)
                if reasons:
                    rejected[name] = reasons
                else:
                    accepted.append(b)
            for name, broken in sorted(registry.broken.items()):
                rejected[name] = [f"broken: {broken.error}"]
            for name, disabled in sorted(registry.disabled.items()):
                rejected[name] = [disabled.reason]
            accepted.sort(key=lambda b: (-b.info.priority_for(device), b.name))
        return Plan(device, spec, preference, tuple(accepted), rejected)

    def bind(
        self,
        weight,
        device: DeviceInfo,
        spec: LayerSpec,
        backend: str | Sequence[str] | None = None,
        options: Mapping[str, BackendOptions] | None = None,
    ) -> Binding:
        """Prepare ``weight`` with the first backend of the chain that succeeds.

        ``options`` maps backend names to their parsed options (:func:`parse_backend_options`);
        a backend not named gets its defaults.
        """
        key = self._key(spec, device, backend)
        chosen = self._plan(key)
        options = options or {}
        failures: dict[str, str] = {}
        for b in chosen.ranked:
            if (key, b.name) in self._failed:
                failures[b.name] = self._failed[(key, b.name)]
                continue
            try:
                prepared = b.prepare(weight, device, spec, options.get(b.name))
            except NotSupportedError as exc:
                failures[b.name] = "; ".join(exc.reasons) or str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a JIT build or pack failure falls back
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                failures[b.name] = self._failed[(key, b.name)] = detail
                continue
            return Binding(b, prepared, chosen, failures)
        raise chosen.no_backend_error(failures)


def plan(
    spec: LayerSpec,
    device: DeviceInfo,
    backend: str | Sequence[str] | None = None,
    registry: Registry | None = None,
) -> Plan:
    """:meth:`Selector.plan` of ``registry`` (default: the process-wide one)."""
    return (registry or get_registry()).selector.plan(spec, device, backend)


def bind(
    weight,
    device: DeviceInfo,
    spec: LayerSpec,
    backend: str | Sequence[str] | None = None,
    registry: Registry | None = None,
    options: Mapping[str, BackendOptions] | None = None,
) -> Binding:
    """:meth:`Selector.bind` of ``registry`` (default: the process-wide one)."""
    return (registry or get_registry()).selector.bind(weight, device, spec, backend, options)


def clear_cache(registry: Registry | None = None) -> None:
    """Forget the plans of ``registry`` (default: the process-wide one)."""
    (registry or get_registry()).selector.clear()
