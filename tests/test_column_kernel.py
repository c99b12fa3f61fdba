"""The Triton column kernel of GPTQ (gptq_core/quantize/column_kernel.py) against the torch loop.

On the CPU the kernel runs under Triton's interpreter, whose float32 arithmetic is numpy's
(no fma contraction), so it must give the torch loop's results exactly: every integer, grid
and loss. (On a GPU the rank-one update may contract into an fma: benchmarks/quantize_synthetic.py
and the device checks compare there.) The interpreter must be switched on before Triton is
imported, hence one subprocess for all cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import itertools, torch
    from gptq_core.config import QuantizeConfig
    from gptq_core.quantize import column_kernel
    from gptq_core.quantize.gptq import _gptq
    launches = []
    span = column_kernel.quantize_span
    column_kernel.quantize_span = lambda *a: (launches.append(a[-3:-1]), span(*a))
    cases = [
        dict(bits=4, group_size=128), dict(bits=4, group_size=32), dict(bits=3, group_size=48),
        dict(bits=2, group_size=16, sym=False), dict(bits=8, group_size=-1),
        dict(bits=4, group_size=32, desc_act=True), dict(bits=4, group_size=64, desc_act=True, static_groups=True),
        dict(bits=4, group_size=32, act_group_aware=True), dict(bits=4, group_size=128, mse=2.4),
    ]
    failures = 0
    for n, (kw, (N, K)) in enumerate(itertools.product(cases, [(40, 200), (16, 256)])):
        g = torch.Generator().manual_seed(n)
        W = torch.randn(N, K, generator=g)
        X = torch.randn(4 * K, K, generator=g) * torch.rand(K, generator=g) * 3
        H = X.t() @ X / X.shape[0]
        H[5, :] = 0; H[:, 5] = 0  # a dead input
        cfg = QuantizeConfig(**kw)
        ref = _gptq(W.clone(), H, cfg, 64, use_kernel=False)
        before = len(launches)
        got = _gptq(W.clone(), H, cfg, 64, use_kernel=True)
        if len(launches) == before:
            failures += 1
            print("KERNEL NOT USED", kw)
        same = (torch.equal(ref.q, got.q) and torch.equal(ref.scales, got.scales)
                and torch.equal(ref.zeros, got.zeros) and torch.equal(ref.g_idx, got.g_idx))
        loss_ok = abs(ref.error - got.error) <= 1e-5 * max(1.0, abs(ref.error))
        if not (same and loss_ok):
            failures += 1
            print("MISMATCH", kw, N, K, (ref.q != got.q).sum().item(), ref.error, got.error)
    spans = sorted(set(launches))
    print("cases", n + 1, "failures", failures, "launches", len(launches), "span kinds", len(spans))
""")


def test_kernel_matches_the_torch_loop_exactly_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "failures 0" in proc.stdout, proc.stdout[-3000:]

