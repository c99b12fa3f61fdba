"""Perplexity in non-overlapping windows, checked against a float64 computation by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from gptq_core import GPTQError
from gptq_core.eval import perplexity

DATA = Path(__file__).resolve().parents[1] / "gptq_core" / "data"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def _by_hand(model, ids: torch.Tensor, window: int) -> float:
    count = ids.numel() // window
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in ids[: count * window].view(count, window):
            logp = torch.log_softmax(model(w[None]).logits[0].double(), dim=-1)
            nll -= float(logp[torch.arange(window - 1), w[1:]].sum())
            n += window - 1
    return math.exp(nll / n)


def test_matches_hand_computation_and_drops_partial_window(tiny):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (53,), generator=g)
    expected = _by_hand(tiny, ids, 16)
    for batch_size in (1, 2, 8):
        assert perplexity(tiny, ids, window=16, batch_size=batch_size) == pytest.approx(expected, rel=1e-6)
    assert perplexity(tiny, ids[None], window=16) == pytest.approx(expected, rel=1e-6)
    assert perplexity(tiny, ids.tolist()[:48], window=16) == pytest.approx(expected, rel=1e-6)
    # shorter than one window: the whole stream is the window
    assert perplexity(tiny, ids[:10], window=16) == pytest.approx(_by_hand(tiny, ids[:10], 10), rel=1e-6)


def test_errors(tiny):
    with pytest.raises(GPTQError, match="at least 2 tokens"):
        perplexity(tiny, [3])
    with pytest.raises(GPTQError, match="1-D"):
        perplexity(tiny, torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(GPTQError, match="window"):
        perplexity(tiny, [1, 2, 3], window=1)


def test_stories260k_fp32_perplexity_on_real_text():
    """The shipped data's README: about 8.8 on the whole sample in 512-token windows; the first
    32 windows (kept short for CI) measure 7.88."""
    tok = AutoTokenizer.from_pretrained(DATA / "stories260K")
    model = AutoModelForCausalLM.from_pretrained(DATA / "stories260K")
    text = (DATA / "text" / "tinystories-sample.txt").read_text()
    ids = torch.tensor(tok(text, verbose=False)["input_ids"])[: 32 * 512]
    assert 7.8 < perplexity(model, ids, window=512) < 8.0
