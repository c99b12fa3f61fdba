"""The plugin contract: the hooks a backend implements (pluggy project name ``gptq``).

A backend is one plugin object (a module or an instance) exposed through an entry point in
the group ``gptq.backends``::

    # pyproject.toml of your distribution
    [project.entry-points."gptq.backends"]
    mykernel = "my_gptq_kernel.plugin"

Each plugin answers for exactly one backend. The registry resolves every plugin's own
implementations once at discovery (see :class:`gptq_core.backend.Backend`), so the selector
calls them per backend and nothing of pluggy runs in ``QuantLinear.forward``.

A complete example lives in ``examples/third_party_backend``; the four hooks below each show
the shape of an implementation.
"""

from __future__ import annotations

from typing import Any

import pluggy
import torch

from .backend import BackendInfo
from .device import DeviceInfo
from .format import PackedWeight
from .options import BackendOptions
from .spec import LayerSpec

PROJECT = "gptq"
ENTRY_POINT_GROUP = "gptq.backends"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate your hook implementations with this marker.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def gptq_backend_info() -> BackendInfo:
    """Say what this backend can do (required).

    Its name is the entry point's name, its version and distribution those of the
    distribution that declares the entry point; set ``name=`` only to differ from the entry
    point (docs/DESIGN.md §3).

    Example::

        @hookimpl
        def gptq_backend_info():
            return BackendInfo(
                priority={"cuda": 50},
                capabilities=Capabilities(
                    device_kinds=frozenset({"cuda"}),
                    bits=(4,),
                    group_sizes=(-1, 128),
                    act_dtypes=(torch.float16,),
                    min_compute_capability=(8, 0),
                    k_multiple=128,
                ),
            )
    """


@hookspec
def gptq_probe(device: DeviceInfo, spec: LayerSpec | None) -> list[str]:
    """Return the reasons this backend cannot serve ``spec`` on ``device``; [] means yes.

    Called only after the declared :class:`~gptq_core.backend.Capabilities` accepted the
    device (and the layer, when ``spec`` is given), so check only what is dynamic: a library
    that failed to import, an extension that did not build. ``spec=None`` asks about the
    device alone (``gptq backends list``). Optional.

    Example::

        @hookimpl
        def gptq_probe(device, spec):
            try:
                load_extension()
            except RuntimeError as exc:
                return [f"extension not built: {exc}"]
            return []
    """


@hookspec
def gptq_pack(
    weight: PackedWeight, device: DeviceInfo, spec: LayerSpec, options: BackendOptions
) -> Any:
    """Turn a :class:`PackedWeight` into this backend's prepared form, on ``device`` (required).

    Runs once per layer at load. Must not modify ``weight``'s tensors; may return any object
    (a dataclass of tensors is usual). Raise :class:`~gptq_core.errors.NotSupportedError` for
    anything the declared capabilities let through but the kernel cannot take.

    ``options`` is this backend's :attr:`BackendInfo.options` instance, parsed and validated
    by the core (leave the parameter out if the backend has none). Decide here, once, which
    kernel serves which batch size, and keep that decision on the prepared object as
    ``policy`` (a :class:`~gptq_core.policy.DispatchPolicy`): ``gptq backends explain`` shows
    it, and ``gptq_qmatmul`` follows it without re-deciding per call (docs/DESIGN.md §12).
    Everything a call needs (workspaces, scratch buffers) belongs to the prepared object too,
    so that calls allocate nothing that outlives them and CUDA graphs can capture them.

    The prepared object may carry ``eager_qmatmul(x, bias)`` (docs/DESIGN.md §3): a direct
    entry taking ``[..., K]`` inputs as they are, which ``QuantLinear`` uses for plainly eager
    calls.

    Example::

        @hookimpl
        def gptq_pack(weight, device, spec):
            w = weight.to(device.torch_device)
            return MyPrepared(tiles=reorder_to_tiles(w.qweight), scales=w.scales)
    """


@hookspec
def gptq_qmatmul(x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """Compute ``x @ W.T (+ bias)`` (required). The hot path: keep Python work minimal.

    The core guarantees ``x`` is a contiguous 2-D [M, K] tensor (M may be 0) of a declared
    activation dtype on the prepared weight's device, and ``bias`` is fp16 [N] or None.
    Return [M, N] in ``x.dtype``. Route the kernel through a ``torch.library`` custom op with
    a fake implementation so ``torch.compile`` can capture it. Parameters must be named
    exactly ``x, prepared, bias`` in this order: the core calls the function positionally.

    Example::

        @hookimpl
        def gptq_qmatmul(x, prepared, bias):
            return torch.ops.mykernel.gemm(x, prepared.tiles, prepared.scales, bias)
    """
