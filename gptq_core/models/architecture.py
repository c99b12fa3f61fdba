"""What the quantizer must know about a decoder family, as one frozen record per family.

An :class:`Architecture` says where the decoder layers are, which modules sit outside them,
and in which true-sequential order the linears inside a layer are quantized. Names are
relative to the model (``layers``, ``outside``, ``head``) or to one decoder layer
(``groups``, ``skip``, :class:`MoE` paths). In ``groups`` the placeholder ``{expert}``
stands for every expert index of a mixture-of-experts layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

#: Placeholder for the expert index in group names: "mlp.experts.{expert}.gate_proj".
EXPERT = "{expert}"

#: How a fused experts module computes (see :mod:`gptq_core.models.experts`):
#: "routed": transformers' experts interface, ``forward(hidden, top_k_index, top_k_weights)``
#:   over 3-D ``gate_up_proj`` / ``down_proj`` (Mixtral, Qwen-MoE, DeepSeek, GPT-OSS, ...);
#: "dense": every expert sees every token, inputs pre-scaled by the router (Llama 4);
#: "dbrx": DBRX's 2-D ``w1`` / ``v1`` / ``w2`` stacks of all experts.
ExpertStyle = Literal["routed", "dense", "dbrx"]
EXPERT_STYLES: tuple[str, ...] = ("routed", "dense", "dbrx")


@dataclass(frozen=True)
class MoE:
    """Mixture-of-experts layout of a layer: where the fused experts are, how to unfuse them.

    ``experts`` is the fused module inside a layer; ``expert`` the name template of one
    unfused expert (the module holding its ``gate``, ``up`` and ``down`` linears). The linear
    names follow the per-expert checkpoints GPTQModel/AutoGPTQ write for that family
    (Mixtral ``w1``/``w3``/``w2``, Qwen-MoE ``gate_proj``/``up_proj``/``down_proj``).
    ``gate=None`` marks experts without a gate (act(up) then down).
    """

    experts: str
    expert: str
    gate: str | None = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    style: ExpertStyle = "routed"

    def linear_names(self) -> tuple[str, ...]:
        """The linears of one expert, relative to the expert module, in execution order."""
        return tuple(n for n in (self.gate, self.up, self.down) if n is not None)


@dataclass(frozen=True)
class Architecture:
    """One decoder family: where its layers are and in which order their linears quantize.

    ``groups`` may list names that exist only in some layers or some sizes of the family
    (a dense first layer of a MoE model, ``q_proj`` versus ``q_a_proj``); names absent from a
    layer are dropped for that layer. ``skip`` lists the linears of a layer that stay in
    float on purpose (MoE routers and gates). ``checkpoint_renames`` maps a substring of the
    transformers-5 module name to the one peers' per-expert checkpoints use (Mixtral's
    ``.mlp.`` was ``.block_sparse_moe.``), for reading and writing those checkpoints.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    outside: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    head: str = "lm_head"
    skip: tuple[str, ...] = ()
    moe: MoE | None = None
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    inferred: bool = False
    #: Linears of one layer that the modeling code calls with the very same input tensor
    #: (q/k/v; gate/up), so loading may serve them by one matmul over their weights
    #: concatenated along N (:mod:`gptq_core.fusion`). Each is a subset of one of ``groups``;
    #: names a layer lacks are dropped; experts are never listed (each sees its own tokens).
    fusion_groups: tuple[tuple[str, ...], ...] = ()

    def group_names(self) -> tuple[str, ...]:
        """Every name of every group, templates unexpanded, in order."""
        return tuple(n for g in self.groups for n in g)

    def describe_groups(self) -> str:
        """``[q_proj k_proj v_proj] -> [o_proj] -> ...`` for tables and messages."""
        return " -> ".join("[" + " ".join(g) + "]" for g in self.groups)


def _rename(name: str, pairs: tuple[tuple[str, str], ...], forward: bool) -> str:
    for model_part, ckpt_part in pairs:
        old, new = (model_part, ckpt_part) if forward else (ckpt_part, model_part)
        name = name.replace(old, new)
    return name


def checkpoint_key(name: str, arch: Architecture) -> str:
    """The tensor name peers' checkpoints use for the module/tensor ``name`` of this model."""
    return _rename(name, arch.checkpoint_renames, forward=True)


def model_key(name: str, arch: Architecture) -> str:
    """Inverse of :func:`checkpoint_key`: a peer checkpoint's tensor name -> this model's."""
    return _rename(name, arch.checkpoint_renames, forward=False)


def expand_expert(name: str, index: int) -> str:
    """``"mlp.experts.{expert}.w1"`` with index 3 -> ``"mlp.experts.3.w1"``."""
    return name.replace(EXPERT, str(index))


def expert_pattern(name: str) -> re.Pattern[str]:
    """A regex matching every expansion of a templated name (used to check coverage)."""
    return re.compile("^" + re.escape(name).replace(re.escape(EXPERT), r"\d+") + "$")
