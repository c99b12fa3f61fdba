"""``gptq eval MODEL_DIR --text FILE``: perplexity in non-overlapping windows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import GPTQError
from .generate import (
    Rule,
    add_model_arguments,
    check_arguments,
    check_device_argument,
    load_arguments,
    model_max_positions,
    resolve_model,
)

#: Range rules of ``gptq eval``'s flags (the window's upper bound is the model's, checked apart).
EVAL_RULES: tuple[Rule, ...] = (
    ("--window", lambda v: v >= 2, "at least 2 (each token is predicted from the ones before it)"),
    ("--max-tokens", lambda v: v >= 2, "at least 2 (perplexity needs a token to predict from)"),
)


def check_eval_arguments(args: argparse.Namespace, folder: str | None = None) -> None:
    """Every flag of ``gptq eval`` checked before the model loads (minutes on a large one);
    ``folder`` is the model's local folder when MODEL was a hub id."""
    check_arguments(args, EVAL_RULES)
    check_device_argument(args.device)
    text = Path(args.text)
    if not text.is_file():
        what = "is a folder" if text.is_dir() else "does not exist"
        raise GPTQError(f"--text: the text file '{args.text}' {what}; give a .txt, .jsonl or .json file to score")
    longest = model_max_positions(folder or args.model_dir)
    if longest is not None and args.window > longest:
        raise GPTQError(
            f"--window {args.window} is longer than the model's {longest} positions "
            f"(config.json); use --window {longest} or less"
        )


def text_perplexity(model, tokenizer, text, window: int = 512, max_tokens: int | None = None) -> tuple[float, int]:
    """(perplexity, tokens scored) of ``model`` on ``text`` (a path or a list of documents)."""
    from ..eval import perplexity
    from ..quantize.calibration import token_stream

    ids = token_stream(text, tokenizer)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return perplexity(model, ids, window=window), int(ids.numel())


def _run(args: argparse.Namespace) -> int:
    from ..auto import load_for_inference

    folder = resolve_model(args)
    check_eval_arguments(args, folder)
    model, tokenizer = load_for_inference(folder, **load_arguments(args))
    ppl, tokens = text_perplexity(model, tokenizer, args.text, args.window, args.max_tokens)
    if args.json:
        print(json.dumps({"model": args.model_dir, "text": args.text, "window": args.window,
                          "tokens": tokens, "perplexity": ppl}))
    else:
        print(f"perplexity: {ppl:.4f} ({tokens} tokens, windows of {args.window})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="perplexity of a GPTQ checkpoint on a text file")
    parser.add_argument("model_dir", metavar="MODEL",
                        help="GPTQ checkpoint folder or hub id org/name (a float model also works)")
    parser.add_argument("--text", required=True, help="text file (.txt, .jsonl or .json) to score")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_model_arguments(parser)
    parser.set_defaults(func=_run)
