"""Launching the triton kernels: path choice, split-K workspace, tuning, and the custom op.

``gptq_triton::qmatmul`` is a ``torch.library`` custom op with a fake implementation, so
``torch.compile`` captures it as one opaque node. The kernels module is imported on first use,
so ``TRITON_INTERPRET`` set by a test before the first call is honoured.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import warnings

import torch

from . import configs
from .configs import KernelConfig
from .layout import TritonPrepared, tile_k

_lock = threading.Lock()
_dummies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_workspaces: dict[torch.device, dict[str, torch.Tensor]] = {}
_device_props: dict[torch.device, tuple[str, int]] = {}
_chosen: dict[tuple[str, str, bool], KernelConfig] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_compat() -> None:
    """Let Triton 3.6's interpreter run loops with run-time bounds under numpy >= 2.4.

    The interpreter holds scalars as 1-element arrays and turns a loop bound into
    ``int(array)``, which numpy 2.4 refuses; this patch (active only while a kernel is
    interpreted, and only under TRITON_INTERPRET=1) reads the element instead.
    """
    from triton.runtime import interpreter  # noqa: PLC0415

    original = interpreter._patch_lang_tensor
    if getattr(original, "_gptq_compat", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._gptq_compat = True
    interpreter._patch_lang_tensor = patched


def _kernels():
    """The kernels module, imported on first use: Triton reads TRITON_INTERPRET when a kernel
    is decorated. (Triton's own library functions, e.g. ``tl.cdiv`` and ``tl.zeros``, were
    decorated when triton was imported, so the kernels avoid them: a test may set the flag
    after that import.)"""
    from . import kernels  # noqa: PLC0415

    if _interpreting():
        _interpreter_compat()
    return kernels


def mode_for(dtype: torch.dtype, bits: int) -> int:
    """Dequantization float of :mod:`.kernels` (0 fp16, 1 bf16, 2 fp32) for an activation dtype."""
    if dtype == torch.float16:
        return 0
    if dtype == torch.bfloat16 and bits <= 4 and not _interpreting():
        # Triton 3.6's interpreter computes garbage from a bf16 made by bitcast, so it checks
        # bf16 through the fp32 path; the bf16 path itself is checked on the GPU.
        return 1
    return 2


def device_props(device: torch.device) -> tuple[str, int]:
    """(GPU name, multiprocessor count); ("interpreter", 4) for CPU tensors."""
    props = _device_props.get(device)
    if props is None:
        if device.type == "cuda":
            p = torch.cuda.get_device_properties(device)
            props = (p.name, p.multi_processor_count)
        else:
            props = ("interpreter", 4)
        _device_props[device] = props
    return props


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A tiny tensor standing in for an absent argument (never read: its flag is off)."""
    key = (device, dtype)
    t = _dummies.get(key)
    if t is None:
        t = _dummies[key] = torch.zeros(16, dtype=dtype, device=device)
    return t


