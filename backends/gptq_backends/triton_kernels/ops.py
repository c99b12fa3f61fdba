"""The triton backend's calls: the eager fast path, the custom op, choosing, tuning, fallbacks.

``qmatmul`` is the hot path. Called eagerly, it looks up the layer's worked-out launch for
this M (``launch.Plan``) and relaunches the compiled kernel directly: a few microseconds of
Python. Under ``torch.compile`` tracing (or any dispatch mode, e.g. a fake-tensor trace or an
operator recorder) it calls ``gptq_triton::qmatmul``, a ``torch.library`` custom op with a fake
implementation, so the compiler sees one opaque node. Both run the same kernels with the same
configurations; neither allocates anything that outlives the call (docs/DESIGN.md §11).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import torch

from gptq_core.tracing import plain_eager

from . import configs, dispatch, scratch
from .configs import KernelConfig
from .launch import GATHER_BLOCK, Plan, dequant_launcher
from .layout import TritonPrepared
from .options import TritonOptions
from .target import device_props, kernels, use_asm

#: Calls up to this many rows keep their worked-out launch on the layer (one per distinct M:
#: decode and batched decode); larger calls, where Python's share is small, plan every time.
PLAN_MAX_M = 256

#: What replaced a configuration that failed to compile or launch, per (GPU, shape key).
_replaced: dict[tuple[str, str, KernelConfig], KernelConfig] = {}


def gather_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x [M, K] with its columns in the act-order weight's sorted order: ``x[:, perm[:K]]``,
    by one Triton kernel (faster than ``index_select``, NOTES/perf-triton.md "Variants removed")."""
    M, K = x.shape
    out = torch.empty(M, K, dtype=x.dtype, device=x.device)
    kernels().gather_cols_kernel[(M, math.ceil(K / GATHER_BLOCK))](
        x, perm, out, K, x.stride(0), out.stride(0), BLOCK=GATHER_BLOCK, num_warps=4)
    return out


