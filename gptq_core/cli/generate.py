"""``gptq generate MODEL_DIR --prompt TEXT``: continue a prompt with a (quantized) model."""

from __future__ import annotations

import argparse
import sys

import torch

from ..errors import GPTQError
from ..numerics import check_finite_logits
from ..options import parse_cli_options
from .main import add_backend_option_argument


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how to run a loaded model; shared by generate and eval."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    parser.add_argument("--backend", default="auto", help="backend name or 'a,b' preference (default auto)")
    parser.add_argument("--dtype", default="auto", help="activation dtype: float16, bfloat16, float32 (default: fp16 on GPU, fp32 on CPU)")
    add_backend_option_argument(parser)


def load_arguments(args: argparse.Namespace) -> dict:
    """``load_for_inference`` keyword arguments of :func:`add_model_arguments`' flags."""
    return {"device": args.device, "backend": args.backend, "torch_dtype": args.dtype,
            "backend_options": parse_cli_options(args.backend_option)}


def generation_kwargs(args: argparse.Namespace) -> dict:
    """transformers ``generate`` arguments for the sampling flags."""
    kwargs: dict = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                    "repetition_penalty": args.repetition_penalty}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return kwargs


def generate_text(model, tokenizer, prompt: str, seed: int = 0, fast: bool = False, **kwargs) -> str:
    """``prompt`` continued by ``model`` (prompt included), decoded.

    ``fast=True`` decodes with gptq-core's static-cache, CUDA-graph path
    (:class:`gptq_core.generation.FastGenerator`; docs/DESIGN.md §11), which falls back to
    transformers' ``generate`` with a message for models it cannot serve.
    """
    if tokenizer is None:
        raise GPTQError("the model folder has no tokenizer files; copy them into it to generate text")
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    # One prompt forward before decoding: NaN weights otherwise decode token 0 silently
    # and print only the prompt (docs/DESIGN.md §10); both decode paths are covered.
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
    check_finite_logits(getattr(out, "logits", out)[:, -1])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if fast:
        from ..generation import FastGenerator

        generator = FastGenerator(model, max_batch=1, log=lambda m: print(f"gptq generate: {m}", file=sys.stderr))
        out = generator.generate(inputs["input_ids"], inputs.get("attention_mask"), pad_token_id=pad,
                                 seed=seed, **kwargs)
    else:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(**inputs, pad_token_id=pad, **kwargs)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _run(args: argparse.Namespace) -> int:
    from ..auto import load_for_inference

    model, tokenizer = load_for_inference(args.model_dir, **load_arguments(args))
    print(generate_text(model, tokenizer, args.prompt, seed=args.seed, fast=args.fast, **generation_kwargs(args)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("generate", help="generate text with a GPTQ checkpoint")
    parser.add_argument("model_dir", help="GPTQ checkpoint folder (a float model folder also works)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (default 50)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="divide the logits of tokens already present by this (default 1.0: off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    parser.add_argument("--fast", action="store_true",
                        help="decode with gptq-core's static-cache path, the whole step in one CUDA "
                             "graph on GPUs (falls back to transformers' generate, saying why)")
    add_model_arguments(parser)
    parser.set_defaults(func=_run)
