"""What a peer reader looks at in a GPTQ checkpoint: the quantization settings and each
quantized layer's shape and ``g_idx`` (docs/COMPATIBILITY.md).

Facts come from a folder on disk (:func:`facts_of_folder`: config files and safetensors
headers, plus the small ``g_idx`` tensors) or from what is about to be saved
(:func:`facts_of_packed`), so ``gptq check`` and the warning of ``save_quantized`` judge the
same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import QuantizeConfig
from ..format import PackedWeight, default_g_idx

#: Tensors of one quantized layer in a GPTQ checkpoint (docs/DESIGN.md §2).
G_IDX_SUFFIX = ".g_idx"
SCALES_SUFFIX = ".scales"


@dataclass(frozen=True)
class LayerFacts:
    """One quantized linear: K (in_features), N (out_features), whether ``g_idx`` is the
    natural ``k // group_size`` (None when unknown)."""

    name: str
    in_features: int
    out_features: int
    natural_g_idx: bool | None = None


@dataclass(frozen=True)
class CheckpointFacts:
    """The settings every reader decides on, as written in the checkpoint's config."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    checkpoint_format: str
    quantizers: tuple[str, ...] = ()
    layers: tuple[LayerFacts, ...] = ()

    @classmethod
    def from_config(cls, config: QuantizeConfig, layers: tuple[LayerFacts, ...] = ()) -> CheckpointFacts:
        quantizers = config.meta.get("quantizer", ())
        if isinstance(quantizers, str):
            quantizers = (quantizers,)
        return cls(
            bits=config.bits, group_size=config.group_size, sym=config.sym,
            desc_act=config.desc_act, checkpoint_format=config.checkpoint_format,
            quantizers=tuple(str(q) for q in quantizers), layers=layers,
        )

    @property
    def pack_factor(self) -> int:
        """Values per int32 word as readers size ``qweight``: 32 // bits (3-bit: 32 values
        fill 3 words, so 32)."""
        return 32 if 32 % self.bits else 32 // self.bits

    def field(self, name: str) -> object:
        """A setting by the name a rule's ``when`` uses."""
        return getattr(self, name)


def natural_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when ``g_idx`` is ``k // group_size``: act-order then changed nothing a reader sees
    (e.g. act-order with static groups), so ``desc_act`` may be written as false."""
    return bool(torch.equal(g_idx.to(torch.int32).cpu(), default_g_idx(g_idx.numel(), group_size)))


def layers_of_packed(packed: Mapping[str, PackedWeight]) -> tuple[LayerFacts, ...]:
    """Layer facts of weights about to be saved."""
    return tuple(
        LayerFacts(name, pw.in_features, pw.out_features, natural_g_idx(pw.g_idx, pw.group_size))
        for name, pw in sorted(packed.items())
    )


def facts_of_packed(config: QuantizeConfig, packed: Mapping[str, PackedWeight]) -> CheckpointFacts:
    return CheckpointFacts.from_config(config, layers_of_packed(packed))


def layers_of_folder(model_dir: Path, group_size: int) -> tuple[LayerFacts, ...]:
    """Layer facts from safetensors headers (shapes) and the ``g_idx`` tensors (values)."""
    from ..checkpoint.inventory import read_inventory, weight_files

    files, weight_map = weight_files(model_dir)
    inventory = read_inventory(files, weight_map)
    layers = []
    for key, entry in sorted(inventory.items()):
        if not key.endswith(G_IDX_SUFFIX):
            continue
        name = key[: -len(G_IDX_SUFFIX)]
        scales = inventory.get(name + SCALES_SUFFIX)
        if scales is None or len(scales.shape) != 2 or len(entry.shape) != 1:
            continue  # not a GPTQ layer: the loader reports it, the readers' rules do not apply
        with safe_open(str(entry.file), framework="pt", device="cpu") as fh:
            natural = natural_g_idx(fh.get_tensor(key), group_size)
        layers.append(LayerFacts(name, entry.shape[0], scales.shape[1], natural))
    return tuple(layers)


def facts_of_folder(model_dir: str | Path) -> CheckpointFacts:
    """Facts of a checkpoint folder (config as the loader reads it, layers from the weights)."""
    from ..checkpoint.configs import check_model_dir, read_quantize_config

    path = check_model_dir(model_dir)
    config = read_quantize_config(path)
    return CheckpointFacts.from_config(config, layers_of_folder(path, config.group_size))
