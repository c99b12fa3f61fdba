"""Worked-out launches: everything one call shape of one layer needs, computed at its first call.

A :class:`Plan` holds, for one prepared layer, one M, one activation dtype and bias given or
not, the configuration, the grid, the split and every kernel argument except x, the output
and the bias. Its first call launches through Triton (which compiles the kernel if needed);
later calls relaunch the compiled kernel through its own launcher with only the pointers
replaced, skipping Triton's per-call argument binding, specialization and cache lookup: that
Python work cost tens of microseconds per call against a ~10 us decode kernel (docs/DESIGN.md
§11). Where the compiled kernel's launcher is not available (the interpreter, ROCm, another
Triton version's internals, a profiler's launch hooks) every call takes Triton's own launch.

Nothing here allocates memory that outlives a call: the split-K workspace and the stand-ins
for absent arguments come from the prepared layer (``scratch``), so a plan can be captured in
a CUDA graph; the output (and the act-order copy of x, and the dequantized weight of the
"dequantize once" path) are allocated per call and are the call's result or freed with it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from . import configs, scratch
from .configs import KernelConfig
from .dispatch import split_workspace
from .layout import TritonPrepared, tile_k
from .target import interpreting, kernels, mode_for, use_asm

#: Columns of x one program of ``gather_cols_kernel`` permutes (act-order).
GATHER_BLOCK = 1024
#: Columns of the dequantized weight one program of ``dequant_kernel`` writes.
DEQUANT_BLOCK_N = 128


def _stream_getter() -> Callable[[int], int]:
    """Triton's "current stream of device i" (torch's raw current stream on CUDA): read per
    call, so a launch inside ``torch.cuda.graph`` goes to the capturing stream."""
    from triton.runtime import driver  # noqa: PLC0415

    return driver.active.get_current_stream


@dataclasses.dataclass(frozen=True)
class Direct:
    """A compiled kernel's own launcher and its whole argument list, in the order Triton's
    launch passes it (grid, stream, function, metadata, no launch hooks, then every kernel
    argument in parameter order, pointers as addresses): per call only the stream (at
    ``STREAM``) and the varying pointers (at ``slots``) are filled in."""

    run: Callable[..., Any]
    call: tuple
    slots: tuple[int, ...]
    device_index: int
    stream: Callable[[int], int]
    runtime: Any  # Triton's knobs.runtime: a profiler's launch hooks live there

    STREAM = 3

    @classmethod
    def of(cls, compiled: Any, launcher: Launcher, device: torch.device) -> Direct | None:
        """The direct launch of what ``kernel[grid](...)`` returned, or None if this Triton
        does not expose it (then the launcher keeps Triton's own launch)."""
        if device.type != "cuda" or torch.version.hip is not None or interpreting():
            return None
        try:
            from triton import knobs  # noqa: PLC0415

            run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
            names = list(launcher.kernel.arg_names)
            stream = _stream_getter()
            runtime = knobs.runtime
            runtime.launch_enter_hook.calls, runtime.launch_exit_hook.calls  # noqa: B018
        except (AttributeError, ImportError, RuntimeError):
            return None
        values = {**launcher.args, **dict.fromkeys(launcher.varying)}
        if function is None or sorted(values) != sorted(names):
            return None
        head = (*launcher.grid, None, function, metadata, None, None, None)
        call = head + tuple(v.data_ptr() if isinstance(v, torch.Tensor) else v
                            for v in (values[n] for n in names))
        slots = tuple(len(head) + names.index(n) for n in launcher.varying)
        return cls(run, call, slots, device.index or 0, stream, runtime)


class Launcher:
    """One kernel with every argument fixed but the pointers named in ``varying``."""

    __slots__ = ("kernel", "grid", "args", "options", "varying", "device", "direct")

    def __init__(self, kernel: Any, grid: tuple[int, int, int], args: dict[str, Any],
                 options: dict[str, int], varying: tuple[str, ...], device: torch.device) -> None:
        self.kernel, self.grid, self.args, self.options = kernel, grid, args, options
        self.varying, self.device = varying, device
        self.direct: Direct | None = None

    def launch(self, *tensors: torch.Tensor) -> None:
        """Triton's own launch (it compiles on first use); the direct launch is taken from it."""
        compiled = self.kernel[self.grid](**self.args, **dict(zip(self.varying, tensors)),
                                          **self.options)
        if self.direct is None:
            self.direct = Direct.of(compiled, self, self.device)

    def __call__(self, *tensors: torch.Tensor) -> None:
        d = self.direct
        if d is None or d.runtime.launch_enter_hook.calls or d.runtime.launch_exit_hook.calls:
            self.launch(*tensors)
            return
        call = list(d.call)
        call[Direct.STREAM] = d.stream(d.device_index)
        for slot, t in zip(d.slots, tensors):
            call[slot] = t.data_ptr()
        d.run(*call)


def _current_cuda_device() -> int:
    return torch._C._cuda_getDevice()


class Plan:
    """One call shape (M, dtype, bias given) of one prepared layer with one configuration."""

    __slots__ = ("cfg", "split", "m", "k", "n", "dtype", "out_dtype", "device", "cuda_index",
                 "x_stride", "stand_in", "gather", "qmm", "dequant", "out_shape", "one_kernel")

    def __init__(self, x: torch.Tensor, p: TritonPrepared, bias: torch.Tensor | None,
                 cfg: KernelConfig) -> None:
        M, K = x.shape
        N = p.out_features
        dev = x.device
        work = p.scratch if p.scratch is not None else (
            scratch.current(dev) or scratch.reserve(dev, 0, 0))
        self.cfg, self.m, self.k, self.n, self.dtype, self.device = cfg, M, K, N, x.dtype, dev
        self.cuda_index = (dev.index or 0) if dev.type == "cuda" else None
        self.x_stride = x.stride()
        # The interpreter truncates fp32 -> bf16 instead of rounding: let torch round its output.
        self.out_dtype = torch.float32 if x.dtype == torch.bfloat16 and interpreting() else x.dtype
        self.stand_in = work.float16
        self.out_shape = (M, N)
        self.gather = self.qmm = self.dequant = None
        self.one_kernel = False
        self.split = 1
        mode = mode_for(x.dtype, p.bits)
        k = kernels()
        if cfg.path == "dequant":
            self.dequant = dequant_launcher(p, x.dtype, work)
            return
        x_stride = x.stride(0)
        if p.perm is not None:  # act-order: x's columns into the weight's sorted order first
            self.gather = Launcher(
                k.gather_cols_kernel, (M, math.ceil(K / GATHER_BLOCK), 1),
                dict(perm_ptr=p.perm, K=K, stride_xm=x_stride, stride_om=K, BLOCK=GATHER_BLOCK),
                dict(num_warps=4), ("x_ptr", "out_ptr"), dev)
            x_stride = K
        self.split = split = self._split(cfg, p, work)
        grid = (math.ceil(M / cfg.block_m), math.ceil(N / cfg.block_n), split)
        self.qmm = Launcher(k.qmm_kernel, grid, dict(
            qw_ptr=p.qweight,
            qh_ptr=p.qhigh if p.qhigh is not None else work.tickets,
            sc_ptr=p.scales,
            zr_ptr=p.zeros if p.zeros is not None else work.int16,
            part_ptr=work.partials, lock_ptr=work.tickets,
            M=M, N=N, K=K, N_PAD=p.n_pad, TILES=p.tiles, stride_xm=x_stride, stride_om=N,
            SPLIT_K=split, HAS_BIAS=int(bias is not None),
            BITS=p.bits, S=p.sub, GS=p.group_size, CONST_ZERO=p.zeros is None, MODE=mode,
            EVEN_K=K % tile_k(p.bits, p.sub) == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            IEEE_DOT=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreting()),
            ASM=use_asm(dev, x.dtype, p.bits),
        ), dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
            ("x_ptr", "bias_ptr", "out_ptr"), dev)
        self.one_kernel = self.gather is None and self.out_dtype == self.dtype

    def _split(self, cfg: KernelConfig, p: TritonPrepared, work: scratch.Scratch) -> int:
        """The configuration's split for this M, smaller if the workspace cannot hold it (the
        workspace was sized at prepare for the configurations the policy announced)."""
        split = configs.resolve_split_k(cfg, self.m, self.n, p.tiles, p.sms)
        partials, tickets = split_workspace(cfg, split, self.m, self.n)
        if work.holds(partials, tickets):
            return split
        fits = work.partials.numel() // (partials // split) if tickets <= work.tickets.numel() else 1
        smaller = dataclasses.replace(cfg, split_k=max(1, min(split, fits)))
        return configs.resolve_split_k(smaller, self.m, self.n, p.tiles, p.sms)

    def accepts(self, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether the direct relaunch may serve ``x``: the compiled kernels assumed 16-byte
        aligned pointers and these strides, on this device."""
        return (x.stride() == self.x_stride and x.data_ptr() % 16 == 0
                and (bias is None or bias.data_ptr() % 16 == 0)
                and (self.cuda_index is None or _current_cuda_device() == self.cuda_index))

    def first(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The first call: Triton's own launches (compiling what is missing)."""
        return self._run(x, bias, True)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.one_kernel:  # decode's path, spelt out: every Python step here costs per call
            out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
            self.qmm(x, self.stand_in if bias is None else bias, out)
            return out
        return self._run(x, bias, False)

    def _run(self, x: torch.Tensor, bias: torch.Tensor | None, first: bool) -> torch.Tensor:
        if self.dequant is not None:
            w = torch.empty((self.k, self.n), dtype=self.dtype, device=self.device)
            (self.dequant.launch if first else self.dequant)(w)
            return x @ w if bias is None else torch.addmm(bias.to(self.dtype), x, w)
        if self.gather is not None:
            xs = torch.empty((self.m, self.k), dtype=self.dtype, device=self.device)
            (self.gather.launch if first else self.gather)(x, xs)
            x = xs
        out = torch.empty((self.m, self.n), dtype=self.out_dtype, device=self.device)
        (self.qmm.launch if first else self.qmm)(x, self.stand_in if bias is None else bias, out)
        return out if self.out_dtype is self.dtype else out.to(self.dtype)


def dequant_launcher(p: TritonPrepared, dtype: torch.dtype, work: scratch.Scratch) -> Launcher:
    """The launch that writes the dequantized weight [K, N] in ``dtype``, original row order."""
    K, N = p.in_features, p.out_features
    return Launcher(kernels().dequant_kernel, (p.tiles, math.ceil(N / DEQUANT_BLOCK_N), 1), dict(
        qw_ptr=p.qweight,
        qh_ptr=p.qhigh if p.qhigh is not None else work.tickets,
        sc_ptr=p.scales,
        zr_ptr=p.zeros if p.zeros is not None else work.int16,
        perm_ptr=p.perm if p.perm is not None else work.tickets,
        K=K, N=N, N_PAD=p.n_pad, stride_ok=N,
        BITS=p.bits, S=p.sub, GS=p.group_size, CONST_ZERO=p.zeros is None,
        ACT_ORDER=p.perm is not None, MODE=mode_for(dtype, p.bits), BLOCK_N=DEQUANT_BLOCK_N,
    ), dict(num_warps=4), ("out_ptr",), p.device)