def dequantize(p: TritonPrepared, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight [K, N] in ``dtype``, input channels in their original order."""
    work = p.scratch or scratch.current(p.device) or scratch.reserve(p.device, 0, 0)
    out = torch.empty(p.in_features, p.out_features, dtype=dtype, device=p.device)
    dequant_launcher(p, dtype, work).launch(out)
    return out


def launch(x: torch.Tensor, p: TritonPrepared, bias: torch.Tensor | None,
           cfg: KernelConfig) -> torch.Tensor:
    """Run one configuration once through Triton's own launch: ``x @ dequant(W) (+ bias)`` for
    x [M, K] with unit column stride (the tuner, tests and benchmarks force configurations so)."""
    return Plan(x, p, bias, cfg).first(x, bias)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


#: The tuner times each candidate on enough weight copies to overflow this multiple of the L2
#: cache (capped), so that weights come from memory as in decode, not from L2.
TUNE_L2_MULTIPLE = 2
TUNE_MAX_COPIES = 16


def _weight_copies(p: TritonPrepared) -> list[TritonPrepared]:
    """``p`` and clones of its weight tensors, together larger than TUNE_L2_MULTIPLE x L2."""
    l2 = getattr(torch.cuda.get_device_properties(p.device), "L2_cache_size", 50 << 20)
    n = max(1, min(TUNE_MAX_COPIES, math.ceil(TUNE_L2_MULTIPLE * l2 / max(p.nbytes(), 1))))

    def clone(t):
        return None if t is None else t.clone()

    return [p] + [dataclasses.replace(p, qweight=clone(p.qweight), qhigh=clone(p.qhigh),
                                      scales=clone(p.scales), zeros=clone(p.zeros),
                                      configs={}, plans={})
                  for _ in range(n - 1)]


def tune(x: torch.Tensor, p: TritonPrepared, bias: torch.Tensor | None) -> tuple[KernelConfig, dict]:
    """Time every candidate configuration on this call's operands; return the fastest.

    Timed like ``gptq bench`` (and like decode in a CUDA graph): one CUDA graph holds one call
    per weight copy (enough copies that the L2 cache cannot hold them, so weights are cold),
    replayed for ~50 ms, median per call. Timing one copy ranked small tiles on L2-hot weights
    instead (4096x4096 M=1 chose 16x128: 12.3 us cold, where 16x64 ran in 10.1).
    """
    from gptq_core.bench.timing import time_calls  # noqa: PLC0415

    M, K = x.shape
    copies = _weight_copies(p)
    timings: dict[str, float] = {}
    best, best_us = None, math.inf
    for cfg in configs.candidates(M, K, p.out_features, p.bits):
        try:
            launch(x, p, bias, cfg)  # compile outside the timing
            calls = [lambda c=cfg, q=q: launch(x, q, bias, c) for q in copies]
            us = time_calls(calls, x.device, target_seconds=0.05, max_reps=50).us
        except Exception:  # noqa: BLE001 - e.g. a tile that needs too much shared memory
            timings[cfg.label()] = float("nan")
            continue
        timings[cfg.label()] = round(us, 2)
        if us < best_us:
            best, best_us = cfg, us
    if best is None:
        best = configs.default_config(M, p.bits)
    return best, timings


def choose(x: torch.Tensor, p: TritonPrepared) -> tuple[KernelConfig, bool]:
    """(configuration, settled) for this call: the layer's own for the M bucket (decided at
    prepare, or at the bucket's first call), else looked up now: the tuned tables (another layer
    of the same shape may have tuned it since), autotuning (outside CUDA-graph capture), or the
    default rule. ``settled`` is False only for the default rule standing in for a tuning that
    capture postponed: nothing may keep it."""
    bucket = configs.m_bucket(x.shape[0])
    cfg = p.configs.get((bucket, x.dtype))
    if cfg is not None:
        return cfg, True
    cfg, source = dispatch.bucket_config(p, bucket, x.dtype)
    settled = True
    if cfg is None:  # autotune
        if _capturing(x):
            cfg, settled = configs.default_config(bucket, p.bits), False
        else:
            cfg, timings = tune(x, p, None)
            configs.table_for(p.gpu, p.options).store(
                dispatch.shape_key(p, x.dtype, bucket), cfg, timings,
                use_asm(p.device, x.dtype, p.bits))
    if settled:
        p.configs[(bucket, x.dtype)] = cfg
    return cfg, settled


def fallbacks(cfg: KernelConfig, m: int, bits: int | None = None) -> list[KernelConfig]:
    """What to try, in order, when ``cfg`` cannot compile or launch: the same tile with fewer
    pipeline stages (less shared memory), the default rule's config, then dequant + matmul."""
    out = [cfg]
    if cfg.path == "fused":
        out += [dataclasses.replace(cfg, num_stages=s) for s in range(cfg.num_stages - 1, 0, -1)]
        out.append(configs.default_config(m, bits))
    out.append(KernelConfig("dequant"))
    return list(dict.fromkeys(out))


def _first_launch(x: torch.Tensor, p: TritonPrepared, bias: torch.Tensor | None,
                  cfg: KernelConfig) -> tuple[Plan, torch.Tensor]:
    """Plan and launch ``cfg``; if it fails to compile or launch (Triton's OutOfResources, a
    compile error of one tile, ...), the first of ``fallbacks`` that works serves the call and
    every later one of the same shape key in this process, with one warning. If none works,
    the first error is raised."""
    key = (p.gpu, dispatch.shape_key(p, x.dtype, x.shape[0]))
    cfg = _replaced.get((*key, cfg), cfg)
    try:
        plan = Plan(x, p, bias, cfg)
        return plan, plan.first(x, bias)
    except torch.OutOfMemoryError:
        raise
    except Exception as first:  # noqa: BLE001
        for alt in fallbacks(cfg, x.shape[0], p.bits)[1:]:
            try:
                plan = Plan(x, p, bias, alt)
                y = plan.first(x, bias)
            except Exception:  # noqa: BLE001, S112
                continue
            _replaced[(*key, cfg)] = alt
            msg = str(first).strip().splitlines()[0][:200] if str(first).strip() else ""
            warnings.warn(
                f"gptq triton backend: configuration {cfg.label()!r} for {key[1]} on {key[0]} "
                f"failed ({type(first).__name__}: {msg}); using {alt.label()!r} for this key "
                f"from now on in this process", RuntimeWarning, stacklevel=3)
            return plan, y
        raise


