"""GPU correctness of the fast decode path (docs/DESIGN.md §11), what the CPU tests cannot show.

For stories260K (float, and its RTN 4-bit checkpoint) and the synthetic Llama-2-7B-shaped 4-bit
checkpoint, on one CUDA device:

- ``graph``: the decode step really ran compiled and as a captured CUDA graph;
- ``greedy``: fast-path greedy tokens == transformers' eager ``generate`` for 64 tokens, per
  prompt (on a mismatch, the top-1/top-2 logit gap of eager at that token says whether it is an
  fp16 near-tie or a bug);
- ``uncompiled``: the same greedy check with ``compile=False`` (tells compile apart from capture);
- ``rounding``: the greedy check of every prompt with ``eager_rounding=False`` (inductor's own
  rounding; the fast path's default rounds like eager), and the step time of both compiles;
- ``replay``: graph replays == the same step run eagerly (``cuda_graphs=False``), bitwise, for a
  padded batch of 3 (capture must not change the arithmetic);
- ``batch``: each row of that padded batch == the prompt alone;
- ``sampling``: a seed reproduces its draw across calls (and across graph replays), top_k=1 ==
  greedy;
- ``eos``: a row stops at its end-of-sequence token and is padded after it, as eager does.

Prints one line per check and writes every detail to --json. Exit status 1 if a check fails.
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
from gptq_core.generation import FastGenerator
from gptq_core.generation.spread import sync
from gptq_core.synthetic import TOKENIZER_DIR, build_synthetic, write_rtn_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "gptq_core" / "data" / "stories260K"
PROMPTS = ["Once upon a time", "The little dog ran to the park and saw a big", "Lily"]
NEW = 64


def eager(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                              max_new_tokens=NEW, do_sample=False, **kwargs)


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    n = min(a.shape[-1], b.shape[-1])
    diff = (a[..., :n] != b[..., :n]).reshape(-1, n).any(0).nonzero()
    return int(diff[0]) if diff.numel() else (None if a.shape[-1] == b.shape[-1] else n)


def eager_gap(model, ids: torch.Tensor, at: int) -> float:
    """top-1 minus top-2 logit of eager at generated token ``at`` (small: an fp16 near-tie)."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=at + 1,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    top = out.logits[at][0].float().topk(2).values
    return float(top[0] - top[1])


def step_ms(fast: FastGenerator, ids: torch.Tensor, pad: int) -> float:
    """Milliseconds per generated token of a warm fast path (NEW tokens, a second call)."""
    fast.generate(ids, max_new_tokens=NEW, pad_token_id=pad)
    sync(ids.device)
    start = time.perf_counter()
    fast.generate(ids, max_new_tokens=NEW, pad_token_id=pad)
    sync(ids.device)
    return (time.perf_counter() - start) * 1e3 / NEW


def check_rounding(model, tok, fast: FastGenerator, device: str, record) -> None:
    """The default compile (``fast``: rounds like eager) against inductor's own rounding:
    greedy tokens of the latter on every prompt, and both step times; fails when the default
    costs more than 5 %."""
    own = FastGenerator(model, max_batch=3, eager_rounding=False)
    pad = tok.pad_token_id
    firsts = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids.to(device)
        got = own.generate(ids, max_new_tokens=NEW, pad_token_id=pad)
        firsts.append(first_difference(got[:, ids.shape[1]:], eager(model, ids, pad_token_id=pad)[:, ids.shape[1]:]))
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids.to(device)
    ms_own, ms_default = step_ms(own, ids, pad), step_ms(fast, ids, pad)
    record("rounding", ms_default <= 1.05 * ms_own,
           "inductor's own rounding: first differences from eager "
           + ", ".join("none" if f is None else str(f) for f in firsts)
           + f"; step {ms_default:.3f} ms rounding like eager (the default) against {ms_own:.3f} ms")
    del own


