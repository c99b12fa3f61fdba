"""The ``gptq_marlin`` custom ops: schemas and fake (meta) implementations, defined in Python.

The CUDA implementations come from the compiled extension (``csrc/marlin_ops.cpp``,
``TORCH_LIBRARY_IMPL``). Defining the schemas here means the fake implementations exist even
where nothing is built, so ``torch.compile`` can trace a model that will run the kernel.
"""

from __future__ import annotations

import torch

LIBRARY = "gptq_marlin"

_lib = torch.library.Library(LIBRARY, "DEF")
_lib.define(
    "gemm(Tensor a, Tensor b, Tensor scales, Tensor? zeros, Tensor? perm, Tensor? bias, "
    "int bits, int group_size, int size_n, int dequant_threshold, int blocks_per_sm) -> Tensor"
)
_lib.define(
    "dequantize(Tensor b, Tensor scales, Tensor? zeros, int bits, int group_size, "
    "int size_k, int size_n) -> Tensor"
)


@torch.library.register_fake(f"{LIBRARY}::gemm")
def _gemm_fake(a, b, scales, zeros, perm, bias, bits, group_size, size_n, dequant_threshold,
               blocks_per_sm):
    return a.new_empty(a.shape[0], size_n)


@torch.library.register_fake(f"{LIBRARY}::dequantize")
def _dequantize_fake(b, scales, zeros, bits, group_size, size_k, size_n):
    return scales.new_empty(size_n, size_k)


gemm = torch.ops.gptq_marlin.gemm
dequantize = torch.ops.gptq_marlin.dequantize
