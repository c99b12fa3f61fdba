"""Hook implementations of the ``marlin`` backend (entry point ``gptq.backends: marlin``)."""

from __future__ import annotations

import torch

from gptq_core import BackendInfo, Capabilities, hookimpl

from . import __version__, build
from .layout import TILE_K, WARP_N
from .ops import gemm
from .prepare import ACT_DTYPES, MarlinPrepared, prepare

CAPABILITIES = Capabilities(
    device_kinds=frozenset({"cuda"}),
    bits=(4, 8),
    group_sizes=(-1, 32, 64, 128, 256),
    sym=True,
    asym=True,  # runtime zero points
    desc_act=True,  # g_idx sorted at load, activation columns permuted at run time
    act_dtypes=ACT_DTYPES,
    min_compute_capability=(8, 0),
    k_multiple=TILE_K,
    n_multiple=WARP_N,
    training=False,
    compile=True,
)


@hookimpl
def gptq_backend_info() -> BackendInfo:
    return BackendInfo(
        name="marlin",
        version=__version__,
        distribution="gptq-backend-marlin",
        priority={"cuda": 100},
        description=(
            "Marlin-layout int4 x fp16/bf16 mma.sync kernel, striped over all SMs; "
            "dequantize + cuBLAS for large batches"
        ),
        capabilities=CAPABILITIES,
    )


@hookimpl
def gptq_probe(device, spec) -> list[str]:
    problem = build.status()
    return [f"extension not built: {problem}"] if problem else []


@hookimpl
def gptq_pack(weight, device, spec) -> MarlinPrepared:
    build.load()
    return prepare(weight, device.torch_device, spec.act_dtype)


@hookimpl
def gptq_qmatmul(x, prepared, bias):
    p = prepared
    if p.dense is not None and x.shape[0] > p.dense_threshold:
        return torch.nn.functional.linear(x, p.dense, None if bias is None else bias.to(x.dtype))
    return gemm(x, p.tiles, p.scales, p.zeros, p.perm, bias, p.bits, p.group_size, p.size_n,
                p.dequant_threshold)
