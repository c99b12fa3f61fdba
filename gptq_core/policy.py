"""Dispatch policies: which kernel of a backend serves which batch size, decided once at bind.

A backend's prepared weight carries its policy as data (docs/DESIGN.md §12), so the hot path
does one small lookup instead of re-deciding per call, and ``gptq backends explain`` can show
for every layer which path serves M = 1, 16, 64, 256 and 4096 rows.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Batch sizes (rows of the activation) that ``gptq backends explain`` reports per layer.
EXPLAIN_M: tuple[int, ...] = (1, 16, 64, 256, 4096)


@dataclass(frozen=True)
class Route:
    """Rows up to ``upto_m`` (inclusive; None: every larger M) are served by ``path``."""

    upto_m: int | None
    path: str


@dataclass(frozen=True)
class DispatchPolicy:
    """Routes in increasing ``upto_m``; the last one has ``upto_m=None``."""

    routes: tuple[Route, ...]

    def __post_init__(self) -> None:
        if not self.routes or self.routes[-1].upto_m is not None:
            raise ValueError("a DispatchPolicy needs routes ending with one of upto_m=None")
        bounds = [r.upto_m for r in self.routes[:-1]]
        if any(b is None for b in bounds) or bounds != sorted(bounds):
            raise ValueError(f"DispatchPolicy routes must be in increasing upto_m: {bounds}")

    @classmethod
    def single(cls, path: str) -> DispatchPolicy:
        return cls((Route(None, path),))

    @classmethod
    def from_thresholds(cls, *steps: tuple[int | None, str]) -> DispatchPolicy:
        """``from_thresholds((8, "a"), (256, "b"), (None, "c"))``; empty or repeated ranges of
        the same path are merged, ranges with a bound below the previous one dropped."""
        routes: list[Route] = []
        for upto, path in steps:
            if routes and upto is not None and routes[-1].upto_m is not None and upto <= routes[-1].upto_m:
                continue
            if routes and routes[-1].path == path:
                routes[-1] = Route(upto, path)
            else:
                routes.append(Route(upto, path))
        return cls(tuple(routes))

    def path_for(self, m: int) -> str:
        for route in self.routes:
            if route.upto_m is None or m <= route.upto_m:
                return route.path
        return self.routes[-1].path  # unreachable: the last route is open-ended

    def paths(self, ms: tuple[int, ...] = EXPLAIN_M) -> dict[int, str]:
        return {m: self.path_for(m) for m in ms}

    def describe(self) -> str:
        """"M<=8: a; M<=256: b; M>256: c"."""
        parts, lower = [], 0
        for r in self.routes:
            parts.append(f"M<={r.upto_m}: {r.path}" if r.upto_m is not None else
                         (f"M>{lower}: {r.path}" if lower else f"any M: {r.path}"))
            lower = r.upto_m or lower
        return "; ".join(parts)
