"""The ``gptq_exllama`` custom ops: schemas and fake (meta) implementations, defined in Python.

The CUDA implementations come from the compiled extension (``csrc/exllama_ops.cpp``,
``TORCH_LIBRARY_IMPL``). Defining the schemas here means the fake implementations exist even
where nothing is built, so ``torch.compile`` can trace a model that will run the kernel.
"""

from __future__ import annotations

import torch

LIBRARY = "gptq_exllama"

_lib = torch.library.Library(LIBRARY, "DEF")
# kind: policy.KINDS. acc and counters: the split-K workspace (workspace.py), which every call
# leaves at zero; declared unmutated on purpose (like cuBLAS's workspace), so functionalization
# under torch.compile never copies them. Calls sharing a workspace run in stream order.
_lib.define(
    "gemm(Tensor a, Tensor q, Tensor sz, Tensor? perm, Tensor? bias, Tensor acc, Tensor counters, "
    "int group_size, int size_n, int kind) -> Tensor"
)
_lib.define("dequantize(Tensor q, Tensor sz, int group_size, int size_n) -> Tensor")


def act_dtype_of(sz: torch.Tensor) -> torch.dtype:
    """The activation dtype a prepared weight serves: float16 constants for fp16, float32 for bf16."""
    return torch.float16 if sz.dtype == torch.float16 else torch.bfloat16


@torch.library.register_fake(f"{LIBRARY}::gemm")
def _gemm_fake(a, q, sz, perm, bias, acc, counters, group_size, size_n, kind):
    return a.new_empty(a.shape[0], size_n)


@torch.library.register_fake(f"{LIBRARY}::dequantize")
def _dequantize_fake(q, sz, group_size, size_n):
    return sz.new_empty(q.numel() // size_n * 8, size_n, dtype=act_dtype_of(sz))


# The overloads themselves: a call skips resolving the packet's overload (eager decode pays for
# every microsecond between QuantLinear.forward and the launch, docs/DESIGN.md §11).
gemm = torch.ops.gptq_exllama.gemm.default
dequantize = torch.ops.gptq_exllama.dequantize.default
