"""Judging a checkpoint against the readers' rules (:mod:`gptq_core.compat.rules`).

Each check takes the checkpoint's facts and the rule's value and returns what fails, in
words, or nothing; shape checks name the first layers that fail and how many do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from packaging.version import InvalidVersion, Version

from .facts import CheckpointFacts, LayerFacts
from .rules import READERS, Reader, Rule, rules_of

#: Layers named per failing shape rule before "and N more".
SHOWN_LAYERS = 3


def _layers_failing(facts: CheckpointFacts, bad: Callable[[LayerFacts], str | None]) -> str | None:
    found = [(layer.name, msg) for layer in facts.layers if (msg := bad(layer)) is not None]
    if not found:
        return None
    shown = "; ".join(f"{name}: {msg}" for name, msg in found[:SHOWN_LAYERS])
    more = len(found) - SHOWN_LAYERS
    return shown + (f" (and {more} more layers)" if more > 0 else "")


def _multiple(value: Any, facts: CheckpointFacts) -> int:
    return facts.pack_factor if value == "pack" else int(value)


def check_bits(facts: CheckpointFacts, value: tuple[int, ...]) -> str | None:
    return None if facts.bits in value else f"bits={facts.bits}"


def check_sym(facts: CheckpointFacts, value: bool) -> str | None:
    return None if facts.sym or not value else "sym=false"


def check_formats(facts: CheckpointFacts, value: tuple[str, ...]) -> str | None:
    return None if facts.checkpoint_format in value else f"checkpoint_format={facts.checkpoint_format}"


def check_group_sizes(facts: CheckpointFacts, value: tuple[int, ...]) -> str | None:
    return None if facts.group_size in value else f"group_size={facts.group_size}"


def check_group_pow2(facts: CheckpointFacts, value: bool) -> str | None:
    g = facts.group_size
    return None if g == -1 or (g & (g - 1)) == 0 else f"group_size={g}"


def check_no_act_order(facts: CheckpointFacts, value: bool) -> str | None:
    if facts.desc_act and facts.group_size != -1:
        natural = facts.layers and all(layer.natural_g_idx for layer in facts.layers)
        hint = " (every g_idx is in natural order: the config could say desc_act: false)" if natural else ""
        return f"desc_act=true{hint}"
    return None


def check_asym_v1_producer(facts: CheckpointFacts, value: tuple[str, str]) -> str | None:
    if facts.sym or facts.checkpoint_format != "gptq":
        return None
    producer, minimum = value
    for entry in facts.quantizers:
        name, _, ver = entry.partition(":")
        if name.strip().lower() == producer:
            try:
                if Version(ver.strip()) >= Version(minimum):
                    return None
            except InvalidVersion:
                pass
    made_by = ", ".join(facts.quantizers) or "no quantizer named"
    return f"sym=false with format gptq, made by {made_by}"


def check_k_multiple(facts: CheckpointFacts, value: Any) -> str | None:
    m = _multiple(value, facts)
    return _layers_failing(
        facts, lambda l: None if l.in_features % m == 0 else f"in_features={l.in_features} is not a multiple of {m}")


def check_n_multiple(facts: CheckpointFacts, value: Any) -> str | None:
    m = _multiple(value, facts)
    return _layers_failing(
        facts,
        lambda l: None if l.out_features % m == 0 else f"out_features={l.out_features} is not a multiple of {m}")


def check_k_divisible_by_group(facts: CheckpointFacts, value: bool) -> str | None:
    g = facts.group_size
    if g == -1:
        return None
    return _layers_failing(
        facts, lambda l: None if l.in_features % g == 0 else f"in_features={l.in_features} % {g} != 0")


def check_tile_shapes(facts: CheckpointFacts, value: tuple[tuple[int, int], ...]) -> str | None:
    def bad(layer: LayerFacts) -> str | None:
        if any(layer.in_features % k == 0 and layer.out_features % n == 0 for k, n in value):
            return None
        return f"shape (in {layer.in_features}, out {layer.out_features})"
    return _layers_failing(facts, bad)


#: Check name (as the rules table writes it) -> check.
CHECKS: dict[str, Callable[[CheckpointFacts, Any], str | None]] = {
    "bits": check_bits,
    "sym": check_sym,
    "formats": check_formats,
    "group_sizes": check_group_sizes,
    "group_pow2": check_group_pow2,
    "no_act_order": check_no_act_order,
    "asym_v1_producer": check_asym_v1_producer,
    "k_multiple": check_k_multiple,
    "n_multiple": check_n_multiple,
    "k_divisible_by_group": check_k_divisible_by_group,
    "tile_shapes": check_tile_shapes,
}


def _matches(facts: CheckpointFacts, condition) -> bool:
    return all(facts.field(name) in allowed for name, allowed in condition.items())


def applies(rule: Rule, facts: CheckpointFacts) -> bool:
    """Whether the reader takes the path the rule belongs to for these settings."""
    if rule.when and not _matches(facts, rule.when):
        return False
    return not (rule.unless and _matches(facts, rule.unless))


@dataclass(frozen=True)
class Reason:
    """One failed rule: what fails, why the reader refuses it, how to fix it, where it is read."""

    found: str
    reason: str
    fix: str
    source: str

    def describe(self) -> str:
        return f"{self.found}: {self.reason}; {self.fix}"

    def to_dict(self) -> dict[str, str]:
        return {"found": self.found, "reason": self.reason, "fix": self.fix, "source": self.source}


@dataclass(frozen=True)
class Verdict:
    """Whether one reader loads the checkpoint, and every reason it does not."""

    reader: Reader
    reasons: tuple[Reason, ...] = field(default_factory=tuple)

    @property
    def loads(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        return {
            "reader": self.reader.name,
            "key": self.reader.key,
            "version": self.reader.version,
            "loads": self.loads,
            "reasons": [r.describe() for r in self.reasons],
            "details": [r.to_dict() for r in self.reasons],
        }


def judge(reader: Reader, facts: CheckpointFacts) -> Verdict:
    """The verdict of one reader on ``facts``."""
    reasons = []
    for rule in rules_of(reader.key):
        if not applies(rule, facts):
            continue
        found = CHECKS[rule.check](facts, rule.value)
        if found is not None:
            reasons.append(Reason(found, rule.reason, rule.fix, rule.source))
    return Verdict(reader, tuple(reasons))


def judge_all(facts: CheckpointFacts, readers: Iterable[Reader] = READERS) -> list[Verdict]:
    """Every reader's verdict, in the order of :data:`READERS`."""
    return [judge(reader, facts) for reader in readers]


def reader(key: str) -> Reader:
    """The reader called ``key`` (see :data:`READER_KEYS`)."""
    for r in READERS:
        if r.key == key:
            return r
    raise KeyError(key)