def run(x: torch.Tensor, p: TritonPrepared, bias: torch.Tensor | None) -> torch.Tensor:
    """A call without a usable worked-out launch: choose, plan and launch through Triton, and
    keep the plan on the layer for the next call of this shape (when the call is a regular
    one: aligned x, at most PLAN_MAX_M rows, a settled configuration)."""
    M = x.shape[0]
    if M == 0:
        return x.new_empty(0, p.out_features)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):  # Triton launches on the current device
            return run(x, p, bias)
    cfg, settled = choose(x, p)
    plan, y = _first_launch(x, p, bias, cfg)
    if settled and M <= PLAN_MAX_M and plan.accepts(x, bias):
        p.plans[(M, x.dtype, bias is not None)] = plan
    return y


def qmatmul(x: torch.Tensor, prepared: TritonPrepared, bias: torch.Tensor | None) -> torch.Tensor:
    """The backend's hot path (the ``gptq_qmatmul`` hook): the layer's worked-out launch for
    this shape when called eagerly, the custom op when traced."""
    if plain_eager():
        plan = prepared.plans.get((x.shape[0], x.dtype, bias is not None))
        if plan is not None and plan.accepts(x, bias):
            return plan(x, bias)
        return run(x, prepared, bias)
    o = prepared.options
    return qmatmul_op(x, prepared.qweight, prepared.qhigh, prepared.scales, prepared.zeros,
                      prepared.perm, bias, prepared.bits, prepared.group_size, prepared.sub,
                      prepared.in_features, prepared.out_features, prepared.k_pad,
                      o.autotune, o.shipped_configs, "" if o.cache_dir is None else str(o.cache_dir))


def forget_choices() -> None:
    """Drop the in-process fallbacks and tuned tables (layers keep their own choices)."""
    _replaced.clear()
    configs._tables.clear()


@torch.library.custom_op("gptq_triton::qmatmul", mutates_args=())
def qmatmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qhigh: torch.Tensor | None,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    sub: int,
    in_features: int,
    out_features: int,
    k_pad: int,
    autotune: bool,
    shipped_configs: bool,
    cache_dir: str,
) -> torch.Tensor:
    """The traced form of :func:`qmatmul`: the layer rebuilt from its tensors and options, the
    device's shared split-K workspace (reserved when its layers were prepared)."""
    gpu, sms = device_props(x.device)
    options = TritonOptions(autotune=autotune, shipped_configs=shipped_configs,
                            cache_dir=Path(cache_dir) if cache_dir else None)
    p = TritonPrepared(
        qweight=qweight, qhigh=qhigh, scales=scales, zeros=zeros, perm=perm, bits=bits,
        group_size=group_size, sub=sub, in_features=in_features, out_features=out_features,
        k_pad=k_pad, n_pad=scales.shape[1], options=options, scratch=scratch.current(x.device),
        gpu=gpu, sms=sms,
    )
    return run(x, p, bias)


@qmatmul_op.register_fake
def _(x, qweight, qhigh, scales, zeros, perm, bias, bits, group_size, sub, in_features,
      out_features, k_pad, autotune, shipped_configs, cache_dir):
    return x.new_empty(x.shape[0], out_features)
