"""``gptq demo``: the whole story on the real stories260K model, in well under a minute on a CPU.

Splits the shipped TinyStories sample into calibration and held-out documents, quantizes
stories260K with GPTQ, saves and reloads the checkpoint, shows which backend serves each
layer, compares held-out perplexity of fp32, round-to-nearest and GPTQ, and tells a story.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import torch
from torch import nn

from .generate import generate_text
from .quantize import add_quantize_arguments, quantize_config_from_args

#: Share of the sample's documents used for calibration; the rest is held out for perplexity.
CALIBRATION_SHARE = 0.8
PROMPT = "Once upon a time"


def data_path(*parts: str) -> Path:
    """A file shipped in ``gptq_core/data``."""
    return Path(str(files("gptq_core").joinpath("data", *parts)))


def split_documents(text_file: Path, share: float = CALIBRATION_SHARE) -> tuple[list[str], list[str]]:
    """(calibration, held-out) documents: the first ``share`` of the file, then the rest."""
    from ..quantize.calibration import DOCUMENT_SEPARATOR

    docs = [d.strip() for d in text_file.read_text(encoding="utf-8").split(DOCUMENT_SEPARATOR)]
    docs = [d + "\n" for d in docs if d]
    cut = int(len(docs) * share)
    return docs[:cut], docs[cut:]


def rtn_model(model: nn.Module, names: list[str], config) -> nn.Module:
    """A copy of ``model`` whose ``names`` are round-to-nearest quantized (the baseline)."""
    from ..models.layers import set_module
    from ..quant_linear import QuantLinear
    from ..rtn import quantize_rtn

    rtn = copy.deepcopy(model)
    for name in names:
        lin = rtn.get_submodule(name)
        packed = quantize_rtn(lin.weight, config.bits, config.group_size, config.sym, bias=lin.bias,
                              zero_format=config.zero_format)
        set_module(rtn, name, QuantLinear.from_packed(packed, act_dtype=None))
    return rtn


def _run(args: argparse.Namespace) -> int:
    from ..threads import single_thread

    # stories260K's matrices are 64 x 172: threads cost more than they give, and on a busy
    # machine OpenMP threads spin against each other (measured: 10x slower with 2 threads)
    with single_thread():
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    from ..auto import AutoGPTQForCausalLM
    from ..models import get_architecture, quantized_linear_names
    from .eval import text_perplexity
    from .explain import layer_choices

    start = time.perf_counter()
    model_dir = data_path("stories260K")
    calibration, held_out = split_documents(data_path("text", "tinystories-sample.txt"))
    config = quantize_config_from_args(args)
    print(f"model: stories260K (real llama2.c weights) from {model_dir}")
    print(f"text: TinyStories sample, {len(calibration)} documents for calibration, {len(held_out)} held out")

    auto = AutoGPTQForCausalLM.from_pretrained(model_dir, config, torch_dtype=torch.float32)
    tok = auto.tokenizer
    fp32_ppl, tokens = text_perplexity(auto.model, tok, held_out, args.window)
    names = quantized_linear_names(auto.model, get_architecture(auto.model))
    rtn_ppl, _ = text_perplexity(rtn_model(auto.model, names, config), tok, held_out, args.window)

    label = f"{config.bits}-bit g{config.group_size}{' act-order' if config.desc_act else ''}"
    print(f"quantizing {len(names)} linears with GPTQ {label} on {args.nsamples} x {args.seqlen} tokens ...")
    auto.quantize(calibration, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                  device=args.device, progress=False)
    with tempfile.TemporaryDirectory(prefix="gptq-demo-") as tmp:
        out = Path(args.output) if args.output else Path(tmp) / "stories260K-gptq"
        auto.save_quantized(out, overwrite=args.overwrite)
        print(f"saved GPTQ checkpoint: {out}")
        loaded = AutoGPTQForCausalLM.from_quantized(out, device=args.device or "cpu", torch_dtype=torch.float32)
    rows = layer_choices(loaded.model)
    served: dict[str, int] = {}
    for r in rows:
        served[r["backend"]] = served.get(r["backend"], 0) + 1
    print("backends serving the layers: " + ", ".join(f"{b} x{n}" for b, n in served.items()))
    for r in rows:
        print(f"  {r['layer']:<34} {r['backend']:<8} {r['spec']}")
    gptq_ppl, _ = text_perplexity(loaded.model, tok, held_out, args.window)

    print(f"\nheld-out perplexity ({tokens} tokens, windows of {args.window}):")
    for name, ppl in (("fp32", fp32_ppl), (f"round-to-nearest {label}", rtn_ppl), (f"GPTQ {label}", gptq_ppl)):
        print(f"  {name:<28} {ppl:8.3f}  ({(ppl / fp32_ppl - 1) * 100:+.1f}% vs fp32)")
    story = generate_text(loaded.model, tok, PROMPT, seed=args.seed, max_new_tokens=args.max_new_tokens,
                          do_sample=True, temperature=0.8, top_k=40)
    print(f"\nstory from the GPTQ model:\n{story}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="quantize the shipped stories260K model and compare perplexities")
    parser.add_argument("--output", default=None, help="keep the checkpoint in this folder (default: a temporary one)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--window", type=int, default=512, help="perplexity window in tokens (default 512)")
    parser.add_argument("--max-new-tokens", type=int, default=120, help="length of the story (default 120)")
    add_quantize_arguments(parser)
    parser.set_defaults(group_size=32, seqlen=256, device="cpu", format="gptq", func=_run)
