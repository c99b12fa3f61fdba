"""Per-group quantization grids: min-max scales and zeros, optionally refined by an MSE search.

GPTQ decides *which* integer each weight gets; this module decides the grid (scale, zero) of a
group of input channels. The min-max rule is the core's :func:`gptq_core.rtn.minmax_params`;
the MSE search is the shrink grid search of the GPTQ reference quantizer: try ranges shrunk
to ``p * [min, max]`` for ``p = 1, 0.99, ..., 0.2`` and keep, per output row, the grid with the
smallest ``sum |w - dequant(w)| ** norm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rtn import minmax_params, quantize_values

#: Shrink grid of the MSE search, as in the GPTQ reference quantizer: 100 steps, down to 20 %.
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8

@dataclass(frozen=True)
class GridSpec:
    """What decides a grid: bit width, symmetry, the lowest storable zero, the MSE norm (0: off)."""

    bits: int
    sym: bool
    zero_floor: int = 0
    mse: float = 0.0

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


def _minmax(w: torch.Tensor, grid: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zero = minmax_params(w, grid.bits, grid.sym, zero_floor=grid.zero_floor)
    return scale.to(w.device), zero.to(w.device)


def dequantize_values(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """``scale * (q - zero)``: what the checkpoint's consumers compute."""
    return scale * (q - zero)


def group_params(w: torch.Tensor, grid: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of one group: ``w`` [rows, cols] -> float scales [rows], integer-valued zeros [rows].

    Scales are exactly representable in fp16 (the format stores them so) and zeros respect
    ``grid.zero_floor`` (1 keeps asymmetric zeros storable in GPTQ v1).
    """
    w = w.float()
    scale, zero = _minmax(w, grid)
    if grid.mse <= 0:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for step in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        shrink = 1 - step / MSE_GRID
        s, z = (scale, zero) if step == 0 else _minmax(w * shrink, grid)
        q = quantize_values(w, s[:, None], z[:, None], grid.bits)
        err = (dequantize_values(q, s[:, None], z[:, None]) - w).abs().pow(grid.mse).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        if step == 0:
            best_s, best_z = s.clone(), z.clone()
        else:
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
    return best_s, best_z
