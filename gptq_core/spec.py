"""The layer description a backend is asked about: everything that decides whether it can serve."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Mode = Literal["inference", "training", "compile"]
MODES: tuple[str, ...] = ("inference", "training", "compile")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> "float16": how messages, tables and JSON name a dtype."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LayerSpec:
    """bits, group size, sym, act-order, K x N, activation dtype and mode of one quantized linear.

    ``mode`` is "inference", "training" (backward needed, e.g. LoRA) or "compile"
    (the layer will be captured by ``torch.compile``).
    """

    bits: int
    group_size: int
    in_features: int
    out_features: int
    sym: bool = True
    desc_act: bool = False
    act_dtype: torch.dtype = torch.float16
    mode: Mode = "inference"

    def describe(self) -> str:
        order = ", act-order" if self.desc_act else ""
        sym = "sym" if self.sym else "asym"
        return (
            f"{self.bits}-bit g{self.group_size} {sym}{order}, K={self.in_features} "
            f"N={self.out_features}, {dtype_name(self.act_dtype)}, {self.mode}"
        )

    @classmethod
    def of(cls, weight, act_dtype: torch.dtype = torch.float16, mode: Mode = "inference") -> LayerSpec:
        """The spec of a :class:`~gptq_core.format.PackedWeight`."""
        return cls(
            bits=weight.bits,
            group_size=weight.group_size,
            in_features=weight.in_features,
            out_features=weight.out_features,
            sym=weight.sym,
            desc_act=weight.desc_act,
            act_dtype=act_dtype,
            mode=mode,
        )
