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
#: Elements (shrinks x rows x cols) the search evaluates at once, by device type: bounds its
#: memory; on the CPU larger chunks only spill the caches (measured equal to one shrink at a
#: time for 4096x128 groups, 3-10x faster for the small groups of small models).
MSE_CHUNK_ELEMENTS: dict[str, int] = {"cpu": 1 << 20}
MSE_CHUNK_ELEMENTS_DEFAULT = 1 << 24


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
    return _mse_search(w, grid)


def _mse_search(w: torch.Tensor, grid: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The shrink search, all shrinks of a chunk in one batched pass (one Python step per
    chunk instead of per shrink: this is what makes ``mse`` cheap enough to be a default).
    Per row the first shrink with the smallest error wins, as in a sequential scan."""
    rows, cols = w.shape
    steps = int(MSE_MAX_SHRINK * MSE_GRID)
    shrinks = 1 - torch.arange(steps, device=w.device, dtype=torch.float32) / MSE_GRID
    budget = MSE_CHUNK_ELEMENTS.get(w.device.type, MSE_CHUNK_ELEMENTS_DEFAULT)
    chunk = max(1, min(steps, budget // max(1, rows * cols)))
    best_err = best_s = best_z = None
    for lo in range(0, steps, chunk):
        p = shrinks[lo : lo + chunk]
        n = p.shape[0]
        s, z = _minmax((w[None] * p[:, None, None]).reshape(n * rows, cols), grid)
        s, z = s.view(n, rows, 1), z.view(n, rows, 1)
        q = quantize_values(w[None], s, z, grid.bits)
        err = (dequantize_values(q, s, z) - w[None]).abs().pow(grid.mse).sum(dim=2)  # [n, rows]
        idx = err.argmin(dim=0)  # the first minimum: the largest range among equals
        e = err.gather(0, idx[None])[0]
        cs, cz = s[:, :, 0].gather(0, idx[None])[0], z[:, :, 0].gather(0, idx[None])[0]
        if best_err is None:
            best_err, best_s, best_z = e, cs, cz
        else:
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best_s = torch.where(better, cs, best_s)
            best_z = torch.where(better, cz, best_z)
    return best_s, best_z