def check_model(label: str, folder: Path, device: str, results: list[dict], rounding_only: bool = False) -> None:
    def record(check: str, ok: bool, detail: str) -> None:
        results.append({"model": label, "check": check, "ok": ok, "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {label:<22} {check:<9} {detail}", flush=True)

    model, tok = load_for_inference(folder, device)
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    fast = FastGenerator(model, max_batch=3, log=lambda m: print(f"     {label}: {m}"))
    if rounding_only:
        check_rounding(model, tok, fast, device, record)
    else:
        check_fast_path(model, tok, fast, device, record)
    del fast, model
    torch._dynamo.reset()  # the next model compiles afresh, within dynamo's recompile limit
    torch.cuda.empty_cache()


def check_fast_path(model, tok, fast: FastGenerator, device: str, record) -> None:
    """Every check of the module docstring on one loaded model."""
    pad = tok.pad_token_id
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt").input_ids.to(device)
        start = time.perf_counter()
        got = fast.generate(ids, max_new_tokens=NEW, pad_token_id=pad)
        seconds = time.perf_counter() - start
        if i == 0:
            record("graph", fast.last_path == "cuda-graph compiled", f"path {fast.last_path} ({seconds * 1e3:.0f} ms for {NEW} tokens, capture included)")
        ref = eager(model, ids, pad_token_id=pad)
        at = first_difference(got[:, ids.shape[1]:], ref[:, ids.shape[1]:])
        detail = "64 tokens equal" if at is None else f"first difference at token {at}, eager top-1/top-2 gap {eager_gap(model, ids, at):.4f}"
        record("greedy", at is None, f"prompt {i}: {detail}")

    ids = tok(PROMPTS[0], return_tensors="pt").input_ids.to(device)
    plain = FastGenerator(model, compile=False)
    at = first_difference(plain.generate(ids, max_new_tokens=NEW, pad_token_id=pad)[:, ids.shape[1]:],
                          eager(model, ids, pad_token_id=pad)[:, ids.shape[1]:])
    record("uncompiled", at is None and plain.last_path == "cuda-graph",
           f"path {plain.last_path}: " + ("64 tokens equal" if at is None else f"first difference at token {at}"))
    del plain
    check_rounding(model, tok, fast, device, record)

    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True).to(device)
    graphed = fast.generate(batch.input_ids, batch.attention_mask, max_new_tokens=NEW, pad_token_id=pad)
    plain = FastGenerator(model, max_batch=3, cuda_graphs=False).generate(
        batch.input_ids, batch.attention_mask, max_new_tokens=NEW, pad_token_id=pad)
    at = first_difference(graphed, plain)
    record("replay", at is None, "graph == eager step, batch of 3" if at is None else f"differ at column {at}")
    width = batch.input_ids.shape[1]
    bad = []
    for row, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt").input_ids.to(device)
        alone = fast.generate(ids, max_new_tokens=NEW, pad_token_id=pad)[0, ids.shape[1]:]
        if not torch.equal(alone, graphed[row, width:]):
            bad.append(f"row {row} from token {first_difference(alone, graphed[row, width:])}")
    record("batch", not bad, "rows == alone" if not bad else "; ".join(bad))

    ids = batch.input_ids[:1, -4:]
    knobs = dict(max_new_tokens=NEW, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, pad_token_id=pad)
    a, b = fast.generate(ids, seed=7, **knobs), fast.generate(ids, seed=7, **knobs)
    c = fast.generate(ids, seed=8, **knobs)
    k1 = fast.generate(ids, max_new_tokens=NEW, do_sample=True, top_k=1, seed=3, pad_token_id=pad)
    greedy = fast.generate(ids, max_new_tokens=NEW, pad_token_id=pad)
    ok = torch.equal(a, b) and not torch.equal(a, c) and torch.equal(k1, greedy)
    record("sampling", ok, f"same seed equal {torch.equal(a, b)}, other seed differs {not torch.equal(a, c)}, "
                           f"top_k=1 == greedy {torch.equal(k1, greedy)}")

    eos = int(graphed[0, width + 5])
    ref = eager(model, batch.input_ids, batch.attention_mask, eos_token_id=eos, pad_token_id=pad)
    got = fast.generate(batch.input_ids, batch.attention_mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)
    record("eos", torch.equal(got, ref), f"stop on token {eos}: fast {tuple(got.shape)}, eager {tuple(ref.shape)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work-dir", help="where the synthetic 7B pair is built or reused (default: a temporary folder)")
    parser.add_argument("--json", help="write every check to this file")
    parser.add_argument("--skip-7b", action="store_true", help="only stories260K")
    parser.add_argument("--rounding-only", action="store_true", help="only the eager_rounding check (greedy and cost)")
    args = parser.parse_args()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gptq-gen-check-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        check_model("stories260K float", STORIES, args.device, results, args.rounding_only)
        float_model, tok = load_for_inference(STORIES, args.device)
        quantized = work / "stories260K-gptq-4bit-g128-rtn"
        write_rtn_checkpoint(float_model, tok, quantized, STORIES, overwrite=True)
        del float_model
        check_model("stories260K 4-bit", quantized, args.device, results, args.rounding_only)
        if not args.skip_7b:
            start = time.perf_counter()
            pair = build_synthetic("llama-2-7b", work, device=args.device, overwrite=True, reuse=True)
            print(f"     llama-2-7b pair ready in {time.perf_counter() - start:.1f} s under {work}", flush=True)
            check_model("llama-2-7b 4-bit", pair.quantized_dir, args.device, results, args.rounding_only)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else args.device,
                                               "torch": torch.__version__,
                                               "results": results}, indent=1))
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
