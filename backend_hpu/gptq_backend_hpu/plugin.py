"""Hook implementations of the ``hpu`` backend (entry point ``gptq.backends: hpu``)."""

from __future__ import annotations

import torch

from gptq_core import BackendInfo, Capabilities, hookimpl

from . import __version__, device_ops
from .layout import BITS, VALUES_PER_WORD
from .prepare import ACT_DTYPES, HpuPrepared, prepare, qmatmul_with

CAPABILITIES = Capabilities(
    device_kinds=frozenset({"hpu"}),
    bits=(BITS,),  # convert_from_uint4 decodes 4-bit values; Gaudi has no 8-bit sibling op
    group_sizes=None,  # any group size that divides K (below), and -1
    sym=True,
    asym=True,  # real zero points, packed like the weights
    desc_act=True,  # rows sorted by group at load, activation columns permuted per call
    act_dtypes=ACT_DTYPES,
    n_multiple=VALUES_PER_WORD,  # eight 4-bit values per int32 word along N
    k_divisible_by_group=True,  # the op's groups are equal runs of K / G rows
    training=False,  # the core's backward has never run on an HPU
    compile=False,  # never captured on an HPU (README, "never run on hardware")
)


@hookimpl
def gptq_backend_info() -> BackendInfo:
    return BackendInfo(
        name="hpu",
        version=__version__,
        distribution="gptq-backend-hpu",
        priority={"hpu": 100},
        description=(
            "Intel Gaudi: packed int4 kept on the HPU, dequantized per call by "
            "torch.ops.hpu.convert_from_uint4, then one matmul"
        ),
        capabilities=CAPABILITIES,
    )


@hookimpl
def gptq_probe(device, spec) -> list[str]:
    """The Gaudi stack and a device: "habana_frameworks not installed" or "no HPU device"."""
    reason = device_ops.unavailable_reason()
    return [reason] if reason else []


@hookimpl
def gptq_pack(weight, device, spec) -> HpuPrepared:
    return prepare(weight, device.torch_device, spec.act_dtype)


@hookimpl
def gptq_qmatmul(x: torch.Tensor, prepared: HpuPrepared, bias: torch.Tensor | None) -> torch.Tensor:
    return qmatmul_with(device_ops.convert_from_uint4, x, prepared, bias)
