"""``gptq check MODEL_DIR``: which peer readers load this GPTQ checkpoint, and why not.

The rules are data read off each reader's code (gptq_core/compat/rules.py, with the file and
version each comes from; docs/COMPATIBILITY.md); only config files, safetensors headers and the
small ``g_idx`` tensors are read, so it is quick on any checkpoint size.
"""

from __future__ import annotations

import argparse
import json

from ..errors import GPTQError


def describe_settings(facts) -> str:
    """``4-bit g128 sym, gptq, act-order, 35 quantized layers``."""
    parts = [f"{facts.bits}-bit g{facts.group_size}", "sym" if facts.sym else "asym", facts.checkpoint_format]
    if facts.desc_act:
        parts.append("act-order")
    parts.append(f"{len(facts.layers)} quantized layers")
    return ", ".join(parts)


def _run(args: argparse.Namespace) -> int:
    from ..compat import READER_KEYS, facts_of_folder, judge_all

    unknown = sorted(set(args.require) - set(READER_KEYS))
    if unknown:
        raise GPTQError(f"--require {', '.join(unknown)}: unknown reader; choose from {', '.join(READER_KEYS)}")
    facts = facts_of_folder(args.model_dir)
    verdicts = judge_all(facts)
    if args.json:
        print(json.dumps({
            "checkpoint": str(args.model_dir),
            "settings": {"bits": facts.bits, "group_size": facts.group_size, "sym": facts.sym,
                         "desc_act": facts.desc_act, "checkpoint_format": facts.checkpoint_format,
                         "layers": len(facts.layers)},
            "readers": [v.to_dict() for v in verdicts],
        }, indent=2))
    else:
        print(f"{args.model_dir}: {describe_settings(facts)}")
        for v in verdicts:
            print(f"  {v.reader.name} {v.reader.version}: {'loads' if v.loads else 'refuses'}")
            for reason in v.reasons:
                print(f"    - {reason.describe()}")
    refused = [v.reader.key for v in verdicts if v.reader.key in args.require and not v.loads]
    return 1 if refused else 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "check",
        help="which readers (transformers, GPTQModel, AutoGPTQ, vLLM, SGLang, TGI, ExLlamaV2) load a checkpoint",
        description="Say, per reader, whether it will load the GPTQ checkpoint in MODEL_DIR and "
        "why not, from rules read off each reader's code (docs/COMPATIBILITY.md).",
    )
    parser.add_argument("model_dir", help="GPTQ checkpoint folder")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object: settings and, per reader, reader/loads/reasons")
    parser.add_argument("--require", action="append", default=[], metavar="READER",
                        help="exit 1 when this reader refuses the checkpoint (repeatable; e.g. vllm, tgi)")
    parser.set_defaults(func=_run)
