"""Walking a model with its :class:`Architecture`: decoder layers, groups, linear names."""

from __future__ import annotations

from torch import nn

from ..errors import GPTQError
from ..modules import is_linear_like
from .architecture import EXPERT, Architecture, expand_expert, expert_pattern



def get_module(root: nn.Module, name: str) -> nn.Module | None:
    """The submodule at dotted ``name`` ("" is ``root``), or None when it does not exist."""
    if not name:
        return root
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def decoder_layers(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    """The ModuleList of decoder layers at ``arch.layers``."""
    layers = get_module(model, arch.layers)
    if not isinstance(layers, nn.ModuleList):
        found = type(layers).__name__ if layers is not None else "nothing"
        raise GPTQError(
            f"{type(model).__name__} has {found} at '{arch.layers}', where architecture "
            f"'{arch.name}' expects the ModuleList of decoder layers; the model does not match "
            "its model_type (pass the right architecture or a model of that family)"
        )
    return layers


def _expert_count(layer: nn.Module, arch: Architecture) -> int | None:
    """How many unfused experts this layer holds (None: no MoE block in this layer)."""
    if arch.moe is None:
        return None
    experts = get_module(layer, arch.moe.experts)
    if experts is None:
        return None
    from .experts import UnfusedExperts

    if not isinstance(experts, UnfusedExperts):
        raise GPTQError(
            f"the experts at '{arch.moe.experts}' ({type(experts).__name__}) are still fused; "
            "call gptq_core.models.prepare_model_for_quantization(model, arch) first"
        )
    return experts.num_experts


def sequential_groups(layer: nn.Module, arch: Architecture) -> list[list[str]]:
    """The true-sequential groups of linear names that exist in ``layer``, experts expanded.

    Names absent from this layer (a dense first layer of a MoE model, optional projections)
    are dropped, and groups left empty disappear.
    """
    count = None
    out: list[list[str]] = []
    for group in arch.groups:
        names: list[str] = []
        for name in group:
            if EXPERT in name:
                if count is None:
                    count = _expert_count(layer, arch) or 0
                candidates = [expand_expert(name, i) for i in range(count)]
            else:
                candidates = [name]
            names += [n for n in candidates if _is_linear(get_module(layer, n))]
        if names:
            out.append(names)
    return out


def linear_names(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of every nn.Linear / Conv1D inside it."""
    return [n for n, m in module.named_modules() if is_linear_like(m)]


def uncovered_linears(layer: nn.Module, arch: Architecture) -> list[str]:
    """Linears of ``layer`` that neither a group nor ``arch.skip`` names (should be empty)."""
    covered = {n for g in sequential_groups(layer, arch) for n in g}
    skips = [expert_pattern(s) for s in arch.skip]
    return [n for n in linear_names(layer) if n not in covered and not any(p.match(n) for p in skips)]


def quantized_linear_names(model: nn.Module, arch: Architecture) -> list[str]:
    """Full names of every linear GPTQ quantizes, layer by layer in group order (no lm_head)."""
    names = []
    for i, layer in enumerate(decoder_layers(model, arch)):
        prefix = f"{arch.layers}.{i}."
        names += [prefix + n for g in sequential_groups(layer, arch) for n in g]
    return names


def outside_modules(model: nn.Module, arch: Architecture) -> list[str]:
    """The modules of ``arch.outside`` this model has (embeddings, rotary, final norm)."""
    return [n for n in arch.outside if get_module(model, n) is not None]


def sibling_modules(model: nn.Module, layers_path: str) -> list[str]:
    """Every module beside the path to the layers: what runs before and after them.

    For ``model.layers`` that is ``model.embed_tokens``, ``model.norm``, ``lm_head``...
    """
    parts = layers_path.split(".")
    found = []
    for depth in range(len(parts)):
        parent_name = ".".join(parts[:depth])
        parent = get_module(model, parent_name)
        if parent is None:
            break
        for child, _ in parent.named_children():
            if child != parts[depth]:
                found.append(f"{parent_name}.{child}" if parent_name else child)
    return found


def _is_linear(module: nn.Module | None) -> bool:
    return module is not None and is_linear_like(module)
