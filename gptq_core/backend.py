"""What a backend declares about itself: identity, priorities and capabilities, as data.

The selector checks :class:`Capabilities` generically, so every backend's limits are explained
in the same words; a backend's ``gptq_probe`` hook adds what only it can know at run time
("extension not built: nvcc not found").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .device import DeviceInfo
from .errors import NotSupportedError
from .options import BackendOptions
from .policy import DispatchPolicy
from .spec import LayerSpec, dtype_name

ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Capabilities:
    """Declarative limits of a backend (xformers-style): checked by the core, tested by the suite.

    ``group_sizes=None`` means any group size; ``k_multiple``/``n_multiple`` are tile
    constraints on K (in_features) and N (out_features).
    """

    device_kinds: frozenset[str]
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...] | None = None
    sym: bool = True
    asym: bool = True
    desc_act: bool = True
    act_dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    min_compute_capability: tuple[int, int] | None = None
    k_multiple: int = 1
    n_multiple: int = 1
    k_divisible_by_group: bool = False
    training: bool = False
    compile: bool = False

    def device_reasons(self, device: DeviceInfo) -> list[str]:
        """Why this device cannot be served at all (empty when it can)."""
        reasons = []
        if device.kind not in self.device_kinds:
            kinds = ", ".join(sorted(self.device_kinds))
            reasons.append(f"runs on {kinds} devices, this is {device.kind}")
        elif (
            self.min_compute_capability is not None
            and device.kind == "cuda"
            and device.compute_capability is not None
            and device.compute_capability < self.min_compute_capability
        ):
            need = ".".join(map(str, self.min_compute_capability))
            have = ".".join(map(str, device.compute_capability))
            reasons.append(f"requires compute capability >= {need}, this GPU has {have}")
        return reasons

    def layer_reasons(self, spec: LayerSpec) -> list[str]:
        """Why this layer cannot be served (empty when it can)."""
        reasons = []
        if spec.bits not in self.bits:
            reasons.append(f"{spec.bits}-bit is not supported (supports {list(self.bits)})")
        if self.group_sizes is not None and spec.group_size not in self.group_sizes:
            reasons.append(
                f"group size {spec.group_size} is not supported (supports {list(self.group_sizes)})"
            )
        if spec.sym and not self.sym:
            reasons.append("symmetric quantization is not supported")
        if not spec.sym and not self.asym:
            reasons.append("asymmetric quantization (sym=False) is not supported")
        if spec.desc_act and not self.desc_act:
            reasons.append("act-order (desc_act=True) is not supported")
        if spec.act_dtype not in self.act_dtypes:
            names = ", ".join(dtype_name(d) for d in self.act_dtypes)
            reasons.append(f"activation dtype {dtype_name(spec.act_dtype)} is not supported ({names})")
        if spec.in_features % self.k_multiple:
            reasons.append(f"K={spec.in_features} is not divisible by {self.k_multiple}")
        if spec.out_features % self.n_multiple:
            reasons.append(f"N={spec.out_features} is not divisible by {self.n_multiple}")
        if self.k_divisible_by_group and spec.group_size != -1 and spec.in_features % spec.group_size:
            reasons.append(f"K={spec.in_features} is not divisible by group size {spec.group_size}")
        if spec.mode == "training" and not self.training:
            reasons.append("no backward pass: cannot be used for training (e.g. LoRA)")
        if spec.mode == "compile" and not self.compile:
            reasons.append("not declared compatible with torch.compile")
        return reasons


@dataclass(frozen=True, kw_only=True)
class BackendInfo:
    """Who a backend is and what it can do. Returned by its ``gptq_backend_info`` hook.

    ``name``, ``version`` and ``distribution`` come from the entry point that found the plugin
    and its distribution's metadata (docs/DESIGN.md §3), so a plugin does not re-type them;
    ``name`` may be set to differ from the entry point's name. ``version`` and
    ``distribution`` are filled in by the registry: what a plugin declares there is used only
    when it is registered by hand, without an entry point.

    ``priority`` maps a device kind ("cuda", "rocm", "cpu", "hpu", or "*" for any) to a rank:
    higher serves first. Defaults that ship with this project: marlin 100, exllama 80,
    cuda 60, triton 40, torch 0.
    """

    capabilities: Capabilities
    name: str | None = None
    version: str | None = None
    distribution: str | None = None
    priority: Mapping[str, int] = field(default_factory=dict)
    description: str = ""
    #: The backend's typed options (docs/DESIGN.md §12); the base class has none.
    options: type[BackendOptions] = BackendOptions

    def priority_for(self, device: DeviceInfo) -> int:
        return int(self.priority.get(device.kind, self.priority.get("*", 0)))


QMatmul = Callable[[torch.Tensor, Any, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Backend:
    """A loaded backend: its declared info and its own hook implementations, resolved once.

    The registry builds these from pluggy's hook implementations so that nothing of pluggy
    runs when a layer computes.
    """

    info: BackendInfo
    plugin: object
    probe_fn: Callable[..., list[str]] | None
    pack_fn: Callable[..., Any]
    qmatmul: QMatmul
    #: Whether ``pack_fn`` takes the ``options`` argument (the parameter is optional).
    pack_takes_options: bool = False

    @property
    def name(self) -> str:
        return self.info.name

    def reasons(self, device: DeviceInfo, spec: LayerSpec | None = None) -> list[str]:
        """Every reason this backend cannot serve ``spec`` on ``device`` (empty: it can).

        Declared capabilities are checked first; the backend's own probe runs only when they
        pass, so probes may assume their declared device kind.
        """
        caps = self.info.capabilities
        reasons = caps.device_reasons(device)
        if spec is not None:
            reasons += caps.layer_reasons(spec)
        if reasons:
            return reasons
        if self.probe_fn is not None:
            try:
                reasons = list(self.probe_fn(device=device, spec=spec) or [])
            except Exception as exc:  # a crashing probe is a rejection, not a crash
                reasons = [f"probe failed: {type(exc).__name__}: {exc}"]
        return reasons

    def default_options(self) -> BackendOptions:
        """The options a layer gets when the user set none (environment fallbacks applied)."""
        return self.info.options.parse(None, self.name)

    def prepare(self, weight, device: DeviceInfo, spec: LayerSpec,
                options: BackendOptions | None = None) -> Any:
        """Check, then run the backend's ``gptq_pack``; raise NotSupportedError with reasons."""
        reasons = self.reasons(device, spec)
        if reasons:
            raise NotSupportedError(
                f"backend '{self.name}' cannot serve {spec.describe()} on {device.describe()}: "
                + "; ".join(reasons),
                reasons,
            )
        if not self.pack_takes_options:
            return self.pack_fn(weight=weight, device=device, spec=spec)
        if options is None:
            options = self.default_options()
        return self.pack_fn(weight=weight, device=device, spec=spec, options=options)


def policy_of(backend: Backend, prepared: Any) -> DispatchPolicy:
    """The prepared weight's dispatch policy, or one path named after the backend."""
    policy = getattr(prepared, "policy", None)
    return policy if isinstance(policy, DispatchPolicy) else DispatchPolicy.single(backend.name)


def hint_of(prepared: Any) -> str:
    """The prepared weight's ``hint`` (what one of its backend's options would change for the
    layer, shown by `gptq backends explain`), or ""."""
    hint = getattr(prepared, "hint", "")
    return hint if isinstance(hint, str) else ""
