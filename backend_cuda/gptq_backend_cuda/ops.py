"""The ``gptq_cuda`` custom ops: schemas and fake (meta) implementations, defined in Python.

The CUDA implementations come from the compiled extension (``csrc/cuda_ops.cpp``,
``TORCH_LIBRARY_IMPL``). Defining the schemas here means the fake implementations exist even
where nothing is built, so ``torch.compile`` can trace a model that will run the kernel.
"""

from __future__ import annotations

import torch

LIBRARY = "gptq_cuda"

_lib = torch.library.Library(LIBRARY, "DEF")
# kind: the kernel (policy.KINDS, csrc/cuda_kernels.h KernelKind) or dequantize + cuBLAS;
# units_per_split: how the policy cut K. partials and counters: the split-K workspace
# (workspace.py). The op leaves the counters at zero and uses the partials as scratch whose
# contents mean nothing between calls (like cuBLAS's workspace); they are declared unmutated
# on purpose, so that functionalization under torch.compile never copies them. Calls sharing
# a workspace run in stream order.
_lib.define(
    "gemm(Tensor x, Tensor qweight, Tensor? qhigh, Tensor scales, Tensor? zeros, Tensor? perm, "
    "Tensor? bias, Tensor partials, Tensor counters, int bits, int group_size, int size_n, "
    "int kind, int units_per_split) -> Tensor"
)
_lib.define(
    "dequantize(Tensor qweight, Tensor? qhigh, Tensor scales, Tensor? zeros, Tensor? perm, "
    "int bits, int group_size, int size_k, int size_n, ScalarType dtype) -> Tensor"
)


@torch.library.register_fake(f"{LIBRARY}::gemm")
def _gemm_fake(x, qweight, qhigh, scales, zeros, perm, bias, partials, counters, bits, group_size,
               size_n, kind, units_per_split):
    return x.new_empty(x.shape[0], size_n)


@torch.library.register_fake(f"{LIBRARY}::dequantize")
def _dequantize_fake(qweight, qhigh, scales, zeros, perm, bits, group_size, size_k, size_n, dtype):
    return scales.new_empty(size_n, size_k, dtype=dtype)


# The overloads themselves: a call skips resolving the packet's overload (eager decode pays
# for every microsecond between QuantLinear.forward and the launch, docs/DESIGN.md §11).
gemm = torch.ops.gptq_cuda.gemm.default
dequantize = torch.ops.gptq_cuda.dequantize.default
