"""Which peer readers (transformers/optimum, GPTQModel, AutoGPTQ, vLLM, SGLang, TGI,
ExLlamaV2) load a GPTQ checkpoint, and why not: rules as data read off each reader's code
(:mod:`.rules`, docs/COMPATIBILITY.md), judged on a folder or on weights about to be saved.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..config import QuantizeConfig
from ..format import PackedWeight
from .evaluate import CHECKS, Reason, Verdict, judge, judge_all, reader
from .facts import CheckpointFacts, LayerFacts, facts_of_folder, facts_of_packed, natural_g_idx
from .rules import READER_KEYS, READERS, RULES, Reader, Rule, rules_of

__all__ = [
    "CHECKS", "READERS", "READER_KEYS", "RULES", "CheckpointFacts", "LayerFacts", "Reader",
    "Reason", "Rule", "Verdict", "check_checkpoint", "facts_of_folder", "facts_of_packed",
    "judge", "judge_all", "natural_g_idx", "reader", "rules_of", "vllm_verdict",
]


def check_checkpoint(model_dir: str | Path) -> list[Verdict]:
    """Every reader's verdict on the checkpoint folder ``model_dir``."""
    return judge_all(facts_of_folder(model_dir))


def vllm_verdict(config: QuantizeConfig, packed: Mapping[str, PackedWeight]) -> Verdict:
    """vLLM's verdict on weights about to be saved with ``config`` (the save-time warning)."""
    return judge(reader("vllm"), facts_of_packed(config, packed))
