"""Where one decode step's device time goes: linears, attention, everything else.

The step is run eagerly under ``torch.profiler`` with every linear layer (``nn.Linear`` and
``QuantLinear``) and every attention module call wrapped in a named range by global module
hooks; kernel time is summed per range. Attention is reported without its own projections, so the three parts add up
to the step's kernel time (docs/DESIGN.md §9: a slow step is explained, not guessed at).
"""

from __future__ import annotations

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


def breakdown(step, device: bool) -> dict[str, float]:
    """Milliseconds of one call of ``step()`` in linears, attention (without its projections)
    and the rest: kernel time when ``device`` (CUDA), else CPU time."""
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
    linear_attn = spans.get(LINEAR_IN_ATTENTION, 0.0)
    linears = linear_attn + spans.get(LINEAR_ELSEWHERE, 0.0)
    attention = max(spans.get(ATTENTION, 0.0) - linear_attn, 0.0)
    ms = 1e-3
    return {"step_ms": total * ms, "linears_ms": linears * ms, "attention_ms": attention * ms,
            "other_ms": max(total - linears - attention, 0.0) * ms}


def describe(parts: dict[str, float]) -> str:
    """``linears 1.02 ms (80%), attention 0.10 ms (8%), other 0.15 ms (12%) of 1.27 ms``."""
    total = parts["step_ms"] or 1e-12
    pieces = [f"{name} {parts[f'{name}_ms']:.3f} ms ({100 * parts[f'{name}_ms'] / total:.0f}%)"
              for name in ("linears", "attention", "other")]
    return ", ".join(pieces) + f" of {parts['step_ms']:.3f} ms"
