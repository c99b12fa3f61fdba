"""Finding a model's :class:`Architecture`: from ``config.model_type``, else from its module tree."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError, GPTQError
from .architecture import Architecture, MoE
from ..modules import is_linear_like
from .layers import get_module, linear_names, sibling_modules
from .table import ARCHITECTURES

log = logging.getLogger(__name__)

# ----------------------------------------------------------- name heuristics (data) for unknown models
#: Leaf names of linears that route tokens to experts: they stay in float.
ROUTER_LEAVES = frozenset({"router", "gate", "shared_expert_gate", "wg", "classifier"})
#: Inside an attention block: leaf name -> stage (0 reads the layer input, 1 low-rank ups, 2 output).
ATTENTION_STAGES: dict[str, int] = {
    **dict.fromkeys(
        ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "wqkv", "query",
         "key", "value", "wq", "wk", "wv", "q_a_proj", "kv_a_proj_with_mqa", "in_proj",
         "in_proj_qkvz", "in_proj_ba", "g_proj", "gate_proj", "kv_proj"),
        0,
    ),
    **dict.fromkeys(("q_b_proj", "kv_b_proj"), 1),
    **dict.fromkeys(("o_proj", "out_proj", "dense", "c_proj", "wo", "output_gate"), 2),
}
#: Outside attention (MLP, experts): leaf name -> stage (3 reads the MLP input, 4 the output).
MLP_STAGES: dict[str, int] = {
    **dict.fromkeys(
        ("gate_proj", "up_proj", "gate_up_proj", "fc1", "fc_in", "c_fc", "w1", "w3", "v1",
         "dense_h_to_4h", "input_linear", "wi", "wi_0", "wi_1"),
        3,
    ),
    **dict.fromkeys(
        ("down_proj", "fc2", "fc_out", "c_proj", "w2", "dense_4h_to_h", "output_linear", "wo"), 4
    ),
}
_ATTENTION_WORDS = ("attn", "attention")


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def _unsupported(model_type: str | None, why: str) -> GPTQError:
    types = ", ".join(supported_model_types())
    return GPTQError(
        f"model_type {model_type!r} is not in the architecture table and {why}. Supported "
        f"model types: {types}. Add an Architecture for it to gptq_core.models.table "
        "(see `gptq models list` for examples)."
    )


def check_model_type_known(model_dir: str | Path, trust_remote_code: bool = False) -> None:
    """Refuse, before transformers is asked, a ``config.json`` whose ``model_type`` transformers
    does not know: one line with advice that works from where the user is (the ``gptq`` CLI
    never runs a checkpoint's own code, so it has no ``trust_remote_code`` flag to advise).

    A folder without a readable ``config.json`` passes: the loaders name that problem themselves.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or model_type in CONFIG_MAPPING or trust_remote_code:
        return
    if config.get("auto_map"):
        fix = ("the model ships its own code (auto_map): if you trust its author, load it from "
               "Python with trust_remote_code=True; the gptq CLI never runs a checkpoint's code")
    else:
        fix = ("upgrade transformers if the model is newer than it, or check model_type for a "
               f"typo (gptq-core's table knows: {', '.join(supported_model_types())})")
    raise CheckpointError(
        f"{path}: model_type {model_type!r} is unknown to transformers "
        f"{transformers.__version__}; {fix}"
    )


def get_architecture(model_or_config: Any) -> Architecture:
    """The architecture of a model, a transformers config, or a model_type string.

    Known ``model_type``s come from :data:`ARCHITECTURES`. For an unknown type, a model's
    module tree is inspected (:func:`infer_architecture`); a config or string alone cannot be,
    so that raises a :class:`GPTQError` listing the supported types.
    """
    model = model_or_config if isinstance(model_or_config, nn.Module) else None
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config) if model is not None else model_or_config
        model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type) if model_type else None
    if arch is not None:
        if model is None or isinstance(get_module(model, arch.layers), nn.ModuleList):
            return arch
        log.warning(
            "model_type %r: no decoder layers at %r in %s; detecting the layout from the module tree",
            model_type, arch.layers, type(model).__name__,
        )
    if model is None:
        raise _unsupported(model_type, "no model was given to detect its layout from the module tree")
    return infer_architecture(model)


# ----------------------------------------------------------------------------- inference
def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of identical blocks holding linears with the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(block) for block in module}
        if len(kinds) != 1 or not linear_names(module[0]):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise _unsupported(
            getattr(getattr(model, "config", None), "model_type", None),
            f"{type(model).__name__} has no ModuleList of identical blocks holding nn.Linear "
            "layers, so its decoder layers cannot be found",
        )
    return best[1], best[2]


