"""Quantizer speed on one device versus several, on a synthetic model of real shapes (issue 18).

Builds a random-weight Llama of ``--shape`` (gptq_core.synthetic; ``llama-3-70b-layers`` by
default) with ``--layers`` decoder layers once, then quantizes a copy of it with the driver on
the first device alone and on all of ``--devices`` (same calibration, same settings), timing
each decoder layer's turn (from its weights arriving on the device to its outputs). Prints the
per-layer seconds, the ratio one/all (the target: >= 1.8 on 2 H200s), the figure extrapolated
to the full depth (``capture + full_layers x mean layer``; say "extrapolated" wherever it is
quoted), and whether every packed tensor is byte-identical between the two runs (it must be:
gptq_core/quantize/parallel.py). ``--shape tiny`` runs in seconds on CPUs::

    python benchmarks/quantize_parallel.py --layers 4 --devices cuda:0,cuda:1
    python benchmarks/quantize_parallel.py --shape tiny --layers 2 --devices cpu,cpu --nsamples 8 --seqlen 64
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptq_core.config import QuantizeConfig  # noqa: E402
from gptq_core.quantize.driver import DEFAULT_BATCH_SIZE, quantize_model, resident_layer  # noqa: E402
from gptq_core.quantize.parallel import DEFAULT_CHUNK_SAMPLES, resolve_devices  # noqa: E402
from gptq_core.synthetic import SHAPES, Shape, llama_config, random_model  # noqa: E402

#: A Llama small enough for CPUs, with Llama-3-70B's proportions (GQA 8:1, MLP 3.5x).
TINY = Shape(256, 896, 2, 8, 1, 512, 2048, 500000.0, 1, 2)
GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


def timed_source(seconds: list[float], devices: list[torch.device]):
    """resident_layer, recording each layer's turn (devices synchronised at its end)."""

    @contextmanager
    def source(index, layer, device):
        start = time.perf_counter()
        with resident_layer(index, layer, device):
            yield
            for d in dict.fromkeys(devices):
                if d.type == "cuda":
                    torch.cuda.synchronize(d)
        if device.type != "cpu" or all(d.type == "cpu" for d in devices):
            seconds.append(time.perf_counter() - start)

    return source


def run(model, samples, config, devices, args) -> tuple[dict, list[float], float]:
    seconds: list[float] = []
    start = time.perf_counter()
    result = quantize_model(model, samples, config, model.model.layers, GROUPS, devices=devices, progress=False,
                            batch_size=args.batch_size, chunk_samples=args.chunk_samples,
                            layer_source=timed_source(seconds, devices))
    return result, seconds, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-70b-layers", help=f"one of {', '.join(SHAPES)} or tiny")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers to build (default 4)")
    parser.add_argument("--devices", required=True, help="comma-separated devices, e.g. cuda:0,cuda:1")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--chunk-samples", type=int, default=DEFAULT_CHUNK_SAMPLES)
    parser.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--float-target", type=float, default=QuantizeConfig().float_target)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    devices = resolve_devices(args.devices, None, torch.device("cpu"))
    shape = TINY if args.shape == "tiny" else SHAPES[args.shape]
    full_layers = shape.layers if args.shape != "llama-3-70b-layers" else 80
    dtype = getattr(torch, args.dtype)
    config = QuantizeConfig(bits=4, group_size=128, float_target=args.float_target)
    built = time.perf_counter()
    original = random_model(llama_config(shape, layers=args.layers, dtype=dtype), torch.device("cpu"), dtype)
    samples = torch.randint(0, shape.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    print(f"built {args.shape} with {args.layers} layers on the CPU in {time.perf_counter() - built:.1f} s", flush=True)

    figures = {}
    results = {}
    for label, devs in (("one", devices[:1]), ("all", devices)):
        model = copy.deepcopy(original)
        result, seconds, wall = run(model, samples, config, devs, args)
        results[label] = result
        mean = sum(seconds[1:]) / max(len(seconds) - 1, 1) if len(seconds) > 1 else seconds[0]
        figures[label] = {"devices": [str(d) for d in devs], "layer_seconds": seconds, "mean_layer_s": mean,
                          "wall_s": wall, "extrapolated_s": wall - sum(seconds) + full_layers * mean}
        print(f"{label:>3} ({', '.join(map(str, devs))}): per layer " + " ".join(f"{s:.2f}" for s in seconds)
              + f" s; mean (after the first) {mean:.2f} s; wall {wall:.1f} s; "
              f"extrapolated to {full_layers} layers {figures[label]['extrapolated_s']:.0f} s", flush=True)
        del model
    differ = [n for n in results["one"] if not all(
        torch.equal(getattr(results["one"][n], t), getattr(results["all"][n], t))
        for t in ("qweight", "qzeros", "scales", "g_idx"))]
    ratio = figures["one"]["mean_layer_s"] / figures["all"]["mean_layer_s"]
    figures.update(ratio=ratio, identical=not differ, differing=differ, shape=args.shape, layers=args.layers,
                   nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
                   chunk_samples=args.chunk_samples, dtype=args.dtype, float_target=args.float_target)
    print(f"speed-up per layer {ratio:.2f}x on {len(devices)} devices; packed tensors "
          + ("byte-identical" if not differ else f"DIFFER in {len(differ)} linears: {differ[:4]}"))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
