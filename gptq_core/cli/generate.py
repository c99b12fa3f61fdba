"""``gptq generate MODEL_DIR --prompt TEXT``: continue a prompt with a (quantized) model."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import GPTQError
from ..numerics import check_finite_logits
from ..options import parse_cli_options
from .main import add_backend_option_argument


#: One range rule of a command's flags: (flag, test of its value, what the value must be).
#: A flag whose value is None (not given, no default) is not checked.
Rule = tuple[str, Callable[[Any], bool], str]


def positive(value: float) -> bool:
    """True for a finite number above 0 (NaN and inf are not)."""
    return math.isfinite(value) and value > 0


def check_arguments(args: argparse.Namespace, rules: Sequence[Rule]) -> None:
    """Refuse the first flag whose value breaks its rule, before any model is loaded: a bad
    value otherwise surfaces late as a transformers traceback or silently changes the result."""
    for flag, ok, requirement in rules:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and not ok(value):
            raise GPTQError(f"{flag} {value} is out of range; it must be {requirement}")


#: Device types gptq-core can load a model on (rocm is torch's "cuda").
DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "mps", "xpu", "hpu")


def check_device_argument(device: str | None) -> None:
    """A ``--device`` that torch knows, of a type gptq-core runs on, and present on this machine."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise GPTQError(f"--device {device!r} is not a device gptq-core can run on; use cpu, cuda or cuda:N")
    backend = getattr(torch, dev.type, None)
    if dev.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise GPTQError(f"--device {device!r}: no {dev.type} device is available on this machine; use --device cpu")


def model_max_positions(model_dir: str | Path) -> int | None:
    """The longest sequence the model in ``model_dir`` was built for, from its config.json
    (None when the file is missing, unreadable or does not say: loading reports those)."""
    from ..eval import max_positions

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return max_positions(config) if isinstance(config, dict) else None


#: Range rules of ``gptq generate``'s flags.
GENERATE_RULES: tuple[Rule, ...] = (
    ("--max-new-tokens", lambda v: v >= 1, "at least 1 (the number of tokens to generate)"),
    ("--temperature", positive, "a positive number (1.0: the model's distribution; lower: greedier)"),
    ("--top-k", lambda v: v >= 0, "0 (off) or a positive number of tokens"),
    ("--top-p", lambda v: 0 < v <= 1, "in (0, 1] (1.0: off)"),
    ("--repetition-penalty", positive, "a positive number (1.0: off)"),
)


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """``--revision`` of a hub id, and ``--device-map``/``--max-memory``/``--offload-folder``;
    shared by generate, eval and ``backends explain``."""
    parser.add_argument("--revision", default=None,
                        help="branch, tag or commit of a hub id MODEL (default main); read from the "
                             "huggingface_hub cache, fetched unless HF_HUB_OFFLINE=1")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="place the model across devices instead of --device: auto, balanced, "
                             "sequential, or a JSON object {module: device|'cpu'|'disk'}")
    parser.add_argument("--max-memory", action="append", default=[], metavar="DEVICE=SIZE",
                        help="cap a device for --device-map auto, e.g. 0=20GiB or cpu=64GiB (repeatable)")
    parser.add_argument("--offload-folder", default=None,
                        help="folder for the tensors --device-map puts on 'disk'")


def parse_device_map(text: str | None) -> str | dict | None:
    """``--device-map``: a strategy or device name as given, or a JSON object."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise GPTQError(f"--device-map {text!r} is not valid JSON ({exc}); write e.g. "
                        "'{\"model.layers.0\": \"cpu\", \"\": \"disk\"}' or auto") from None
    return value


def parse_max_memory(items: Sequence[str]) -> dict[int | str, str] | None:
    """``--max-memory 0=20GiB --max-memory cpu=64GiB`` -> ``{0: "20GiB", "cpu": "64GiB"}``."""
    caps: dict[int | str, str] = {}
    for item in items:
        device, sep, size = item.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise GPTQError(f"--max-memory {item!r} must be DEVICE=SIZE, e.g. 0=20GiB or cpu=64GiB")
        key = device.strip()
        caps[int(key) if key.isdigit() else key] = size.strip()
    return caps or None


def placement_arguments(args: argparse.Namespace) -> dict:
    """``load_for_inference``/``load_quantized`` keyword arguments of the placement flags."""
    return {"revision": args.revision, "device_map": parse_device_map(args.device_map),
            "max_memory": parse_max_memory(args.max_memory), "offload_folder": args.offload_folder}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how to run a loaded model; shared by generate and eval."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    parser.add_argument("--backend", default="auto", help="backend name or 'a,b' preference (default auto)")
    parser.add_argument("--dtype", default="auto", help="activation dtype: float16, bfloat16, float32 (default: fp16 on GPU, fp32 on CPU)")
    add_backend_option_argument(parser)
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the checksum check of the checkpoint's weight files (faster on very large models)")
    parser.add_argument("--no-fuse", action="store_true",
                        help="keep q/k/v and gate/up as separate matmuls instead of fusing them at load")
    add_placement_arguments(parser)


def load_arguments(args: argparse.Namespace) -> dict:
    """``load_for_inference`` keyword arguments of :func:`add_model_arguments`' flags."""
    placement = placement_arguments(args)
    placement.pop("revision")  # the commands resolve MODEL first (resolve_model)
    return {"device": args.device, "backend": args.backend, "torch_dtype": args.dtype,
            "backend_options": parse_cli_options(args.backend_option),
            "verify": not args.no_verify, "fuse": not args.no_fuse, **placement}


def resolve_model(args: argparse.Namespace) -> str:
    """``args.model_dir`` as a local folder: a hub id (with ``--revision``) is fetched into, or
    read from, the huggingface_hub cache (``gptq_core.hub``)."""
    from ..hub import resolve_model_dir

    return str(resolve_model_dir(args.model_dir, args.revision))


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

    check_arguments(args, GENERATE_RULES)
    check_device_argument(args.device)
    model, tokenizer = load_for_inference(resolve_model(args), **load_arguments(args))
    print(generate_text(model, tokenizer, args.prompt, seed=args.seed, fast=args.fast, **generation_kwargs(args)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("generate", help="generate text with a GPTQ checkpoint")
    parser.add_argument("model_dir", metavar="MODEL",
                        help="GPTQ checkpoint folder or hub id org/name (a float model also works)")
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
