"""Everything that needs Intel Gaudi, in one place: the probe and the dequantize op.

Nothing else in this package imports ``habana_frameworks``; the rest is plain torch and is
tested on the CPU. ``habana_frameworks.torch.core`` registers the ``hpu`` device with torch
(``torch.hpu``) and the ``torch.ops.hpu`` custom ops, among them ``convert_from_uint4``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

#: The Gaudi op this backend is built on (layout.py documents what it reads).
OP_NAME = "convert_from_uint4"


@functools.cache
def unavailable_reason() -> str | None:
    """Why no layer can run here (None: habana_frameworks, an HPU and the op are all present).

    Read once per process: importing the Gaudi bridge is slow and its answer does not change.
    """
    if importlib.util.find_spec("habana_frameworks") is None:
        return "habana_frameworks not installed"
    try:
        importlib.import_module("habana_frameworks.torch.core")
    except Exception as exc:  # a broken Gaudi install is a reason, not a crash
        return f"habana_frameworks.torch failed to import: {type(exc).__name__}: {exc}"
    hpu = getattr(torch, "hpu", None)
    if hpu is None or not hpu.is_available() or hpu.device_count() == 0:
        return "no HPU device"
    if not hasattr(torch.ops.hpu, OP_NAME):
        return f"this habana_frameworks has no torch.ops.hpu.{OP_NAME}"
    return None


def convert_from_uint4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The dequantized weight [K, N] in ``dtype``, computed on the HPU by Gaudi's op."""
    return torch.ops.hpu.convert_from_uint4(qweight, scales, zeros, dtype)
