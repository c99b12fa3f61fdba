"""gptq-core: GPTQ weight-only quantization whose matmul kernels are plugins.

The packed format (:class:`PackedWeight`), the plugin contract (:mod:`gptq_core.hookspecs`),
the registry and selector, and :class:`QuantLinear` live here; kernels live in backends
discovered through the ``gptq.backends`` entry point group.
"""

from __future__ import annotations

from ._version import __version__
from .backend import Backend, BackendInfo, Capabilities
from .config import QuantizeConfig
from .device import DeviceInfo
from .errors import (
    BackendConflictError,
    CalibrationError,
    CheckpointError,
    FormatError,
    GPTQError,
    NoBackendError,
    NotSupportedError,
)
from .format import PackedWeight, pack_weight
from .hookspecs import ENTRY_POINT_GROUP, hookimpl
from .options import BackendOptions, OptionsError, option
from .policy import DispatchPolicy, Route
from .quant_linear import QuantLinear
from .registry import Registry, get_registry
from .rtn import quantize_rtn
from .selector import Binding, Plan, bind, plan
from .spec import LayerSpec
from .auto import AutoGPTQForCausalLM
from .integrations import install as _install_integrations

# transformers' from_pretrained loads GPTQ checkpoints through gptq-core once this package is
# imported; registration waits for transformers' quantizer table to be imported (it is slow).
_install_integrations()

__all__ = [
    "BackendOptions",
    "OptionsError",
    "option",
    "DispatchPolicy",
    "Route",
    "ENTRY_POINT_GROUP",
    "AutoGPTQForCausalLM",
    "Backend",
    "BackendConflictError",
    "BackendInfo",
    "Binding",
    "CalibrationError",
    "Capabilities",
    "CheckpointError",
    "DeviceInfo",
    "FormatError",
    "GPTQError",
    "LayerSpec",
    "NoBackendError",
    "NotSupportedError",
    "PackedWeight",
    "QuantizeConfig",
    "Plan",
    "QuantLinear",
    "Registry",
    "__version__",
    "bind",
    "get_registry",
    "hookimpl",
    "pack_weight",
    "plan",
    "quantize_rtn",
]
