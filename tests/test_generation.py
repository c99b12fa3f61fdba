"""The fast decode path (gptq_core.generation) against transformers' own ``generate`` on the real
stories260K model, float and as a 4-bit checkpoint: greedy tokens, padded batches, sampling,
repetition penalty, end-of-sequence handling, and the fallback for attention it cannot serve.

On the CPU the decode step runs eagerly: the same code the CUDA graph captures on a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gptq_core import GPTQError, QuantizeConfig, quantize_rtn
from gptq_core.checkpoint import load_quantized, save_quantized
from gptq_core.generation import FastGenerator, fast_generate, left_padded
from gptq_core.generation.sampling import apply_repetition_penalty, filter_top_k_top_p, gumbel_argmax
from gptq_core.quant_linear import QuantLinear

STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"
PROMPTS = ["Once upon a time", "The little dog ran to the park and saw a big", "Lily"]
NEW = 64


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(STORIES)
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def float_model():
    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def quantized_model(tmp_path_factory, float_model):
    """stories260K with every decoder linear 4-bit g32 RTN, saved and loaded back."""
    config = QuantizeConfig(bits=4, group_size=32)
    names = [n for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    packed = {n: quantize_rtn(float_model.get_submodule(n).weight, 4, 32) for n in names}
    folder = tmp_path_factory.mktemp("gen") / "stories-w4g32"
    save_quantized(float_model, packed, config, folder)
    model = load_quantized(folder, "cpu")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 35
    return model


@pytest.fixture(params=["float", "quantized"])
def model(request):
    return request.getfixturevalue(f"{request.param}_model")


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


def hf_greedy(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              do_sample=False, **kwargs)


# ---------------------------------------------------------------------------- greedy
def test_greedy_tokens_equal_transformers_eager(model, tokenizer):
    fast = FastGenerator(model)
    for prompt in PROMPTS:
        ids = ids_of(tokenizer, prompt)
        expected = hf_greedy(model, ids)
        got = fast.generate(ids, max_new_tokens=NEW)
        assert fast.last_path == "eager" and fast.fallback_reason is None
        assert got.shape == expected.shape == (1, ids.shape[1] + NEW)
        assert torch.equal(got, expected), prompt


def test_quantized_model_is_not_the_float_model(float_model, quantized_model, tokenizer):
    """The quantized cases above test something of their own: 4-bit logits differ."""
    ids = ids_of(tokenizer, PROMPTS[0])
    with torch.no_grad():
        assert not torch.allclose(float_model(ids).logits, quantized_model(ids).logits, atol=1e-3)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_rows_equal_each_prompt_alone(model, tokenizer, side):
    tokenizer.padding_side = side
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert len(set(batch.attention_mask.sum(1).tolist())) == 3  # three different lengths
    fast = FastGenerator(model, max_batch=3)
    out = fast.generate(batch.input_ids, batch.attention_mask, max_new_tokens=NEW)
    width = batch.input_ids.shape[1]
    assert out.shape == (3, width + NEW) and torch.equal(out[:, :width], batch.input_ids)
    for row, prompt in enumerate(PROMPTS):
        ids = ids_of(tokenizer, prompt)
        assert torch.equal(out[row, width:], hf_greedy(model, ids)[0, ids.shape[1]:]), prompt


def test_a_generator_serves_several_batch_sizes_and_lengths(float_model, tokenizer):
    fast = FastGenerator(float_model, max_batch=3)
    ids = ids_of(tokenizer, PROMPTS[1])
    short = fast.generate(ids, max_new_tokens=8)
    long = fast.generate(ids, max_new_tokens=NEW)  # longer than the first cache: a new session
    again = fast.generate(ids.repeat(2, 1), max_new_tokens=8)
    assert torch.equal(long[:, : short.shape[1]], short)
    assert torch.equal(again, short.repeat(2, 1))


# ---------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_per_seed(float_model, tokenizer):
    fast = FastGenerator(float_model, max_batch=2)
    ids = ids_of(tokenizer, PROMPTS[0]).repeat(2, 1)
    knobs = dict(max_new_tokens=32, do_sample=True, temperature=0.9, top_k=40, top_p=0.9)
    a = fast.generate(ids, seed=5, **knobs)
    assert torch.equal(a, fast.generate(ids, seed=5, **knobs))
    assert not torch.equal(a, fast.generate(ids, seed=6, **knobs))
    assert not torch.equal(a[0], a[1])  # rows draw their own noise


def test_top_k_one_is_greedy(model, tokenizer):
    fast = FastGenerator(model)
    ids = ids_of(tokenizer, PROMPTS[0])
    greedy = fast.generate(ids, max_new_tokens=32)
    for seed in (0, 1):
        assert torch.equal(fast.generate(ids, max_new_tokens=32, do_sample=True, top_k=1, seed=seed), greedy)


def test_filter_matches_transformers_warpers():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :10] = logits[0, 10]  # ties at the k-th value are kept, as transformers keeps them
    for k, p in ((5, 1.0), (300, 0.8), (20, 0.5), (1, 0.3), (50, 0.95)):
        expected = logits.clone()
        if k < 300:
            expected = TopKLogitsWarper(top_k=k)(None, expected)
        if p < 1.0:
            expected = TopPLogitsWarper(top_p=p)(None, expected)
        got = filter_top_k_top_p(logits, torch.tensor([k]) if k < 300 else None,
                                 torch.tensor(p) if p < 1.0 else None)
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), (k, p)
        assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])


def test_repetition_penalty_rule_matches_transformers():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[3, 7, 7, 20], [0, 49, 5, 5]])
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty=1.7)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, torch.tensor(1.7)), expected)


def test_gumbel_draws_follow_the_softmax():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits = probs.log().expand(40000, 4).contiguous()
    draws = gumbel_argmax(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, probs, atol=0.01), freq


def test_repetition_penalty_matches_transformers_greedy(model, tokenizer):
    fast = FastGenerator(model)
    ids = ids_of(tokenizer, PROMPTS[0])
    penalised = fast.generate(ids, max_new_tokens=NEW, repetition_penalty=1.3)
    assert torch.equal(penalised, hf_greedy(model, ids, repetition_penalty=1.3))
    assert not torch.equal(penalised, fast.generate(ids, max_new_tokens=NEW))


# ---------------------------------------------------------------------------- end of sequence
def test_rows_stop_at_eos_like_transformers(float_model, tokenizer):
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    free = FastGenerator(float_model, max_batch=3).generate(batch.input_ids, batch.attention_mask, max_new_tokens=NEW)
    width = batch.input_ids.shape[1]
    eos = int(free[0, width + 5])  # row 0 stops at its 6th token; the others at theirs, if ever
    with torch.no_grad():
        expected = float_model.generate(**batch, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                                        pad_token_id=0)
    fast = FastGenerator(float_model, max_batch=3, eos_check_every=4)
    got = fast.generate(batch.input_ids, batch.attention_mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    assert (got[0, width + 6:] == 0).all()
    alone = fast.generate(ids_of(tokenizer, PROMPTS[0]), max_new_tokens=NEW, eos_token_id=eos)
    assert alone.shape[1] == ids_of(tokenizer, PROMPTS[0]).shape[1] + 6 and int(alone[0, -1]) == eos
    ignored = fast.generate(ids_of(tokenizer, PROMPTS[0]), max_new_tokens=NEW, eos_token_id=eos, ignore_eos=True)
    assert ignored.shape[1] == alone.shape[1] - 6 + NEW


# ---------------------------------------------------------------------------- fallback and errors
def test_sliding_window_attention_falls_back_to_transformers_with_the_reason():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    model = MistralForCausalLM(config).eval()
    said: list[str] = []
    fast = FastGenerator(model, log=said.append)
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    out = fast.generate(ids, max_new_tokens=8)
    assert fast.last_path == "transformers"
    assert len(said) == 1 and "sliding-window" in said[0] and "transformers' generate" in said[0]
    with torch.no_grad():
        assert torch.equal(out, model.generate(ids, max_new_tokens=8, do_sample=False))


def test_bad_requests_are_named(float_model, tokenizer):
    fast = FastGenerator(float_model, max_batch=1, max_len=16)
    ids = ids_of(tokenizer, PROMPTS[0])
    with pytest.raises(GPTQError, match="max_batch=1"):
        fast.generate(ids.repeat(2, 1))
    with pytest.raises(GPTQError, match="max_len is 16"):
        fast.generate(ids, max_new_tokens=20)
    with pytest.raises(GPTQError, match="all zeros"):
        fast.generate(ids, torch.zeros_like(ids))
    with pytest.raises(GPTQError, match="temperature"):
        fast.generate(ids, do_sample=True, temperature=0.0)


def test_left_padded_moves_pads_left_and_drops_empty_columns():
    ids = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    packed, real = left_padded(ids, mask)
    assert torch.equal(packed, torch.tensor([[0, 5, 6], [7, 8, 9]]))
    assert torch.equal(real, torch.tensor([[False, True, True], [True, True, True]]))


def test_fast_generate_keeps_one_generator_per_model(float_model, tokenizer):
    ids = ids_of(tokenizer, PROMPTS[0])
    first = fast_generate(float_model, ids, max_new_tokens=4)
    kept = float_model._gptq_fast_generator
    assert torch.equal(fast_generate(float_model, ids, max_new_tokens=4), first)
    assert float_model._gptq_fast_generator is kept


def test_step_breakdown_parts_add_up(quantized_model, tokenizer):
    parts = FastGenerator(quantized_model).step_breakdown(ids_of(tokenizer, PROMPTS[0]))
    assert parts["linears_ms"] > 0 and parts["attention_ms"] > 0
    assert math.isclose(parts["linears_ms"] + parts["attention_ms"] + parts["other_ms"], parts["step_ms"],
                        rel_tol=1e-6)


def test_replayed_step_kernels_sorted_by_the_eager_step_names():
    """A replayed step's kernels count where the eager step launched them (linears first, a
    cuBLAS kernel seen in both counts once), the rest is other, and wall time beyond the
    kernels is gaps; the parts add up to the wall time."""
    from gptq_core.generation.profile import describe, sort_kernels

    names = {"linears": {"gemm_a", "cublas_x"}, "attention": {"fmha", "cublas_x"}}
    kernels = {"gemm_a": 10.0, "cublas_x": 5.0, "fmha": 3.0, "triton_fused": 2.0}
    parts = sort_kernels(kernels, names, wall_us=25.0, launches=4)
    assert parts == pytest.approx({"linears_ms": 0.015, "attention_ms": 0.003, "other_ms": 0.002,
                                   "gaps_ms": 0.005, "step_ms": 0.025, "kernels": 4})
    assert "gaps 0.005 ms (20%)" in describe(parts) and "(4 kernels)" in describe(parts)
    # a wall time below the kernels' sum (profiler skew) never gives negative gaps
    short = sort_kernels(kernels, names, wall_us=10.0, launches=4)
    assert short["gaps_ms"] == 0 and short["step_ms"] == pytest.approx(0.020)


def test_decode_forward_traces_as_one_graph_without_recompiles(quantized_model, tokenizer):
    """What torch.compile sees of the decode step on a GPU: one graph, no breaks, and no guard
    that fails from one step to the next (dynamo's own backend: tracing only, no codegen)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fast = FastGenerator(quantized_model, max_batch=2, compile="eager")
    ids = ids_of(tokenizer, PROMPTS[0])
    out = fast.generate(ids, max_new_tokens=16)
    assert fast.last_path == "eager compiled"
    assert torch.equal(out, hf_greedy(quantized_model, ids)[:, : ids.shape[1] + 16])
    fast.generate(ids, max_new_tokens=16, do_sample=True, top_k=5, seed=1)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch._dynamo.reset()


def test_eager_rounding_is_an_inductor_setting(quantized_model):
    with pytest.raises(GPTQError, match="eager_rounding is an inductor setting; compile='eager' names another backend"):
        FastGenerator(quantized_model, compile="eager", eager_rounding=True)
    assert FastGenerator(quantized_model, compile=True, eager_rounding=True)._compiled is not None
    assert FastGenerator(quantized_model, compile="eager")._compiled is not None  # the default follows the backend


def test_cli_generate_fast_prints_the_same_story(capsys):
    from gptq_core.cli import main

    args = ["generate", str(STORIES), "--prompt", PROMPTS[0], "--max-new-tokens", "24", "--device", "cpu"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--fast"]) == 0
    assert capsys.readouterr().out == plain and plain.startswith(PROMPTS[0]) and len(plain) > len(PROMPTS[0]) + 40


def test_a_prefill_only_call_keeps_the_path_of_the_last_decode(model, tokenizer):
    """The bench times a one-token call after the full ones; that call runs no decode step, so
    it must not relabel how the decode steps ran."""
    fast = FastGenerator(model)
    ids = ids_of(tokenizer, PROMPTS[0])
    fast.generate(ids, max_new_tokens=4)
    fast.cuda_graphs = False  # any change of path would show
    fast.last_path = "marker"
    fast.generate(ids, max_new_tokens=1)
    assert fast.last_path == "marker"
    fast.generate(ids, max_new_tokens=2)
    assert fast.last_path == "eager"