def _workspace(device: torch.device, partial_elems: int, locks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K partials (fp32) and per-tile tickets (int32, always left at zero by the kernel).

    One per device, grown on demand: calls on one stream are ordered, so they can share it
    (generate(), CUDA graphs and torch.compile all use one stream per device). Split-K calls
    running concurrently on two streams of one device would race on it.
    """
    with _lock:
        ws = _workspaces.setdefault(device, {})
        part = ws.get("part")
        if part is None or part.numel() < partial_elems:
            part = ws["part"] = torch.empty(max(partial_elems, 1 << 16), dtype=torch.float32,
                                            device=device)
        lock = ws.get("lock")
        if lock is None or lock.numel() < locks:
            lock = ws["lock"] = torch.zeros(max(locks, 1024), dtype=torch.int32, device=device)
    return part, lock


def dequantize(p: TritonPrepared, dtype: torch.dtype, block_n: int = 128) -> torch.Tensor:
    """The dequantized weight [K, N] in ``dtype``, input channels in their original order."""
    K, N = p.in_features, p.out_features
    out = torch.empty(K, N, dtype=dtype, device=p.device)
    grid = (p.tiles, math.ceil(N / block_n))
    dev = p.device
    _kernels().dequant_kernel[grid](
        p.qweight,
        p.qhigh if p.qhigh is not None else _dummy(dev, torch.int32),
        p.scales,
        p.zeros if p.zeros is not None else _dummy(dev, torch.int16),
        p.perm if p.perm is not None else _dummy(dev, torch.int32),
        out, K, N, p.n_pad, out.stride(0),
        BITS=p.bits, S=p.sub, GS=p.group_size,
        CONST_ZERO=p.zeros is None, ACT_ORDER=p.perm is not None,
        MODE=mode_for(dtype, p.bits), BLOCK_N=block_n, num_warps=4,
    )
    return out


#: Columns of x one program of ``gather_cols_kernel`` permutes (act-order).
GATHER_BLOCK = 1024


def gather_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x [M, K] with its columns in the act-order weight's sorted order: ``x[:, perm[:K]]``,
    by one Triton kernel (faster than ``index_select``, NOTES/perf-triton.md "Variants removed")."""
    M, K = x.shape
    out = torch.empty(M, K, dtype=x.dtype, device=x.device)
    _kernels().gather_cols_kernel[(M, math.ceil(K / GATHER_BLOCK))](
        x, perm, out, K, x.stride(0), out.stride(0), BLOCK=GATHER_BLOCK, num_warps=4)
    return out


def use_asm(x: torch.Tensor, mode: int, bits: int | None = None) -> bool:
    """Whether the fused kernel dequantizes through the single-LOP3 inline PTX: fp16 (mode 0)
    on CUDA, 2/4/8-bit (3-bit has its own sequence); never under the interpreter or on ROCm."""
    return mode == 0 and bits != 3 and x.is_cuda and torch.version.hip is None and not _interpreting()


def launch(x: torch.Tensor, p: TritonPrepared, bias: torch.Tensor | None,
           cfg: KernelConfig) -> torch.Tensor:
    """Run one configuration: ``x @ dequant(W) (+ bias)`` for x [M, K] with unit column stride."""
    M, K = x.shape
    N = p.out_features
    if cfg.path == "dequant":
        w = dequantize(p, x.dtype)
        if bias is None:
            return x @ w
        return torch.addmm(bias.to(x.dtype), x, w)
    dev = x.device
    _, sms = device_props(dev)
    split = configs.resolve_split_k(cfg, M, N, p.tiles, sms)
    mode = mode_for(x.dtype, p.bits)
    if p.perm is not None:
        x = gather_columns(x, p.perm)  # act-order: x's columns into the weight's sorted order
    # The interpreter truncates fp32 -> bf16 instead of rounding: let torch round its output.
    out_dtype = torch.float32 if x.dtype == torch.bfloat16 and _interpreting() else x.dtype
    out = torch.empty(M, N, dtype=out_dtype, device=dev)
    grid_m, grid_n = math.ceil(M / cfg.block_m), math.ceil(N / cfg.block_n)
    if split > 1:
        part, lock = _workspace(dev, split * grid_m * cfg.block_m * grid_n * cfg.block_n,
                                grid_m * grid_n)
    else:
        part, lock = _dummy(dev, torch.float32), _dummy(dev, torch.int32)
    _kernels().qmm_kernel[(grid_m, grid_n, split)](
        x, p.qweight,
        p.qhigh if p.qhigh is not None else _dummy(dev, torch.int32),
        p.scales,
        p.zeros if p.zeros is not None else _dummy(dev, torch.int16),
        bias if bias is not None else _dummy(dev, torch.float16),
        out, part, lock,
        M, N, K, p.n_pad, p.tiles, x.stride(0), out.stride(0), split, int(bias is not None),
        BITS=p.bits, S=p.sub, GS=p.group_size,
        CONST_ZERO=p.zeros is None, MODE=mode,
        EVEN_K=K % tile_k(p.bits, p.sub) == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        IEEE_DOT=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _interpreting()),
        ASM=use_asm(x, mode, p.bits),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.to(x.dtype)  # no kernel when the dtypes match (it returns ``out`` itself)


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
                                      scales=clone(p.scales), zeros=clone(p.zeros))
                  for _ in range(n - 1)]


