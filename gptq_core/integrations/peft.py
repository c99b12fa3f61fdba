"""PEFT LoRA on gptq-core's :class:`~gptq_core.QuantLinear`, with nothing for the user to call.

PEFT picks the LoRA wrapper of each targeted module by a fixed list of dispatchers
(``LoraModel._create_new_module``): its GPTQ one needs gptqmodel's classes, and the rest
reject an unknown module with "Target module QuantLinear is not supported". :func:`register`
puts one dispatcher in front of that list: a QuantLinear (a fused projection's slice
included) gets :class:`QuantLoraLinear`, anything else goes to PEFT's own list unchanged.
``install`` does it as soon as PEFT's LoRA module is imported (``import gptq_core`` installs
it, importing nothing of PEFT's, whose import costs seconds).

The base layer runs its bound backend's kernel, forward and backward (gptq_core/training.py:
``dX = dY @ W`` with W dequantized in the activation dtype); only the adapters train.
Merging an adapter into a packed 2/3/4/8-bit weight would have to requantize it, so
``merge``/``merge_and_unload`` fail with one line saying what to do instead.

Tested with :data:`SUPPORTED` (PEFT's dispatch list and ``GPTQLoraLinear`` are internals);
outside it :func:`register` still tries, and a PEFT without the hook raises a clear error.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from torch import nn

logger = logging.getLogger("gptq_core")

#: The PEFT module whose import triggers the registration.
PEFT_LORA = "peft.tuners.lora.model"

#: PEFT releases this integration is tested with (the ``[peft]`` extra; 0.17 and older do not
#: import under transformers 5).
SUPPORTED = ">=0.18,<1"

MERGE_MESSAGE = (
    "cannot merge a LoRA adapter into a gptq-core QuantLinear: its weight is packed {bits}-bit "
    "integers, and adding the adapter would need a new quantization; keep the adapter separate "
    "(save_pretrained saves it alone), or merge it into the float model and quantize that again"
)

_lora_class: type | None = None


def quant_lora_linear() -> type:
    """The LoRA layer class for QuantLinear bases (built on first use: it subclasses PEFT's)."""
    global _lora_class
    if _lora_class is not None:
        return _lora_class
    from peft.tuners.lora.gptq import GPTQLoraLinear

    from ..errors import NotSupportedError

    class QuantLoraLinear(GPTQLoraLinear):
        """LoRA beside a QuantLinear: ``base(x) + B(A(dropout(x))) * scaling``, never merged.

        PEFT's GPTQ LoRA layer computes exactly that through the base module; this adds what
        a gptq-core base needs: its sizes without PEFT's "unsupported layer" warning, and a
        clear refusal to merge.
        """

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            raise NotSupportedError(MERGE_MESSAGE.format(bits=self.get_base_layer().bits))

        def unmerge(self) -> None:
            """Nothing is ever merged into a QuantLinear, so there is nothing to undo."""

    _lora_class = QuantLoraLinear
    return _lora_class


def dispatch_quant_linear(
    target: nn.Module, adapter_name: str, config: Any, **kwargs: Any
) -> nn.Module | None:
    """PEFT's dispatcher signature: a :class:`QuantLoraLinear` for a QuantLinear, else None."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..quant_linear import QuantLinear

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, QuantLinear):
        return None
    return quant_lora_linear()(target, adapter_name, config=config, **kwargs)


def register() -> None:
    """Put :func:`dispatch_quant_linear` in front of PEFT's LoRA dispatchers (idempotent)."""
    from peft.tuners.lora.model import LoraModel

    from ..errors import GPTQError

    current = LoraModel.__dict__.get("_create_new_module")
    fn = current.__func__ if isinstance(current, staticmethod) else current
    if fn is None:
        import peft

        raise GPTQError(
            f"PEFT {peft.__version__} has no LoraModel._create_new_module, which gptq-core's "
            f"LoRA support hooks into; install a tested PEFT: pip install 'peft{SUPPORTED}'"
        )
    if getattr(fn, "__gptq_core__", False):
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        module = dispatch_quant_linear(target, adapter_name, config=lora_config, **kwargs)
        return module if module is not None else fn(lora_config, adapter_name, target, **kwargs)

    _create_new_module.__gptq_core__ = True
    _create_new_module.__wrapped__ = fn
    LoraModel._create_new_module = staticmethod(_create_new_module)


def _register_after_import(_module: Any = None) -> None:
    try:
        register()
    except Exception as exc:  # noqa: BLE001 - never break the user's import of peft
        logger.warning("gptq-core could not register its PEFT LoRA integration: %s", exc)


def install() -> None:
    """Register now if PEFT's LoRA module is imported, else right after it is (cheap; safe
    without PEFT)."""
    from . import _AfterImport

    if PEFT_LORA in sys.modules:
        _register_after_import()
        return
    if not any(isinstance(f, _AfterImport) and f.name == PEFT_LORA for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(PEFT_LORA, _register_after_import))


def is_quant_lora(module: nn.Module) -> bool:
    """Whether ``module`` is a LoRA layer around a QuantLinear (for tests and tools)."""
    return _lora_class is not None and isinstance(module, _lora_class)


__all__ = ["MERGE_MESSAGE", "PEFT_LORA", "SUPPORTED", "dispatch_quant_linear", "install",
           "is_quant_lora", "quant_lora_linear", "register"]
