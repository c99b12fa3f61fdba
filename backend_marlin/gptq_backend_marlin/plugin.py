"""Hook implementations of the ``marlin`` backend (entry point ``gptq.backends: marlin``)."""

from __future__ import annotations

import torch

from gptq_core import BackendInfo, Capabilities, hookimpl
from gptq_core.tracing import plain_eager

from . import __version__, build
from .layout import TILE_K, WARP_N
from .hopper import ops as hopper_ops
from .ops import gemm
from .options import MarlinOptions
from .policy import DENSE_KIND, HOPPER_KIND
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
    training=True,  # backward dX = dY @ W by the core around this forward (gptq_core/training.py)
    compile=True,  # no allocation outlives a call, no host sync: CUDA graphs capture it
)

#: The ops' scratch arguments (the conformance suite's opcheck checks every other one is left
#: unchanged): the stream-K slots and the Hopper split-K partials, written by a call and
#: meaningless after it, declared unmutated so functionalization never copies the shared
#: workspace per call (ops.py, hopper/ops.py; docs/DESIGN.md §11).
CONFORMANCE_SCRATCH = {"gptq_marlin::gemm": ("slots",), "gptq_marlin_hopper::gemm": ("ws",)}


@hookimpl
def gptq_backend_info() -> BackendInfo:
    return BackendInfo(
        name="marlin",
        version=__version__,
        distribution="gptq-backend-marlin",
        priority={"cuda": 100},
        description=(
            "Marlin-layout int4/int8 x fp16/bf16 mma.sync kernels, striped over all SMs; "
            "dequantize + cuBLAS for large batches"
        ),
        capabilities=CAPABILITIES,
        options=MarlinOptions,
    )


@hookimpl
def gptq_probe(device, spec) -> list[str]:
    """Only what is cheap to know: the toolchain, and a build that already failed. The build
    itself happens when a layer is packed, with that load's options (a failure there sends
    the layer to the next backend)."""
    problems = build.toolchain_problems() or ([build.failure()] if build.failure() else [])
    return [f"extension not built: {'; '.join(problems)}"] if problems else []


@hookimpl
def gptq_pack(weight, device, spec, options: MarlinOptions) -> MarlinPrepared:
    build.load(archs=options.archs, folder=options.build_dir)
    return prepare(weight, device.torch_device, spec.act_dtype, options)


@hookimpl
def gptq_qmatmul(x, prepared, bias):
    p = prepared
    m = x.shape[0]
    for upto, kind in p.kinds:  # one to four (upto_m, kind) pairs, decided at bind
        if m <= upto:
            break
    if kind == DENSE_KIND:
        y = torch.nn.functional.linear(x, p.dense)
        return y if bias is None else y.add_(bias)
    if kind == HOPPER_KIND:
        h = p.hopper
        run = hopper_ops.gemm_direct if plain_eager() else hopper_ops.gemm
        return run(x, h.tiles, h.scales, h.zeros, h.perm, bias, p.slots, h.group_size, p.size_n, h.waves)
    # The extension's direct entry eagerly (no dispatcher: docs/DESIGN.md §11), the custom op
    # when traced or recorded.
    run = build.module().gemm if plain_eager() else gemm
    return run(x, p.tiles, p.scales, p.zeros, p.perm, bias, p.slots, p.counters, p.bits,
                p.group_size, p.size_n, kind)