def tune(x: torch.Tensor, p: TritonPrepared, bias: torch.Tensor | None) -> tuple[KernelConfig, dict]:
    """Time every candidate configuration on this call's operands; return the fastest.

    Timed like ``gptq bench`` (and like decode in a CUDA graph): one CUDA graph holds one call
    per weight copy (enough copies that the L2 cache cannot hold them, so weights are cold),
    replayed for ~50 ms, median per call. Before this, ``do_bench`` on one copy ranked small
    tiles on L2-hot weights (4096x4096 M=1 chose 16x128: 12.3 us cold; 16x64 ran M=2 in 10.1).
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


def _cache_key(x: torch.Tensor, p: TritonPrepared) -> tuple[str, str]:
    """(GPU name, tuned-file key): the in-process choice key."""
    gpu, _ = device_props(x.device)
    return (gpu, configs.shape_key(p.bits, p.group_size, x.dtype, p.in_features,
                                   p.out_features, x.shape[0]))


def choose(x: torch.Tensor, p: TritonPrepared) -> KernelConfig:
    """The configuration for this call (see :mod:`.configs` for the order of sources)."""
    M = x.shape[0]
    ck = _cache_key(x, p)
    cfg = _chosen.get(ck)
    if cfg is not None:
        return cfg
    if not x.is_cuda:
        return configs.default_config(M, p.bits)
    gpu, key = ck
    asm = use_asm(x, mode_for(x.dtype, p.bits), p.bits)
    table = configs.table_for(gpu)
    cfg = table.lookup(key, asm)
    if cfg is None:
        if configs.autotune_enabled() and not _capturing(x):
            cfg, timings = tune(x, p, None)
            table.store(key, cfg, timings, asm)
        else:
            return configs.default_config(M, p.bits)
    _chosen[ck] = cfg
    return cfg


def fallbacks(cfg: KernelConfig, m: int, bits: int | None = None) -> list[KernelConfig]:
    """What to try, in order, when ``cfg`` cannot compile or launch: the same tile with fewer
    pipeline stages (less shared memory), the default rule's config, then dequant + matmul."""
    out = [cfg]
    if cfg.path == "fused":
        out += [dataclasses.replace(cfg, num_stages=s) for s in range(cfg.num_stages - 1, 0, -1)]
        out.append(configs.default_config(m, bits))
    out.append(KernelConfig("dequant"))
    return list(dict.fromkeys(out))


def run(x: torch.Tensor, p: TritonPrepared, bias: torch.Tensor | None) -> torch.Tensor:
    """``launch`` with the chosen configuration; if that one fails to compile or launch (Triton's
    OutOfResources, a compile error of one tile, ...), the first of ``fallbacks`` that works
    serves the call and every later one of the same key in this process, with one warning.
    If none works, the first error is raised."""
    cfg = choose(x, p)
    try:
        return launch(x, p, bias, cfg)
    except torch.OutOfMemoryError:
        raise
    except Exception as first:  # noqa: BLE001
        for alt in fallbacks(cfg, x.shape[0], p.bits)[1:]:
            try:
                y = launch(x, p, bias, alt)
            except Exception:  # noqa: BLE001, S112
                continue
            ck = _cache_key(x, p)
            gpu, key = ck[0], ck[1]
            _chosen[ck] = alt
            msg = str(first).strip().splitlines()[0][:200] if str(first).strip() else ""
            warnings.warn(
                f"gptq triton backend: configuration {cfg.label()!r} for {key} on {gpu} failed "
                f"({type(first).__name__}: {msg}); using {alt.label()!r} for this key from now "
                f"on in this process", RuntimeWarning, stacklevel=2)
            return y
        raise


def forget_choices() -> None:
    """Drop the in-process choices (after changing GPTQ_TRITON_* settings)."""
    _chosen.clear()
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
) -> torch.Tensor:
    p = TritonPrepared(
        qweight=qweight, qhigh=qhigh, scales=scales, zeros=zeros, perm=perm, bits=bits,
        group_size=group_size, sub=sub, in_features=in_features, out_features=out_features,
        k_pad=k_pad, n_pad=scales.shape[1],
    )
    if x.shape[0] == 0:
        return x.new_empty(0, out_features)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return run(x, p, bias)


@qmatmul_op.register_fake
def _(x, qweight, qhigh, scales, zeros, perm, bias, bits, group_size, sub, in_features,
      out_features, k_pad):
    return x.new_empty(x.shape[0], out_features)


def qmatmul(x: torch.Tensor, p: TritonPrepared, bias: torch.Tensor | None) -> torch.Tensor:
    """The backend's hot path: one custom-op call on the prepared tensors."""
    return qmatmul_op(x, p.qweight, p.qhigh, p.scales, p.zeros, p.perm, bias, p.bits,
                      p.group_size, p.sub, p.in_features, p.out_features, p.k_pad)
