"""The ``gptq_cpu`` custom op: its schema and fake implementation, defined in Python.

The CPU implementation comes from the compiled extension (``csrc/cpu_qgemm.cpp``,
``TORCH_LIBRARY_IMPL``). Defining the schema here means the fake exists even where nothing is
built, so ``torch.compile`` can trace a model that will run the kernel.
"""

from __future__ import annotations

import torch

LIBRARY = "gptq_cpu"

#: ``kind`` values of the op: the paths of the backend's dispatch policy (csrc KIND_*).
KIND_GEMV = 0
KIND_GEMM = 1

_lib = torch.library.Library(LIBRARY, "DEF")
# qdata/scales/zeros/segs: the prepared layout (layout.py); perm: the act-order column order
# of x; vals_per_byte: quantized values per byte of qdata (8-bit 1, 4- and 3-bit 2, 2-bit 4).
_lib.define(
    "qmatmul(Tensor x, Tensor qdata, Tensor scales, Tensor? zeros, Tensor segs, Tensor? perm, "
    "Tensor? bias, int vals_per_byte, float sym_zero, int out_features, int kind) -> Tensor"
)


@torch.library.register_fake(f"{LIBRARY}::qmatmul")
def _qmatmul_fake(x, qdata, scales, zeros, segs, perm, bias, vals_per_byte, sym_zero,
                  out_features, kind):
    return x.new_empty(x.shape[0], out_features)


#: The overload itself: a call skips resolving the packet's overload (eager decode pays for
#: every microsecond between QuantLinear.forward and the kernel, docs/DESIGN.md §11).
qmatmul = torch.ops.gptq_cpu.qmatmul.default
