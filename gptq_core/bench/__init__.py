"""``gptq bench``: every available backend side by side with fp16 cuBLAS and PyTorch's tinygemm.

For each shape (K x N) and batch size M of docs/DESIGN.md §9 it builds random GPTQ layers,
checks every implementation against the float64 reference on fresh random inputs, and only
then times it (CUDA events around CUDA-graph replays of calls rotating over several weight
copies, so the weights come from memory and not from the L2 cache; median of many). The
results are rows (:class:`~gptq_core.bench.runner.Result`) that :mod:`.report` prints as a
table and writes as CSV, JSON and a PNG plot. On a CPU it runs too, on small shapes, so that
its code is tested in CI.
"""

from __future__ import annotations

from .cases import BenchConfig, cpu_shapes, design_m_values, design_shapes, parse_m, parse_shapes
from .runner import Result, run

__all__ = [
    "BenchConfig",
    "Result",
    "cpu_shapes",
    "design_m_values",
    "design_shapes",
    "parse_m",
    "parse_shapes",
    "run",
]
