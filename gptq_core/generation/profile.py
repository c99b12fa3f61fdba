"""Where one decode step's device time goes: linears, attention, everything else.

The step is run eagerly under ``torch.profiler`` with every linear layer (``nn.Linear`` and
``QuantLinear``) and every attention module call wrapped in a named range by global module
hooks; kernel time is summed per range. Attention is reported without its own projections, so the three parts add up
to the step's kernel time (docs/DESIGN.md §9: a slow step is explained, not guessed at).

The step users run is compiled and replayed from a CUDA graph, where no module range exists and
inductor has fused the small kernels; :func:`replayed_breakdown` profiles those replays and sorts
their kernels by the names the eager step launched inside each range (the quantized and cuBLAS
linears and the attention kernel are the same kernels in both), everything else being the
fused remainder; the replay's wall time minus its kernels' is the launch gaps.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from ..quant_linear import QuantLinear

LINEAR_IN_ATTENTION = "gptq.linear.attention"
LINEAR_ELSEWHERE = "gptq.linear.other"
ATTENTION = "gptq.attention"
#: Class-name endings of the modules that hold a layer's attention (LlamaAttention, ...).
_ATTENTION_CLASSES = ("Attention", "Attn")


def _label(module: nn.Module, open_labels: list[str | None]) -> str | None:
    """The range a module call is counted in. Linears inside an open linear are not labelled
    again (their kernels are counted once); a linear called inside attention is attention's
    projection. Global hooks see modules whether or not they are registered in the model (a
    fused projection shared by q/k/v slices, say)."""
    if isinstance(module, (nn.Linear, QuantLinear)):
        if LINEAR_IN_ATTENTION in open_labels or LINEAR_ELSEWHERE in open_labels:
            return None
        return LINEAR_IN_ATTENTION if ATTENTION in open_labels else LINEAR_ELSEWHERE
    if type(module).__name__.endswith(_ATTENTION_CLASSES) and ATTENTION not in open_labels:
        return ATTENTION
    return None


@contextmanager
def labelled():
    """While active, every linear and attention module call runs inside a profiler range."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    stack: list[tuple[str | None, object]] = []

    def enter(module, args):
        label = _label(module, [name for name, _ in stack])
        rf = torch.profiler.record_function(label) if label else None
        if rf is not None:
            rf.__enter__()
        stack.append((label, rf))

    def leave(module, args, output):
        _, rf = stack.pop()
        if rf is not None:
            rf.__exit__(None, None, None)

    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _kernels_below(event, into: set[str]) -> None:
    """Names of the kernels ``event`` (a CPU range of the profile) and its children launched."""
    into.update(k.name for k in getattr(event, "kernels", ()))
    for child in event.cpu_children:
        _kernels_below(child, into)


def breakdown(step, device: bool, names: dict[str, set[str]] | None = None) -> dict[str, float]:
    """Milliseconds of one call of ``step()`` in linears, attention (without its projections)
    and the rest: kernel time when ``device`` (CUDA), else CPU time. ``names``, when given, is
    filled with the kernel names launched inside the linears' and attention's ranges (for
    :func:`replayed_breakdown`)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device else [])
    with labelled(), profile(activities=activities) as prof:
        step()
        if device:
            torch.cuda.synchronize()
    events = prof.events()
    spans: dict[str, float] = {}
    for e in events:  # the CPU-side ranges; their device time is that of the kernels inside
        if e.device_type == DeviceType.CPU and e.name in (LINEAR_IN_ATTENTION, LINEAR_ELSEWHERE, ATTENTION):
            spans[e.name] = spans.get(e.name, 0.0) + float(e.device_time_total if device else e.cpu_time_total)
    if device:
        total = sum(float(e.self_device_time_total) for e in events
                    if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False))
    else:
        total = sum(float(e.self_cpu_time_total) for e in events)
    if names is not None:
        for e in events:
            if e.device_type == DeviceType.CPU and e.name in (LINEAR_IN_ATTENTION, LINEAR_ELSEWHERE, ATTENTION):
                _kernels_below(e, names.setdefault("attention" if e.name == ATTENTION else "linears", set()))
    linear_attn = spans.get(LINEAR_IN_ATTENTION, 0.0)
    linears = linear_attn + spans.get(LINEAR_ELSEWHERE, 0.0)
    attention = max(spans.get(ATTENTION, 0.0) - linear_attn, 0.0)
    ms = 1e-3
    return {"step_ms": total * ms, "linears_ms": linears * ms, "attention_ms": attention * ms,
            "other_ms": max(total - linears - attention, 0.0) * ms}


def sort_kernels(kernel_us: dict[str, float], names: dict[str, set[str]], wall_us: float,
                 launches: float) -> dict[str, float]:
    """Per-step kernel microseconds by name sorted into the parts of :func:`breakdown` (a name
    the eager step launched in a linear counts as a linear, else one launched in attention as
    attention, else other), plus the gaps between them: milliseconds that add up to
    ``wall_us``."""
    parts = {"linears": 0.0, "attention": 0.0, "other": 0.0}
    for name, us in kernel_us.items():
        part = next((p for p in ("linears", "attention") if name in names.get(p, ())), "other")
        parts[part] += us
    ms = 1e-3
    out = {f"{p}_ms": v * ms for p, v in parts.items()}
    out["gaps_ms"] = max(wall_us - sum(parts.values()), 0.0) * ms
    out["step_ms"] = max(wall_us, sum(parts.values())) * ms
    out["kernels"] = launches
    return out


def replayed_breakdown(replay: Callable[[], object], names: dict[str, set[str]], replays: int = 8) -> dict[str, float]:
    """:func:`sort_kernels` of ``replay()`` (a captured CUDA graph's replay), per call: its wall
    time between CUDA events over ``replays`` calls, then its kernels under the profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        replay()
    end.record()
    end.synchronize()
    wall_us = start.elapsed_time(end) * 1e3 / replays
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            replay()
        torch.cuda.synchronize()
    kernel_us: dict[str, float] = {}
    launches = 0
    for e in prof.events():
        if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False):
            kernel_us[e.name] = kernel_us.get(e.name, 0.0) + float(e.self_device_time_total) / replays
            launches += 1
    return sort_kernels(kernel_us, names, wall_us, launches / replays)


def describe(parts: dict[str, float]) -> str:
    """``linears 1.02 ms (80%), attention 0.10 ms (8%), other 0.15 ms (12%) of 1.27 ms``, with
    the launch gaps and the kernel count of a replayed step."""
    total = parts["step_ms"] or 1e-12
    shown = ("linears", "attention", "other") + (("gaps",) if "gaps_ms" in parts else ())
    pieces = [f"{name} {parts[f'{name}_ms']:.3f} ms ({100 * parts[f'{name}_ms'] / total:.0f}%)" for name in shown]
    kernels = f" ({parts['kernels']:.0f} kernels)" if "kernels" in parts else ""
    return ", ".join(pieces) + f" of {parts['step_ms']:.3f} ms" + kernels
