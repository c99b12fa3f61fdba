"""The triton backend's dispatch policy: which path serves which M, decided when a layer is
prepared (docs/DESIGN.md §12).

For every M bucket (``configs.BUCKETS``) the layer gets its configuration from the tuned
tables for this GPU and shape, else from the default rules; with the option ``autotune`` a
bucket no table holds is tuned at its first call instead (the policy says so). The choices
become the layer's :class:`~gptq_core.policy.DispatchPolicy` (what ``gptq backends explain``
shows) and the split-K workspace it needs is reserved now, so calls allocate nothing that
outlives them.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from gptq_core.format import PackedWeight
from gptq_core.policy import DispatchPolicy

from . import configs, layout, scratch
from .configs import KernelConfig
from .layout import TritonPrepared
from .options import TritonOptions
from .target import device_props, use_asm

#: Where a bucket's configuration came from, as the policy shows it.
TUNED, DEFAULT, AUTOTUNE = "tuned", "default rule", "default rule; autotuned at first call"


def blas_name(device: torch.device) -> str:
    """Who multiplies after "dequantize once": cuBLAS, hipBLAS, or torch on the CPU."""
    if device.type != "cuda":
        return "matmul"
    return "hipblas" if torch.version.hip is not None else "cublas"


def shape_key(p: TritonPrepared, dtype: torch.dtype, m: int) -> str:
    return configs.shape_key(p.bits, p.group_size, dtype, p.in_features, p.out_features, m)


def bucket_config(p: TritonPrepared, bucket: int, dtype: torch.dtype
                  ) -> tuple[KernelConfig | None, str]:
    """(configuration, where it came from) for one M bucket, as far as it is known before the
    first call; the configuration is None when the bucket will be autotuned at its first call
    (only on a GPU: the interpreter has nothing to time, and no tables unless a user made one
    for the GPU name "interpreter")."""
    table = configs.table_for(p.gpu, p.options)
    cfg = table.lookup(shape_key(p, dtype, bucket), use_asm(p.device, dtype, p.bits))
    if cfg is not None:
        return cfg, TUNED
    if p.options.autotune and p.device.type == "cuda":
        return None, AUTOTUNE
    return configs.default_config(bucket, p.bits), DEFAULT


def split_workspace(cfg: KernelConfig, split: int, m: int, n: int) -> tuple[int, int]:
    """(fp32 partials, tickets) a fused launch with ``split`` K ranges needs (0, 0 without)."""
    if cfg.path != "fused" or split <= 1:
        return 0, 0
    grid_m, grid_n = math.ceil(m / cfg.block_m), math.ceil(n / cfg.block_n)
    return split * grid_m * cfg.block_m * grid_n * cfg.block_n, grid_m * grid_n


def workspace_need(p: TritonPrepared, choices: dict[int, list[KernelConfig]]) -> tuple[int, int]:
    """The largest split-K workspace any M of any bucket needs with the given configurations.

    A launch's split depends on M only through the number of row blocks, so one M per row
    block count is enough; above ``MAX_EXACT_BUCKET`` only the bucket's largest M is counted
    (a larger need there is met by a smaller split at launch, ``ops.Plan``)."""
    n, most = p.out_features, (0, 0)
    for bucket, cfgs in choices.items():
        low = bucket // 2 + 1
        for cfg in cfgs:
            if cfg.path != "fused":
                continue
            rows = range(math.ceil(low / cfg.block_m), math.ceil(bucket / cfg.block_m) + 1)
            if bucket > MAX_EXACT_BUCKET:
                rows = range(math.ceil(bucket / cfg.block_m), math.ceil(bucket / cfg.block_m) + 1)
            for row_blocks in rows:
                m = min(bucket, row_blocks * cfg.block_m)
                split = configs.resolve_split_k(cfg, m, n, p.tiles, p.sms)
                need = split_workspace(cfg, split, m, n)
                most = (max(most[0], need[0]), max(most[1], need[1]))
    return most


#: Buckets up to this one are sized for every M in them (split-K lives at small M).
MAX_EXACT_BUCKET = 256


def prepare(weight: PackedWeight, device: torch.device, options: TritonOptions | None = None,
            act_dtype: torch.dtype = torch.float16) -> TritonPrepared:
    """The layer re-laid out for the kernels, with its options, its dispatch policy for
    ``act_dtype``, the configurations known now and its split-K workspace."""
    options = options if options is not None else TritonOptions.parse(None, "triton")
    p = layout.prepare(weight, device)
    gpu, sms = device_props(p.device)
    p = dataclasses.replace(p, options=options, gpu=gpu, sms=sms)
    known: dict[tuple[int, torch.dtype], KernelConfig] = {}
    sized: dict[int, list[KernelConfig]] = {}
    steps: list[tuple[int | None, str]] = []
    blas = blas_name(p.device)
    for bucket in configs.BUCKETS:
        cfg, source = bucket_config(p, bucket, act_dtype)
        shown = cfg if cfg is not None else configs.default_config(bucket, p.bits)
        if cfg is not None:
            known[(bucket, act_dtype)] = cfg
            sized[bucket] = [cfg]
        else:  # any candidate may win the tuning
            sized[bucket] = configs.candidates(bucket, p.in_features, p.out_features, p.bits)
        upto = None if bucket == configs.MAX_BUCKET else bucket
        steps.append((upto, f"{shown.path_name(blas)} ({source})"))
    partials, tickets = workspace_need(p, sized)
    return dataclasses.replace(
        p, policy=DispatchPolicy.from_thresholds(*steps),
        scratch=scratch.reserve(p.device, partials, tickets), configs=known, plans={},
    )
