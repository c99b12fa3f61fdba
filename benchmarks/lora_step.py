"""One LoRA training step on a 4-bit model against the same step on the fp16 model.

    python benchmarks/lora_step.py                                  # H200: Llama-2-7B shapes
    python benchmarks/lora_step.py --batch 8 --seq 1024 --cache-mb 0,8192 --json out.json
    python benchmarks/lora_step.py --device cpu --shape tiny --layers 1 --backends torch

A synthetic Llama model of real shapes (gptq_core/synthetic.py: random weights, built on the
device) is timed for ``--steps`` LoRA steps (forward, backward, AdamW step) on random tokens of
``--batch`` x ``--seq``: first in fp16 (PEFT's plain LoRA), then with every decoder linear
quantized (RTN 4-bit g128 sym, the synthetic checkpoints' setting) and served by each of
``--backends`` (the backward pass through the frozen 4-bit weight is gptq_core/training.py's
``dX = dY @ W``; ``--cache-mb`` also times it with a dequantized-weight budget). Prints
tokens/s and peak memory per variant, each against fp16.

Before any timing, the input gradient of a few quantized layers of distinct shapes is checked
on every backend against float64 (``dY @ W`` with W dequantized exactly): a mismatch stops
the run with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from gptq_core.integrations import peft as peft_integration
from gptq_core.models import get_architecture, quantized_linear_names
from gptq_core.models.layers import set_module
from gptq_core.quant_linear import QuantLinear
from gptq_core.synthetic import SHAPES, SYNTHETIC_QUANTIZATION, Shape, llama_config, random_model, rtn_on_device
from gptq_core.testing import TOLERANCES, check_close, reference_error
from gptq_core.training import configure_training

#: A small shape for CPU runs of this script's logic (tests): K and N divide group size 128.
TINY = Shape(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=4, vocab=512,
             max_positions=512, rope_theta=10000.0, bos=1, eos=2)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: Quantized layers whose gradients are checked: one of each distinct shape of a Llama layer.
CHECKED = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")
GIB = 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--shape", default="llama-2-7b", choices=[*SHAPES, "tiny"],
                   help="model shape (default llama-2-7b; tiny for CPU checks)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="activation dtype (auto: fp16 on GPUs, fp32 on the CPU)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--backends", default="triton,marlin",
                   help="comma-separated backends serving the 4-bit model (default triton,marlin)")
    p.add_argument("--cache-mb", default="0",
                   help="comma-separated dequant_cache_mb values to time (default 0: per call)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--no-fp16", action="store_true", help="skip the float baseline")
    p.add_argument("--json", type=Path, default=None, help="write every result to this file")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ memory and time
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated memory since the last reset (None off CUDA: no allocator statistics)."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def lora_config(args: argparse.Namespace):
    from peft import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=args.targets.split(","), task_type="CAUSAL_LM")


def time_steps(model: nn.Module, args: argparse.Namespace, device: torch.device, label: str) -> dict:
    """Wrap ``model`` with fresh adapters, run warm-up and timed steps, unwrap; the result row."""
    from peft import get_peft_model

    torch.manual_seed(args.seed)
    peft_model = get_peft_model(model, lora_config(args))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    batches = [torch.randint(3, vocab, (args.batch, args.seq), generator=gen).to(device)
               for _ in range(2)]
    peft_model.train()
    reset_peak(device)
    losses = []
    elapsed = 0.0
    for step in range(args.warmup + args.steps):
        ids = batches[step % 2]
        sync(device)
        start = time.perf_counter()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            elapsed += time.perf_counter() - start
        losses.append(loss.item())
    peak = peak_gib(device)
    tokens = args.batch * args.seq * args.steps
    row = {"variant": label, "batch": args.batch, "seq": args.seq, "steps": args.steps,
           "step_ms": 1000 * elapsed / args.steps, "tokens_per_s": tokens / elapsed,
           "peak_gib": peak, "trainable": sum(p.numel() for p in params),
           "loss_first": losses[0], "loss_last": losses[-1]}
    del optimizer, params
    peft_model.unload()  # the base model back, adapters removed, for the next variant
    return row


# ------------------------------------------------------------------------------ the 4-bit model
def quantize_in_place(model: nn.Module, dtype: torch.dtype, backend: str) -> list[str]:
    """Every decoder linear becomes a QuantLinear of its RTN 4-bit weight; the float weight
    is freed layer by layer. Returns the names."""
    names = quantized_linear_names(model, get_architecture(model))
    for name in names:
        linear = model.get_submodule(name)
        packed = rtn_on_device(linear.weight.detach())
        if linear.bias is not None:
            packed = packed.replace(bias=linear.bias.detach().to(torch.float16))
        set_module(model, name, QuantLinear.from_packed(packed, backend=backend, act_dtype=dtype,
                                                        mode="training"))
        del linear
    return names


def rebind(model: nn.Module, names: list[str], dtype: torch.dtype, backend: str) -> None:
    for name in names:
        model.get_submodule(name).bind(act_dtype=dtype, backend=backend, mode="training")


def check_gradients(model: nn.Module, names: list[str], backends: list[str], dtype: torch.dtype,
                    rows: int, seed: int) -> list[dict]:
    """Forward and input gradient of one layer per distinct shape, per backend, against
    float64 (the conformance suite's bound and tolerance)."""
    results = []
    first = names[0].rsplit(".", 2)[0] + "."  # the first decoder layer
    layers = [n for n in names if n.startswith(first) and n.endswith(CHECKED)]
    gen = torch.Generator().manual_seed(seed)
    for name in layers:
        packed = model.get_submodule(name).packed()
        device = packed.qweight.device
        w64 = packed.to("cpu").dequantize(torch.float64)  # [K, N], the reference on the CPU
        x = (torch.randn(rows, packed.in_features, generator=gen) * 0.5).to(dtype)
        grad = torch.randn(rows, packed.out_features, generator=gen).to(dtype)
        ref = grad.double() @ w64.t()
        bound = grad.double().abs() @ w64.abs().t() + ref.abs()
        x, grad = x.to(device), grad.to(device)
        for backend in backends:
            layer = QuantLinear.from_packed(packed, backend=backend, act_dtype=dtype, mode="training")
            xg = x.clone().requires_grad_(True)
            y = layer(xg)
            y.backward(grad)
            fwd = reference_error(y.detach(), x, packed)
            check = check_close(xg.grad, ref, bound, dtype, TOLERANCES[dtype])
            ok = check.ok and fwd.ok
            results.append({"layer": name, "backend": backend, "K": packed.in_features,
                            "N": packed.out_features, "ok": ok, "forward": fwd.message,
                            "grad": check.message})
            print(f"{'ok  ' if ok else 'FAIL'} gradient {backend:<7} {name} "
                  f"{packed.in_features}x{packed.out_features}: {check.message}", flush=True)
            del layer
    return results


# ------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace) -> dict:
    peft_integration.register()  # idempotent; ``import gptq_core`` arranges it as well
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
        torch.float16 if device.type == "cuda" else torch.float32)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    caches = [float(c) for c in args.cache_mb.split(",") if c.strip()]
    shape = TINY if args.shape == "tiny" else args.shape
    config = llama_config(shape, args.layers, dtype)
    print(f"model: {args.shape} ({config.num_hidden_layers} layers, hidden {config.hidden_size}), "
          f"{str(dtype).removeprefix('torch.')} on {device}; LoRA r={args.rank} on {args.targets}; "
          f"batch {args.batch} x seq {args.seq}", flush=True)
    model = random_model(config, device, dtype, args.seed)
    model.config.use_cache = False
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "checks": [], "steps": []}

    if not args.no_fp16:
        row = time_steps(model, args, device, f"float {str(dtype).removeprefix('torch.')}")
        out["steps"].append(row)
        report(row, None)

    names = quantize_in_place(model, dtype, backends[0])
    bits, group = SYNTHETIC_QUANTIZATION.bits, SYNTHETIC_QUANTIZATION.group_size
    out["checks"] = check_gradients(model, names, backends, dtype, rows=min(64, args.batch * args.seq),
                                    seed=args.seed)
    if not all(c["ok"] for c in out["checks"]):
        print("gradient check failed: nothing timed", flush=True)
        return out
    base = out["steps"][0] if out["steps"] else None
    for backend in backends:
        rebind(model, names, dtype, backend)
        for cache in caches:
            configure_training(model, {"dequant_cache_mb": cache})
            label = f"{bits}-bit g{group} {backend}" + (f" cache {cache:g} MiB" if cache else "")
            row = time_steps(model, args, device, label)
            row["backend"], row["dequant_cache_mb"] = backend, cache
            out["steps"].append(row)
            report(row, base)
    return out


def report(row: dict, base: dict | None) -> None:
    peak = f"{row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else "n/a"
    line = (f"step {row['variant']:<32} {row['step_ms']:9.1f} ms  {row['tokens_per_s']:10,.0f} tokens/s"
            f"  peak {peak}")
    if base is not None:
        line += f"  ({row['tokens_per_s'] / base['tokens_per_s']:.2f}x fp tokens/s"
        if row["peak_gib"] is not None and base["peak_gib"]:
            line += f", {row['peak_gib'] / base['peak_gib']:.2f}x memory"
        line += ")"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    return 0 if out["checks"] and all(c["ok"] for c in out["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
