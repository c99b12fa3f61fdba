"""Hook implementations of the ``torch`` backend (entry point ``gptq.backends: torch``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_core import Capabilities, BackendInfo, hookimpl
from gptq_core.device import DEVICE_KINDS
from gptq_core.packing import SUPPORTED_BITS
from gptq_core.policy import DispatchPolicy

from .. import __version__
from .kernels import qmatmul_op


#: One path at every M: dequantize K in chunks, multiply and accumulate in float32
#: (docs/DESIGN.md §12; the reference needs no tuning).
POLICY = DispatchPolicy.single("torch:dequant+matmul")


@dataclass(frozen=True, eq=False)
class TorchPrepared:
    """The packed qweight as is, plus zeros unpacked once ([G, N] int32)."""

    qweight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    policy: DispatchPolicy = POLICY


@hookimpl
def gptq_backend_info() -> BackendInfo:
    return BackendInfo(
        name="torch",
        version=__version__,
        distribution="gptq-backends",
        priority={"*": 0},
        description="plain PyTorch dequantize-and-matmul in chunks; the numerical reference",
        capabilities=Capabilities(
            device_kinds=frozenset(DEVICE_KINDS),
            bits=SUPPORTED_BITS,
            group_sizes=None,
            training=True,
            # torch.compile(fullgraph=True) and CUDA-graph capture: one custom op (with a fake
            # and an autograd implementation) that allocates only its output and temporaries,
            # never synchronizes and never branches on values (backends/tests/test_torch_backend.py)
            compile=True,
        ),
    )


@hookimpl
def gptq_pack(weight, device, spec) -> TorchPrepared:
    w = weight.to(device.torch_device)
    return TorchPrepared(
        qweight=w.qweight,
        zeros=w.zeros().contiguous(),
        scales=w.scales,
        g_idx=w.g_idx,
        bits=w.bits,
    )


@hookimpl
def gptq_qmatmul(x, prepared, bias):
    p = prepared
    return qmatmul_op(x, p.qweight, p.zeros, p.scales, p.g_idx, bias, p.bits)
