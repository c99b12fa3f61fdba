"""LoRA fine-tuning of a 4-bit GPTQ model on the CPU: the shipped stories260K, end to end.

    python examples/lora_stories260k.py              # 300 steps, a minute or less on a CPU
    python examples/lora_stories260k.py --steps 30 --backend torch

1. quantizes the real stories260K (llama2.c weights, shipped in ``gptq_core/data``) with
   GPTQ on the shipped TinyStories sample, saves the checkpoint and loads it back with
   ``AutoGPTQForCausalLM.from_quantized``: every linear is a ``QuantLinear``;
2. wraps it with PEFT: ``get_peft_model(model, LoraConfig(...))``, with no registration
   (``import gptq_core`` teaches PEFT about ``QuantLinear``);
3. trains the adapters on windows of the TinyStories text, printing the loss: the 4-bit base
   stays frozen and runs its backend's kernel forward and backward (gptq_core/training.py).

The loss falls: the adapters learn the sample's stories on top of the quantized model.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

import gptq_core
from gptq_core import AutoGPTQForCausalLM, QuantizeConfig
from gptq_core.cli.demo import data_path, split_documents
from gptq_core.threads import single_thread


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names that get adapters")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="GPTQ bits (default 4)")
    p.add_argument("--group-size", type=int, default=32, help="GPTQ group size (default 32)")
    p.add_argument("--backend", default="auto", help="backend serving the quantized layers (default auto)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a GPTQ checkpoint of stories260K to use instead of quantizing one")
    p.add_argument("--log-every", type=int, default=10, help="print the loss every N steps (default 10)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def quantized_checkpoint(out: Path, bits: int, group_size: int, calibration: list[str]) -> Path:
    """stories260K quantized with GPTQ on the calibration documents, saved in ``out``."""
    auto = AutoGPTQForCausalLM.from_pretrained(data_path("stories260K"),
                                               QuantizeConfig(bits=bits, group_size=group_size),
                                               torch_dtype=torch.float32)
    auto.quantize(calibration, nsamples=32, seqlen=256, progress=False)
    auto.save_quantized(out)
    return out


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """Every document's tokens (with BOS) in one long 1-D tensor."""
    ids: list[int] = []
    for doc in documents:
        ids += tokenizer(doc, verbose=False)["input_ids"]  # documents may exceed 512: windows cut them
    return torch.tensor(ids, dtype=torch.long)


def batches(tokens: torch.Tensor, batch: int, seq: int, seed: int):
    """Random windows of ``seq`` tokens, ``batch`` at a time, forever (reproducible)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, tokens.numel() - seq, (batch,), generator=g)
        yield torch.stack([tokens[s:s + seq] for s in starts.tolist()])


def serving(auto: AutoGPTQForCausalLM) -> set[str]:
    """Names of the backends serving the quantized layers now."""
    return {layer.binding.backend.name for layer in auto.quant_linears().values()}


def train(args: argparse.Namespace) -> list[float]:
    """Quantize (or load), wrap with LoRA, train; returns the loss of every step."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    calibration, _ = split_documents(data_path("text", "tinystories-sample.txt"))
    with tempfile.TemporaryDirectory(prefix="lora-stories260k-") as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            t = time.perf_counter()
            ckpt = quantized_checkpoint(Path(tmp) / "stories260K-gptq", args.bits, args.group_size,
                                        calibration)
            print(f"quantized stories260K with GPTQ {args.bits}-bit g{args.group_size} "
                  f"in {time.perf_counter() - t:.1f} s")
        auto = AutoGPTQForCausalLM.from_quantized(ckpt, device="cpu", backend=args.backend,
                                                  torch_dtype=torch.float32)
    model, tok = auto.model, auto.tokenizer
    served = serving(auto)
    print(f"loaded with gptq-core {gptq_core.__version__}: {len(auto.quant_linears())} QuantLinear "
          f"layers served by {', '.join(sorted(served))}")

    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                        target_modules=args.targets.split(","), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    print(f"LoRA r={args.rank} on {args.targets}: {trainable:,} trainable parameters")

    data = batches(token_stream(tok, calibration), args.batch, args.seq, args.seed)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    peft_model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = next(data)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1:
            now = serving(auto)
            if now != served:  # a backend without a backward pass hands its layers over
                print(f"the backward pass needs a backend that has one: layers now served by "
                      f"{', '.join(sorted(now))}")
        if step % args.log_every == 0 or step in (1, args.steps):
            recent = losses[-args.log_every:]
            print(f"step {step:4d}  loss {sum(recent) / len(recent):.4f}")
    elapsed = time.perf_counter() - start
    tokens = args.steps * args.batch * args.seq
    print(f"{args.steps} steps in {elapsed:.1f} s ({tokens / elapsed:,.0f} tokens/s)")
    return losses


def summary(losses: list[float], window: int = 10) -> tuple[float, float]:
    """Mean loss of the first and of the last ``window`` steps."""
    w = max(1, min(window, len(losses) // 2))
    return sum(losses[:w]) / w, sum(losses[-w:]) / w


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with single_thread():  # stories260K's matrices are tiny: one thread is fastest
        losses = train(args)
    first, last = summary(losses)
    print(f"loss: {first:.4f} over the first steps -> {last:.4f} over the last "
          f"(perplexity {math.exp(first):.2f} -> {math.exp(last):.2f})")
    if not last < first:
        print("the loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
