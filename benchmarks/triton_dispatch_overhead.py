"""The Python cost of one eager triton call, without the launch itself, on this machine's CPU.

``QuantLinear.forward`` at M=1 on a 4096x4096 4-bit g128 layer, its kept plan relaunching a
stand-in for the compiled kernel whose launcher does nothing: what is left is the Python work
above the kernel launch (the checks, the plan lookup, ``torch.empty`` of the output, the
argument list). The same with the act-order gather (two launches), and the traced path's
custom-op call (a fresh plan per call, as under torch.compile without CUDA graphs) for scale.
On the GPU, ``benchmarks/triton_h200_check.py`` measures the real eager overhead.

    python benchmarks/triton_dispatch_overhead.py
"""

from __future__ import annotations

import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors; the kernels never run (no-op launchers)

import torch  # noqa: E402

from gptq_core import QuantLinear  # noqa: E402
from gptq_core.bench.layers import random_layer  # noqa: E402
from gptq_backends.triton_kernels import launch, ops  # noqa: E402
from gptq_backends.triton_kernels.options import TritonOptions  # noqa: E402


class NoLaunch:
    """Stands in for Triton's compiled kernel: its launcher returns at once."""

    function, packed_metadata = 0, 0

    def run(self, *args) -> None:
        return None


def _direct(launcher: launch.Launcher | None) -> None:
    """Give a plan's launcher the direct relaunch of a kernel that does nothing."""
    if launcher is None:
        return
    real = launch.interpreting
    launch.interpreting = lambda: False
    saved = launch._stream_getter
    launch._stream_getter = lambda: (lambda index: 0)
    try:
        launcher.direct = launch.Direct.of(NoLaunch(), launcher, torch.device("cuda", 0))
    finally:
        launch.interpreting, launch._stream_getter = real, saved


def per_call_us(fn, n: int = 20000) -> float:
    """The best of 7 rounds of the mean time per call (the least disturbed by other processes)."""
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return min(rounds)


def main() -> int:
    torch.set_num_threads(1)
    K = N = 4096
    rows = []
    for act in (False, True):
        w = random_layer(K, N, 4, 128, sym=True, act_order=act, device=torch.device("cpu"), seed=1)
        layer = QuantLinear.from_packed(w, backend="triton", act_dtype=None)
        layer.bind(torch.float16, options={"triton": TritonOptions(autotune=False)})
        p = layer.binding.prepared
        x = torch.randn(1, K, dtype=torch.float16)
        plan = launch.Plan(x, p, None, ops.choose(x, p)[0])
        for launcher in (plan.gather, plan.qmm):
            _direct(launcher)
        p.plans[(1, torch.float16, False)] = plan
        name = "act-order (gather + kernel)" if act else "plain (one kernel)"
        rows.append((f"QuantLinear.forward, {name}", per_call_us(lambda: layer(x))))
        rows.append((f"ops.qmatmul, {name}", per_call_us(lambda: ops.qmatmul(x, p, None))))
    out_shape = (1, N)
    rows.append(("of which torch.empty of the output",
                 per_call_us(lambda: torch.empty(out_shape, dtype=torch.float16))))
    w = random_layer(K, N, 4, 128, sym=True, act_order=False, device=torch.device("cpu"), seed=1)
    layer = QuantLinear.from_packed(w, backend="triton", act_dtype=torch.float16)
    p = layer.binding.prepared
    x = torch.randn(1, K, dtype=torch.float16)
    real = launch.Launcher.launch
    launch.Launcher.launch = lambda self, *t: None  # Triton's own launch, without the kernel
    try:
        o = p.options
        rows.append(("custom op (traced path, plan per call, launch excluded)", per_call_us(
            lambda: ops.qmatmul_op(x, p.qweight, p.qhigh, p.scales, p.zeros, p.perm, None,
                                   p.bits, p.group_size, p.sub, p.in_features, p.out_features,
                                   p.k_pad, o.autotune, o.shipped_configs, ""), n=2000)))
    finally:
        launch.Launcher.launch = real
    print(f"Python cost per call, M=1, {K}x{N} 4-bit g128 fp16, launches stubbed out "
          f"(CPU, torch {torch.__version__}):")
    print("| call | us |\n| --- | --- |")
    for label, us in rows:
        print(f"| {label} | {us:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
