"""What the kernels run on: Triton's interpreter or a GPU (its name and multiprocessor count),
and the choices that follow from it (the dequantization float, the inline-PTX dequant).

``TRITON_INTERPRET`` is Triton's own variable; :func:`interpreting` is the one place this
package reads it. The kernels module is imported on first use, so a test that sets the
variable before its first launch is honoured.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

_device_props: dict[torch.device, tuple[str, int]] = {}


def interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_compat() -> None:
    """Let Triton 3.6's interpreter run loops with run-time bounds under numpy >= 2.4.

    The interpreter holds scalars as 1-element arrays and turns a loop bound into
    ``int(array)``, which numpy 2.4 refuses; this patch (active only while a kernel is
    interpreted, and only under TRITON_INTERPRET=1) reads the element instead.
    """
    from triton.runtime import interpreter  # noqa: PLC0415

    original = interpreter._patch_lang_tensor
    if getattr(original, "_gptq_compat", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._gptq_compat = True
    interpreter._patch_lang_tensor = patched


def kernels() -> ModuleType:
    """The kernels module, imported on first use: Triton reads TRITON_INTERPRET when a kernel
    is decorated. (Triton's own library functions, e.g. ``tl.cdiv`` and ``tl.zeros``, were
    decorated when triton was imported, so the kernels avoid them: a test may set the flag
    after that import.)"""
    from . import kernels as module  # noqa: PLC0415

    if interpreting():
        _interpreter_compat()
    return module


def mode_for(dtype: torch.dtype, bits: int) -> int:
    """Dequantization float of the kernels (0 fp16, 1 bf16, 2 fp32) for an activation dtype."""
    if dtype == torch.float16:
        return 0
    if dtype == torch.bfloat16 and bits <= 4 and not interpreting():
        # Triton 3.6's interpreter computes garbage from a bf16 made by bitcast, so it checks
        # bf16 through the fp32 path; the bf16 path itself is checked on the GPU.
        return 1
    return 2


def is_hip() -> bool:
    """Whether torch is a ROCm build, so its "cuda" devices are AMD GPUs (64-lane wavefronts,
    MFMA): the configurations then come from ``configs.AMD_DEFAULT_RULES``."""
    return torch.version.hip is not None


def use_asm(device: torch.device, dtype: torch.dtype, bits: int) -> bool:
    """Whether the fused kernel dequantizes through the single-LOP3 inline PTX: fp16 on CUDA,
    2/4/8-bit (3-bit has its own sequence); never under the interpreter or on ROCm. It was
    faster on every tile measured (NOTES/perf-triton.md, "Variants removed")."""
    return (mode_for(dtype, bits) == 0 and bits != 3 and device.type == "cuda"
            and torch.version.hip is None and not interpreting())


def device_props(device: torch.device) -> tuple[str, int]:
    """(GPU name, multiprocessor count); ("interpreter", 4) for CPU tensors. Looked up once per
    device, when a layer is prepared."""
    props = _device_props.get(device)
    if props is None:
        if device.type == "cuda":
            p = torch.cuda.get_device_properties(device)
            props = (p.name, p.multi_processor_count)
        else:
            props = ("interpreter", 4)
        _device_props[device] = props
    return props
