"""The compatibility matrix of docs/COMPATIBILITY.md (and the README), computed from the rules.

Each column is one variant of a checkpoint as gptq-core writes it, on the linear shapes of
Llama-2-7B (4096x4096, 4096x11008, 11008x4096), so shape rules never decide a cell; the test
suite checks that the table in the docs is this one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .evaluate import judge
from .facts import CheckpointFacts, LayerFacts
from .rules import READERS

#: The linear shapes (in_features, out_features) every variant is judged on.
LLAMA2_7B_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (4096, 11008), (11008, 4096))

BASE = CheckpointFacts(
    bits=4, group_size=128, sym=True, desc_act=False, checkpoint_format="gptq",
    quantizers=("gptq-core:0.1.0",),
    layers=tuple(LayerFacts(f"layer{i}", k, n, True) for i, (k, n) in enumerate(LLAMA2_7B_SHAPES)),
)


def _act_order(facts: CheckpointFacts) -> CheckpointFacts:
    layers = tuple(replace(layer, natural_g_idx=False) for layer in facts.layers)
    return replace(facts, desc_act=True, layers=layers)


@dataclass(frozen=True)
class Variant:
    """One column: a short title and the checkpoint it stands for."""

    title: str
    facts: CheckpointFacts


VARIANTS: tuple[Variant, ...] = (
    Variant("4-bit g128 sym", BASE),
    Variant("asym", replace(BASE, sym=False)),
    Variant("act-order", _act_order(BASE)),
    Variant("act-order + static groups", BASE),  # written with desc_act: false (natural g_idx)
    Variant("v2 sym", replace(BASE, checkpoint_format="gptq_v2")),
    Variant("v2 asym", replace(BASE, checkpoint_format="gptq_v2", sym=False)),
    Variant("2-bit", replace(BASE, bits=2)),
    Variant("3-bit", replace(BASE, bits=3)),
    Variant("8-bit", replace(BASE, bits=8)),
    Variant("g-1", replace(BASE, group_size=-1)),
    Variant("g32", replace(BASE, group_size=32)),
    Variant("g64", replace(BASE, group_size=64)),
    Variant("g256", replace(BASE, group_size=256)),
)


def cell(facts: CheckpointFacts, reader_key: str) -> str:
    """"yes", or "no" (the first reason is in the reasons table of the docs)."""
    reader = next(r for r in READERS if r.key == reader_key)
    return "yes" if judge(reader, facts).loads else "no"


def markdown() -> str:
    """The matrix as a markdown table: readers as rows, variants as columns."""
    head = "| reader | " + " | ".join(v.title for v in VARIANTS) + " |"
    rule = "| --- |" + " --- |" * len(VARIANTS)
    rows = [
        f"| {r.name} {r.version.split(' ')[0] if r.key != 'transformers' else '5.17'} | "
        + " | ".join(cell(v.facts, r.key) for v in VARIANTS) + " |"
        for r in READERS
    ]
    return "\n".join([head, rule, *rows])
