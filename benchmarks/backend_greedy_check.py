"""Greedy tokens of one checkpoint served by different GPU backends (issue 14's end-to-end check).

For stories260K (its RTN 4-bit g128 checkpoint, a real trained model) and the synthetic
Llama-2-7B-shaped 4-bit checkpoint (random weights), on one CUDA device: load the checkpoint
once per backend (``--backends``, the first is the reference), run transformers' eager greedy
``generate`` for ``--new-tokens`` tokens on each prompt, and compare the tokens with the
reference backend's. On a difference it prints the reference's top-1/top-2 logit gap at that
token: two kernels that both meet the float64 tolerance round fp16 differently, so a gap of a
few fp16 steps (random weights have many) is a near-tie, not a fault (NOTES/perf-h200.md,
"Greedy tokens").

    python benchmarks/backend_greedy_check.py --backends marlin,cuda,exllama [--work-dir DIR] [--skip-7b]

Exit status 1 when a backend's tokens differ at a token whose reference gap is larger than
``--tie`` (default 0.05 logits), or a backend fails to load or serve a layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptq_core.auto import load_for_inference
from gptq_core.synthetic import build_synthetic, write_rtn_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "gptq_core" / "data" / "stories260K"
PROMPTS = ["Once upon a time", "The little dog ran to the park and saw a big", "Lily"]


def greedy(model, ids: torch.Tensor, new: int, pad: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             do_sample=False, pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].cpu(), [t[0].float().cpu() for t in out.logits]


def bound_backends(model) -> dict[str, int]:
    from gptq_core.quant_linear import QuantLinear

    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m._binding is None:  # the parts of a fused projection: the fused layer serves them
                continue
            name = m._binding.backend.name
            counts[name] = counts.get(name, 0) + 1
    return counts


def check(label: str, folder: Path, backends: list[str], device: str, new: int, tie: float,
          results: list[dict]) -> None:
    reference: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for backend in backends:
        start = time.perf_counter()
        try:
            model, tok = load_for_inference(folder, device, backend=backend)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot load is a result
            results.append({"model": label, "backend": backend, "ok": False, "detail": f"load failed: {exc}"})
            print(f"FAIL {label:<20} {backend:<8} load failed: {exc}", flush=True)
            continue
        if tok is None:
            from transformers import AutoTokenizer

            from gptq_core.synthetic import TOKENIZER_DIR

            tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        loaded = time.perf_counter() - start
        for i, prompt in enumerate(PROMPTS):
            ids = tok(prompt, return_tensors="pt").input_ids.to(device)
            tokens, logits = greedy(model, ids, new, pad)
            if backend == backends[0]:
                reference[i] = (tokens, logits)
                continue
            ref_tokens, ref_logits = reference[i]
            n = min(len(tokens), len(ref_tokens))
            diff = (tokens[:n] != ref_tokens[:n]).nonzero()
            at = int(diff[0]) if diff.numel() else None
            if at is None:
                ok, detail = True, f"prompt {i}: {n} tokens equal"
            else:
                top = ref_logits[at].topk(2).values
                gap = float(top[0] - top[1])
                ok = gap <= tie
                detail = (f"prompt {i}: first difference at token {at}, {backends[0]}'s top-1/top-2 gap "
                          f"{gap:.4f} ({'near-tie' if ok else 'NOT a near-tie'})")
            results.append({"model": label, "backend": backend, "ok": ok, "detail": detail})
            print(f"{'ok  ' if ok else 'FAIL'} {label:<20} {backend:<8} {detail}", flush=True)
        print(f"     {label} on {backend}: loaded in {loaded:.1f} s, layers {bound_backends(model)}", flush=True)
        del model
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="auto,cuda,exllama", help="the first one is the reference (auto: the selector's choice per layer)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--tie", type=float, default=0.05, help="largest reference logit gap called a near-tie")
    parser.add_argument("--work-dir", help="where the synthetic 7B pair is built or reused")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gptq-backend-greedy-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        float_model, tok = load_for_inference(STORIES, args.device)
        stories = work / "stories260K-gptq-4bit-g128-rtn"
        write_rtn_checkpoint(float_model, tok, stories, STORIES, overwrite=True)
        del float_model
        check("stories260K 4-bit", stories, backends, args.device, args.new_tokens, args.tie, results)
        if not args.skip_7b:
            pair = build_synthetic("llama-2-7b", work, device=args.device, reuse=True)
            check("llama-2-7b 4-bit", pair.quantized_dir, backends, args.device, args.new_tokens, args.tie, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"backends": backends, "results": results}, indent=1))
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
