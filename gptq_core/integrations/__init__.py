"""Integrations with other libraries, registered by ``import gptq_core`` at no import cost.

transformers (:mod:`gptq_core.integrations.transformers`) is registered when its quantizer
table (``transformers.quantizers.auto``) is imported, by whoever imports it first: importing
that module costs seconds, so ``import gptq_core`` only installs a post-import hook. If
transformers is missing, nothing happens; if registration fails, transformers still imports
and the reason is logged (the loader then reports it).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from types import ModuleType
from typing import Any

logger = logging.getLogger("gptq_core")

#: The module whose import triggers the transformers registration.
TRANSFORMERS_QUANTIZERS = "transformers.quantizers.auto"


#: Set when transformers' quantizer table was imported by our own integration module while
#: that module was still executing; it registers itself when it is done (:func:`take_pending`).
_PENDING: list[bool] = []


def take_pending() -> bool:
    """Whether a registration waits for ``gptq_core.integrations.transformers`` to finish
    importing (and forget it)."""
    pending = bool(_PENDING)
    _PENDING.clear()
    return pending


def _register_transformers(_module: ModuleType | None = None) -> None:
    ours = sys.modules.get(f"{__name__}.transformers")
    if ours is not None and not hasattr(ours, "register"):
        _PENDING.append(True)  # it imported transformers' table itself, half-way through
        return
    try:
        from .transformers import register

        register()
    except Exception as exc:  # noqa: BLE001 - never break the user's import of transformers
        logger.warning("gptq-core could not register its transformers integration: %s", exc)


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the callback once the module has executed."""

    def __init__(self, loader: importlib.abc.Loader, callback) -> None:
        self._loader, self._callback = loader, callback

    def create_module(self, spec: importlib.machinery.ModuleSpec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        self._callback(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of one module so ``callback`` runs after it."""

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once: the module is imported at most once
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, self.callback)
        return spec


def install() -> None:
    """Register the transformers integration now if its quantizer table is imported, else
    right after it is, and PEFT's LoRA dispatcher likewise (cheap; safe without either)."""
    from .peft import install as install_peft

    install_peft()  # PEFT LoRA on QuantLinear once peft.tuners.lora.model is imported
    if TRANSFORMERS_QUANTIZERS in sys.modules:
        _register_transformers()
        return
    if not any(isinstance(f, _AfterImport) and f.name == TRANSFORMERS_QUANTIZERS for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(TRANSFORMERS_QUANTIZERS, _register_transformers))