def _fused_experts(layer: nn.Module) -> list[str]:
    """Paths of modules that follow transformers' fused-experts interface."""
    return [
        n for n, m in layer.named_modules()
        if hasattr(m, "has_gate") and hasattr(m, "is_transposed") and hasattr(m, "down_proj")
    ]


def _check_no_fused_weights(layer: nn.Module, experts: list[str], where: str) -> None:
    """Reject 3-D weights GPTQ cannot see (fused experts of an unknown layout); warn on 2-D ones."""
    for name, p in layer.named_parameters():
        owner = name.rpartition(".")[0]
        module = get_module(layer, owner)
        if p.dim() < 2 or any(owner == e or owner.startswith(e + ".") for e in experts):
            continue
        if is_linear_like(module) or isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        if p.dim() == 2:
            if not any(w in owner.lower() for w in ("router", "gate")):
                log.warning(
                    "%s.%s is a matrix held by %s, not by an nn.Linear; it stays in float",
                    where, name, type(module).__name__,
                )
            continue
        raise GPTQError(
            f"{where}.{name} is a {p.dim()}-D weight of {type(get_module(layer, owner)).__name__} "
            "(fused experts of an unknown layout); GPTQ cannot quantize it as it is. Add this "
            "model_type to gptq_core.models.table with an MoE entry that unfuses it."
        )


def _stage(name: str) -> int | None:
    """Stage of a linear by its name, or None when the heuristics do not know it."""
    parts = name.split(".")
    leaf = parts[-1].lower()
    context = parts[:-1]
    if any(w in p.lower() for p in context for w in _ATTENTION_WORDS):
        return ATTENTION_STAGES.get(leaf)
    return MLP_STAGES.get(leaf)


def _is_router(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] in ROUTER_LEAVES or (len(parts) > 1 and parts[-2] in ("router", "gate"))


def infer_architecture(model: nn.Module) -> Architecture:
    """Detect layers, outside modules and groups of a model the table does not list.

    Groups come from name heuristics (attention inputs, output, MLP inputs, output); if a
    linear's role cannot be told from its name, all linears form one group (GPTQ without
    true-sequential ordering, which is still correct). Routers stay in float.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    path, layers = _find_layers(model)
    from .experts import UnfusedExperts

    moe = None
    names: list[str] = []
    for i, layer in enumerate(layers):
        unfused = [n for n, m in layer.named_modules() if isinstance(m, UnfusedExperts)]
        fused = _fused_experts(layer)
        _check_no_fused_weights(layer, fused, f"{path}.{i}")
        for experts_path in fused + unfused:
            found = (
                layer.get_submodule(experts_path).moe if experts_path in unfused
                else MoE(experts=experts_path, expert=experts_path + ".{expert}")
            )
            if moe is not None and moe != found:
                raise GPTQError(f"{model_type}: layers hold different expert layouts ({moe} and {found})")
            moe = found
        for n in linear_names(layer):
            if moe is not None and n.startswith(moe.experts + "."):
                continue
            if n not in names:
                names.append(n)
    if moe is not None:
        names += [f"{moe.expert}.{leaf}" for leaf in moe.linear_names()]
    skip = tuple(n for n in names if _is_router(n))
    names = [n for n in names if n not in skip]
    stages = {n: _stage(n) for n in names}
    if names and all(s is not None for s in stages.values()):
        groups = tuple(
            tuple(n for n in names if stages[n] == s) for s in sorted(set(stages.values()))
        )
    else:
        unknown = [n for n, s in stages.items() if s is None]
        log.warning(
            "%s: cannot tell the role of %s from the names; quantizing all linears of a layer "
            "as one group (no true-sequential ordering)", model_type, ", ".join(unknown),
        )
        groups = (tuple(names),)
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = next((n for n, m in model.named_modules() if m is head_module), "") if head_module is not None else ""
    outside = tuple(n for n in sibling_modules(model, path) if n != head)
    arch = Architecture(
        name=f"{model_type} (detected)",
        model_types=(model_type,),
        layers=path,
        outside=outside,
        groups=groups,
        head=head,
        skip=skip,
        moe=moe,
        inferred=True,
    )
    log.warning(
        "model_type %r is not in the architecture table; detected from the module tree: layers at "
        "%r, groups %s", model_type, path, arch.describe_groups(),
    )
    return arch
