"""The ``gptq_marlin`` custom ops: schemas and fake (meta) implementations, defined in Python.

The CUDA implementations come from the compiled extension (``csrc/marlin_ops.cpp``,
``TORCH_LIBRARY_IMPL``). Defining the schemas here means the fake implementations exist even
where nothing is built, so ``torch.compile`` can trace a model that will run the kernel.
"""

from __future__ import annotations

import torch

LIBRARY = "gptq_marlin"

_lib = torch.library.Library(LIBRARY, "DEF")
# kind: the kernel (policy.KINDS, csrc/kernels.h KernelKind) or dequantize + cuBLAS. slots and
# counters: the stream-K workspace (workspace.py). The op leaves the counters at zero and uses the
# slots as scratch whose contents mean nothing between calls (like cuBLAS's workspace); they
# are declared unmutated on purpose, so that functionalization under torch.compile never
# copies them. Calls sharing a workspace run in stream order.
_lib.define(
    "gemm(Tensor a, Tensor b, Tensor scales, Tensor? zeros, Tensor? perm, Tensor? bias, "
    "Tensor slots, Tensor counters, int bits, int group_size, int size_n, int kind) -> Tensor"
)
_lib.define(
    "dequantize(Tensor b, Tensor scales, Tensor? zeros, int bits, int group_size, "
    "int size_k, int size_n) -> Tensor"
)
_lib.define("gather_cols(Tensor x, Tensor perm) -> Tensor")


@torch.library.register_fake(f"{LIBRARY}::gemm")
def _gemm_fake(a, b, scales, zeros, perm, bias, slots, counters, bits, group_size, size_n, kind):
    return a.new_empty(a.shape[0], size_n)


@torch.library.register_fake(f"{LIBRARY}::dequantize")
def _dequantize_fake(b, scales, zeros, bits, group_size, size_k, size_n):
    return scales.new_empty(size_n, size_k)


def check_gather_args(x: torch.Tensor, perm: torch.Tensor) -> None:
    """Raise ValueError naming what is wrong with ``gather_cols``'s arguments.

    Checked in Python as well as in the op: this is the op's public entry point, and a clear
    ValueError here names the argument before anything reaches CUDA.
    """
    if x.dim() != 2:
        raise ValueError(f"gather_cols: x must be 2-D [M, K], got {x.dim()}-D {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"gather_cols: x must be float16 or bfloat16, got {x.dtype}")
    if perm.dim() != 1 or perm.shape[0] != x.shape[1]:
        raise ValueError(f"gather_cols: perm must be a 1-D tensor of K={x.shape[1]} indices, "
                         f"got shape {tuple(perm.shape)}")
    if perm.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"gather_cols: perm must be int32 or int64, got {perm.dtype}")
    if perm.device != x.device:
        raise ValueError(f"gather_cols: perm is on {perm.device} but x on {x.device}; "
                         "move both to the same CUDA device")


@torch.library.register_fake(f"{LIBRARY}::gather_cols")
def _gather_cols_fake(x, perm):
    check_gather_args(x, perm)
    return x.new_empty(x.shape[0], x.shape[1])


# The overloads themselves: a call skips resolving the packet's overload (eager decode pays
# for every microsecond between QuantLinear.forward and the launch, docs/DESIGN.md §11).
gemm = torch.ops.gptq_marlin.gemm.default
dequantize = torch.ops.gptq_marlin.dequantize.default


def gather_cols(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """out[:, c] = x[:, perm[c]] (x [M, K] fp16/bf16 on CUDA, perm [K] int32/int64): the act-order
    activation permutation, one launch; ``gemm`` runs it inside.

    Arguments are checked here first (:func:`check_gather_args`); CPU tensors get the
    dispatcher's "could not run ... with arguments from the 'CPU' backend".
    """
    check_gather_args(x, perm)
    return torch.ops.gptq_marlin.gather_cols(x, perm)
