"""Hook implementations of the ``triton`` backend (entry point ``gptq.backends: triton``)."""

from __future__ import annotations

import importlib.util

from gptq_core import BackendInfo, Capabilities, hookimpl
from gptq_core.errors import NotSupportedError

from .. import __version__
from .dispatch import prepare
from .layout import TritonPrepared
from . import ops  # imports triton itself only at the first launch
from .options import TritonOptions

#: Group sizes the kernels tile (K blocks of 16 or 32 channels inside one group).
GROUP_SIZES = (-1, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)

INTERPRET_HINT = (
    "CPU tensors run only under Triton's interpreter: set TRITON_INTERPRET=1 "
    "(slow, meant for testing the kernels without a GPU)"
)


@hookimpl
def gptq_backend_info() -> BackendInfo:
    return BackendInfo(
        name="triton",
        version=__version__,
        distribution="gptq-backends",
        priority={"cuda": 40, "rocm": 40},
        description=(
            "fused dequantize-in-registers Triton kernels: split-K for decode, tl.dot tiles for "
            "mid M, dequantize + cuBLAS for prefill; NVIDIA sm80+ (bf16 tensor-core MMA and "
            "cp.async pipelining, which older GPUs lack; those fall through to torch) and AMD"
        ),
        capabilities=Capabilities(
            device_kinds=frozenset({"cuda", "rocm", "cpu"}),
            bits=(2, 3, 4, 8),
            group_sizes=GROUP_SIZES,
            min_compute_capability=(8, 0),
            # backward dX = dY @ W by the core around this forward (gptq_core/training.py)
            training=True,
            compile=True,
        ),
        options=TritonOptions,
    )


@hookimpl
def gptq_probe(device, spec) -> list[str]:
    reasons = []
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed: pip install triton (or gptq-backends[triton])")
    if device.kind == "cpu" and not device.triton_interpret:
        reasons.append(INTERPRET_HINT)
    return reasons


@hookimpl
def gptq_pack(weight, device, spec, options: TritonOptions) -> TritonPrepared:
    if spec.group_size != weight.group_size or spec.bits != weight.bits:
        raise NotSupportedError(
            f"the layer spec ({spec.describe()}) does not match the weight "
            f"({weight.bits}-bit g{weight.group_size})"
        )
    return prepare(weight, device.torch_device, options, spec.act_dtype)


#: The hot path itself is the hook (no wrapper frame per call). Marked through the module, not
#: imported by name: pluggy would register a second, unknown hook called ``qmatmul``.
gptq_qmatmul = hookimpl(ops.qmatmul)
