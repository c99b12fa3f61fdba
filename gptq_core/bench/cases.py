"""What to benchmark: the shapes and batch sizes of docs/DESIGN.md §9, and parsing of choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import GPTQError
from ..spec import dtype_name

#: (name, K = in_features, N = out_features): Llama-2-7B, Llama-3-8B and Llama-3-70B layers.
DESIGN_SHAPES: tuple[tuple[str, int, int], ...] = (
    ("llama2-7b attn", 4096, 4096),
    ("llama2-7b up", 4096, 11008),
    ("llama2-7b down", 11008, 4096),
    ("llama3-8b up", 4096, 14336),
    ("llama3-8b down", 14336, 4096),
    ("llama3-70b up", 8192, 28672),
    ("llama3-70b down", 28672, 8192),
)
DESIGN_M: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
#: Small shapes for a CPU (and Triton's interpreter): the code runs, the numbers mean little.
CPU_SHAPES: tuple[tuple[str, int, int], ...] = (("tiny", 256, 128), ("tiny-wide", 256, 384))
CPU_M: tuple[int, ...] = (1, 16)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def design_shapes() -> list[tuple[str, int, int]]:
    return list(DESIGN_SHAPES)


def design_m_values() -> list[int]:
    return list(DESIGN_M)


def cpu_shapes() -> list[tuple[str, int, int]]:
    return list(CPU_SHAPES)


def parse_shapes(text: str) -> list[tuple[str, int, int]]:
    """``"4096x4096,8192x28672"`` (K x N), names of DESIGN_SHAPES, or ``all`` / ``cpu``."""
    out: list[tuple[str, int, int]] = []
    by_name = {name: (name, k, n) for name, k, n in DESIGN_SHAPES}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item == "all":
            out += DESIGN_SHAPES
        elif item == "cpu":
            out += CPU_SHAPES
        elif item in by_name:
            out.append(by_name[item])
        else:
            try:
                k, n = (int(v) for v in item.lower().split("x"))
            except ValueError:
                raise GPTQError(
                    f"shape {item!r} is not KxN (e.g. 4096x11008), a design shape name "
                    f"({', '.join(by_name)}), 'all' or 'cpu'"
                ) from None
            if k <= 0 or n <= 0:
                raise GPTQError(f"shape {item!r} must have positive K and N")
            known = [name for name, dk, dn in DESIGN_SHAPES if (dk, dn) == (k, n)]
            out.append((known[0] if known else f"{k}x{n}", k, n))
    if not out:
        raise GPTQError(f"no shapes in {text!r}")
    return out


def parse_m(text: str) -> list[int]:
    """``"1,16,64"`` or ``all`` (the M values of docs/DESIGN.md §9)."""
    if text.strip() == "all":
        return list(DESIGN_M)
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GPTQError(f"--m takes comma-separated integers such as 1,16,64, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise GPTQError(f"--m needs positive batch sizes, got {text!r}")
    return values


@dataclass
class BenchConfig:
    """One benchmark run: the quantization, the shapes and batch sizes, and what to compare."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    dtype: torch.dtype = torch.float16
    shapes: list[tuple[str, int, int]] = field(default_factory=design_shapes)
    m_values: list[int] = field(default_factory=design_m_values)
    backends: list[str] | None = None  # None: every backend that accepts the layer here
    device: str | None = None
    copies: int = 0  # weight copies rotated per call; 0: enough to overflow the L2 cache
    baselines: bool = True
    target_seconds: float = 0.05  # time spent timing each (shape, M, implementation)
    #: Typed options per backend, as ``from_quantized(backend_options=...)`` takes them
    #: (``{"cpu": {"gemm_threshold": "0"}}``): so a path can be forced and timed; backends not
    #: named keep their defaults.
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def describe(self) -> str:
        g = "g-1" if self.group_size == -1 else f"g{self.group_size}"
        dt = dtype_name(self.dtype)
        return (f"{self.bits}-bit {g} {'sym' if self.sym else 'asym'}"
                f"{' act-order' if self.act_order else ''}, {dt} activations")
