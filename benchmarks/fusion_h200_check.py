"""GPU check of fused projections (gptq_core.fusion): fused == unfused, CUDA-graph capture, speed.

A one-layer Llama-3-8B-shaped model (q 4096, k/v 1024, gate/up 14336 wide) with random
weights, quantized by RTN to 4-bit g128 twice (plain, and act-order with one g_idx per fusion
group, as GPTQ gives layers that read one input), is saved and loaded with and without fusion
on each backend. Per backend and checkpoint it prints: the logits' relative difference, and
the time of the five projections q, k, v, gate, up of one layer (eager, and replayed from a
CUDA graph captured with fresh inputs afterwards) at M = 1, 16, 256. Details go to
``fusion_check.json`` in ``--out`` (default: $OUT, else ./fusion_check_out).

    python benchmarks/fusion_h200_check.py [--backends marlin,triton] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gptq_core import QuantizeConfig, quantize_rtn
from gptq_core.checkpoint import load_quantized, save_quantized
from gptq_core.format import default_g_idx
from gptq_core.fusion import FusedSlice

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ALL = PROJ[:3] + ("self_attn.o_proj",) + PROJ[3:] + ("mlp.down_proj",)
MS = (1, 16, 256)


def write_checkpoints(base: Path) -> dict[str, Path]:
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    plain = {f"model.layers.0.{lin}": quantize_rtn(model.get_submodule(f"model.layers.0.{lin}").weight, 4, 128, True)
             for lin in ALL}
    act_order = {}
    for name, pw in plain.items():  # one permutation per input (attention, mlp, down)
        lin = name.removeprefix("model.layers.0.")
        seed = {"self_attn.o_proj": 2, "mlp.down_proj": 3}.get(lin, int(lin.startswith("mlp.")))
        perm = torch.randperm(pw.in_features, generator=torch.Generator().manual_seed(seed))
        act_order[name] = pw.replace(g_idx=default_g_idx(pw.in_features, 128)[perm].contiguous(), desc_act=True)
    return {
        "g128": save_quantized(model, plain, QuantizeConfig(bits=4, group_size=128), base / "g128"),
        "g128-act-order": save_quantized(model, act_order, QuantizeConfig(bits=4, group_size=128, desc_act=True),
                                         base / "g128-act-order"),
    }


def median_us(fn, iters: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def projections(model):
    mods = [model.get_submodule(f"model.layers.0.{p}") for p in PROJ]
    return lambda x: [m(x) for m in mods]


def graph_of(run, M: int):
    """Capture ``run`` on a static input; check a replay with fresh data against eager."""
    x = torch.randn(M, 4096, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run(x)  # warm-up outside the capture (lazy work, autotuning)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    want = run(x.clone())
    err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(outs, want))
    return graph, x, err


def check(backend: str, kind: str, folder: Path, rows: list[dict]) -> None:
    ids = torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(1)).cuda()
    models = {}
    for fuse in (False, True):
        t0 = time.perf_counter()
        models[fuse] = load_quantized(folder, device="cuda:0", backend=backend, torch_dtype=torch.float16, fuse=fuse)
        load_s = time.perf_counter() - t0
        fused = sum(isinstance(m, FusedSlice) for m in models[fuse].modules())
        rows.append({"backend": backend, "kind": kind, "fuse": fuse, "load_s": load_s, "fused_layers": fused})
    with torch.no_grad():
        a, b = (models[f](ids).logits.float() for f in (True, False))
    logit_err = float((a - b).abs().max() / b.abs().max())
    q = models[True].get_submodule("model.layers.0.self_attn.q_proj")
    print(f"{backend:7s} {kind:15s} fused layers {rows[-1]['fused_layers']}  logits rel diff {logit_err:.2e}  "
          f"{getattr(q, 'fusion', '-')}  served by {q.binding.backend.name}")
    for M in MS:
        rec = {"backend": backend, "kind": kind, "M": M, "logit_rel_diff": logit_err}
        with torch.no_grad():
            for fuse in (False, True):
                run = projections(models[fuse])
                x = torch.randn(M, 4096, device="cuda", dtype=torch.float16)
                rec[f"eager_us_{fuse}"] = median_us(lambda: run(x))
                graph, _, err = graph_of(run, M)
                rec[f"graph_us_{fuse}"] = median_us(graph.replay)
                rec[f"graph_rel_err_{fuse}"] = err
        rows.append(rec)
        print(f"  M={M:4d}  eager {rec['eager_us_False']:8.1f} -> {rec['eager_us_True']:8.1f} us "
              f"({rec['eager_us_False'] / rec['eager_us_True']:.2f}x)   graph {rec['graph_us_False']:8.1f} -> "
              f"{rec['graph_us_True']:8.1f} us ({rec['graph_us_False'] / rec['graph_us_True']:.2f}x)   "
              f"graph replay rel err {rec['graph_rel_err_False']:.1e}/{rec['graph_rel_err_True']:.1e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="marlin,triton")
    parser.add_argument("--out", default=os.environ.get("OUT") or "fusion_check_out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_checkpoints(Path(tmp))
        print("q k v gate up of one layer (K=4096; N 4096+1024+1024, 14336+14336), 4-bit g128, fp16:")
        print("times: unfused -> fused")
        for backend in args.backends.split(","):
            for kind, folder in folders.items():
                try:
                    check(backend, kind, folder, rows)
                except Exception as exc:  # noqa: BLE001 - report and go on with the next case
                    print(f"{backend:7s} {kind:15s} FAILED: {type(exc).__name__}: {exc}")
                    rows.append({"backend": backend, "kind": kind, "error": f"{type(exc).__name__}: {exc}"})
    (out / "fusion_check.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
