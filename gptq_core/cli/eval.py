"""``gptq eval MODEL_DIR --text FILE``: perplexity in non-overlapping windows."""

from __future__ import annotations

import argparse
import json

from .generate import add_model_arguments, load_arguments


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

    model, tokenizer = load_for_inference(args.model_dir, **load_arguments(args))
    ppl, tokens = text_perplexity(model, tokenizer, args.text, args.window, args.max_tokens)
    if args.json:
        print(json.dumps({"model": args.model_dir, "text": args.text, "window": args.window,
                          "tokens": tokens, "perplexity": ppl}))
    else:
        print(f"perplexity: {ppl:.4f} ({tokens} tokens, windows of {args.window})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="perplexity of a GPTQ checkpoint on a text file")
    parser.add_argument("model_dir", help="GPTQ checkpoint folder (a float model folder also works)")
    parser.add_argument("--text", required=True, help="text file (.txt, .jsonl or .json) to score")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_model_arguments(parser)
    parser.set_defaults(func=_run)
