"""Calibration samples from every accepted kind of data, with the real stories260K tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from gptq_core import CalibrationError
from gptq_core.quantize import prepare_calibration, token_stream

DATA = Path(__file__).resolve().parents[1] / "gptq_core" / "data"
TEXT = DATA / "text" / "tinystories-sample.txt"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DATA / "stories260K")


def _windows_in(stream: torch.Tensor, samples: torch.Tensor) -> bool:
    """Every sample is a contiguous window of the stream."""
    s = stream.tolist()
    text = ",".join(map(str, s))
    return all(",".join(map(str, row.tolist())) in text for row in samples)


def test_text_file_gives_seeded_distinct_windows(tok):
    a = prepare_calibration(TEXT, tok, nsamples=16, seqlen=64, seed=0)
    b = prepare_calibration(str(TEXT), tok, nsamples=16, seqlen=64, seed=0)
    c = prepare_calibration(TEXT, tok, nsamples=16, seqlen=64, seed=1)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 16
    stream = token_stream(TEXT, tok)
    assert _windows_in(stream, a)
    # documents are split at <|endoftext|> lines and each starts with BOS, never the marker text
    text = TEXT.read_text()
    assert int((stream == tok.bos_token_id).sum()) == text.count("<|endoftext|>\n") + (
        0 if text.rstrip().endswith("<|endoftext|>") else 1
    )
    assert "<|endoftext|>" not in tok.decode(stream[:2000])


def test_short_texts_are_packed_together(tok):
    texts = ["Once upon a time, there was a cat.", "The dog ran fast.", "Lily smiled."] * 20
    samples = prepare_calibration(texts, tok, nsamples=4, seqlen=48, seed=3)
    assert samples.shape == (4, 48)
    bos_per_window = (samples == tok.bos_token_id).sum(dim=1)
    assert bool((bos_per_window >= 2).all())  # several documents in one window
    assert _windows_in(token_stream(texts, tok), samples)


def test_jsonl_json_records_and_token_ids_agree(tok, tmp_path):
    texts = [TEXT.read_text()[i * 900 : (i + 1) * 900] for i in range(6)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    js = tmp_path / "c.json"
    js.write_text(json.dumps(texts))
    from_list = prepare_calibration(texts, tok, nsamples=5, seqlen=100, seed=2)
    assert torch.equal(prepare_calibration(jsonl, tok, nsamples=5, seqlen=100, seed=2), from_list)
    assert torch.equal(prepare_calibration(js, tok, nsamples=5, seqlen=100, seed=2), from_list)
    records = [{"text": t} for t in texts]
    assert torch.equal(prepare_calibration(records, tok, nsamples=5, seqlen=100, seed=2), from_list)
    stream = token_stream(texts, tok)
    assert torch.equal(prepare_calibration(stream, None, nsamples=5, seqlen=100, seed=2), from_list)
    assert torch.equal(prepare_calibration(stream.tolist(), None, nsamples=5, seqlen=100, seed=2), from_list)


def test_token_id_inputs_and_masks():
    rows = torch.arange(3 * 40).reshape(3, 40)
    samples = prepare_calibration(rows, nsamples=3, seqlen=40, seed=0)
    assert sorted(tuple(r.tolist()) for r in samples) == sorted(tuple(r.tolist()) for r in rows)
    recs = [{"input_ids": [[5, 6, 7, 8]], "attention_mask": [[1, 1, 0, 0]]}, {"input_ids": [9, 10]}]
    assert token_stream(recs).tolist() == [5, 6, 9, 10]
    assert token_stream([torch.tensor([1, 2]), [3, 4]]).tolist() == [1, 2, 3, 4]


def test_overlapping_windows_when_data_is_scarce(tok, caplog):
    stream = torch.arange(100)
    with caplog.at_level("WARNING", logger="gptq_core.quantize"):
        samples = prepare_calibration(stream, nsamples=8, seqlen=30, seed=0)
    assert samples.shape == (8, 30) and "overlap" in caplog.text
    assert bool((samples[:, 1:] - samples[:, :-1] == 1).all())


def test_clear_errors(tok, tmp_path):
    with pytest.raises(CalibrationError, match="is empty"):
        prepare_calibration([], tok, nsamples=4, seqlen=16)
    with pytest.raises(CalibrationError, match=r"only \d+ tokens.*seqlen=512.*4 x 512 = 2048"):
        prepare_calibration(["A short story."], tok, nsamples=4, seqlen=512)
    with pytest.raises(CalibrationError, match="does not exist"):
        prepare_calibration(tmp_path / "missing.txt", tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(CalibrationError, match="no 'text' field.*content"):
        prepare_calibration(bad, tok)
    with pytest.raises(CalibrationError, match="no tokenizer"):
        prepare_calibration(["some text"], None)
    with pytest.raises(CalibrationError, match="not supported"):
        prepare_calibration(3.5, tok)
    with pytest.raises(CalibrationError, match="nsamples"):
        prepare_calibration(TEXT, tok, nsamples=0)
    with pytest.raises(CalibrationError, match="integers"):
        prepare_calibration(torch.rand(3, 10), nsamples=1, seqlen=5)


def test_datasets_dataset(tok):
    datasets = pytest.importorskip("datasets")
    texts = [TEXT.read_text()[i * 700 : (i + 1) * 700] for i in range(5)]
    ds = datasets.Dataset.from_dict({"text": texts})
    assert torch.equal(
        prepare_calibration(ds, tok, nsamples=3, seqlen=64, seed=4),
        prepare_calibration(texts, tok, nsamples=3, seqlen=64, seed=4),
    )
