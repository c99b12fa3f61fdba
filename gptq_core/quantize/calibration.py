"""Calibration samples for GPTQ: token windows of a fixed length drawn from real text.

Accepted data (one function, :func:`prepare_calibration`, for all of them):

* a path to a plain text file (documents separated by lines reading ``<|endoftext|>``, the
  TinyStories / GPT-2 convention; a file without them is one document), a ``.jsonl`` file
  (one JSON object per line with a text field) or a ``.json`` file holding a list of strings
  or objects;
* a list of strings, or a list of records (dicts) with a text field or ``input_ids`` (and an
  optional ``attention_mask``, as AutoGPTQ's ``quantize(examples)`` takes them);
* token ids: a list of ints, a list of lists / 1-D tensors, or an integer tensor [T] or [n, T];
* a ``datasets.Dataset`` with a text column (or an ``input_ids`` column).

Documents are tokenized and joined into one token stream (the tokenizer's BOS starts each
document; tokenizers without BOS get EOS between documents), so short texts are packed
together. ``nsamples`` windows of ``seqlen`` tokens are then drawn from the stream with a
seeded generator: distinct non-overlapping windows when the stream is long enough, random
(possibly overlapping) ones with a warning otherwise. A stream shorter than one window is a
:class:`~gptq_core.errors.CalibrationError` naming what was found and what is needed.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError

logger = logging.getLogger("gptq_core.quantize")

#: A line reading exactly this separates documents in a plain text file.
DOCUMENT_SEPARATOR = "<|endoftext|>"

#: Token documents: each a 1-D LongTensor.
Docs = list[torch.Tensor]


# ---------------------------------------------------------------------------- reading
def _read_utf8(path: Path, role: str) -> str:
    """The file's text, or one error naming the file when it is binary or not UTF-8."""
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise CalibrationError(
            f"{role} file '{path}' is binary (it holds NUL bytes), not UTF-8 text; give a plain "
            "text, .jsonl or .json file"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(
            f"{role} file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}); convert "
            "it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or give a UTF-8 text file"
        ) from None


def _read_text_file(path: Path, role: str) -> list[str]:
    docs, current = [], []
    for line in io.StringIO(_read_utf8(path, role), newline=None):  # lines as open() gives them
        if line.strip() == DOCUMENT_SEPARATOR:
            docs.append("".join(current))
            current = []
        else:
            current.append(line)
    docs.append("".join(current))
    return docs


def _read_json_file(path: Path, text_field: str, role: str) -> list[Any]:
    text = _read_utf8(path, role)
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(io.StringIO(text, newline=None), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}, line {number}: not valid JSON ({exc})") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise CalibrationError(
            f"{path} holds a JSON {type(data).__name__}; expected a list of strings or of "
            f"objects with a '{text_field}' field (or use a .jsonl file)"
        )
    return data


def _records_to_docs(
    records: Sequence[Any], text_field: str, where: str
) -> tuple[list[str], Docs]:
    """Split records into texts and token documents, naming the first bad one."""
    texts: list[str] = []
    tokens: Docs = []
    for number, rec in enumerate(records, 1):
        if isinstance(rec, str):
            texts.append(rec)
        elif isinstance(rec, dict):
            if text_field in rec:
                texts.append(str(rec[text_field]))
            elif "input_ids" in rec:
                ids = torch.as_tensor(rec["input_ids"]).reshape(-1).long()
                mask = rec.get("attention_mask")
                if mask is not None:
                    ids = ids[torch.as_tensor(mask).reshape(-1).bool()]
                tokens.append(ids)
            else:
                raise CalibrationError(
                    f"{where}, record {number} has no '{text_field}' field (it has "
                    f"{sorted(rec)}); pass text_field= to name the field holding the text"
                )
        elif isinstance(rec, torch.Tensor) or (
            isinstance(rec, Sequence) and all(isinstance(v, int) for v in rec)
        ):
            tokens.append(_as_token_tensor(rec, where))
        else:
            raise CalibrationError(
                f"{where}, item {number} is a {type(rec).__name__}; expected a string, a record "
                "with a text field, or a sequence of token ids"
            )
    return texts, tokens


def _as_token_tensor(ids: Any, where: str) -> torch.Tensor:
    t = torch.as_tensor(ids)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise CalibrationError(f"{where}: token ids must be integers, got {t.dtype}")
    return t.reshape(-1).long()


def _collect(data: Any, text_field: str, role: str) -> tuple[list[str], Docs, str]:
    """(texts, token documents, description of the source) for any accepted data.

    ``role`` names the data in errors ("calibration" or "text"): eval reads text through here too.
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            raise CalibrationError(
                f"{role} file '{data}' is a folder; give a text, .jsonl or .json file inside it"
            )
        if not path.is_file():
            raise CalibrationError(
                f"{role} file '{data}' does not exist (to use text itself, pass a list of strings)"
            )
        if path.suffix in (".jsonl", ".json"):
            records = _read_json_file(path, text_field, role)
            texts, tokens = _records_to_docs(records, text_field, str(path))
            return texts, tokens, str(path)
        return _read_text_file(path, role), [], str(path)
    if isinstance(data, torch.Tensor):
        if data.dim() not in (1, 2):
            raise CalibrationError(f"a token id tensor must be [T] or [n, T], got {tuple(data.shape)}")
        rows = [data] if data.dim() == 1 else list(data)
        return [], [_as_token_tensor(r, "token ids") for r in rows], "token id tensor"
    if hasattr(data, "column_names") and hasattr(data, "__getitem__"):  # datasets.Dataset
        columns = list(data.column_names)
        if text_field in columns:
            return [str(t) for t in data[text_field]], [], "dataset"
        if "input_ids" in columns:
            return [], [_as_token_tensor(r, "dataset input_ids") for r in data["input_ids"]], "dataset"
        raise CalibrationError(
            f"the dataset has no '{text_field}' or 'input_ids' column (it has {columns}); pass "
            "text_field= to name the text column"
        )
    if isinstance(data, Sequence) and data and all(isinstance(v, int) for v in data):
        return [], [_as_token_tensor(data, "token ids")], "token ids"
    if isinstance(data, Iterable) and not isinstance(data, (bytes, dict)):
        texts, tokens = _records_to_docs(list(data), text_field, "calibration data")
        return texts, tokens, "calibration data"
    raise CalibrationError(
        f"calibration data of type {type(data).__name__} is not supported; give a text/JSONL "
        "file path, a list of strings, token ids, or a datasets.Dataset"
    )


# ---------------------------------------------------------------------------- tokens
def _tokenize(texts: list[str], tokenizer: Any) -> Docs:
    texts = [t.strip() for t in texts]
    texts = [t for t in texts if t]
    if not texts:
        return []
    if tokenizer is None:
        raise CalibrationError(
            "calibration data is text but no tokenizer was given; pass the model's tokenizer "
            "(e.g. AutoTokenizer.from_pretrained(model_dir)) or token ids"
        )
    encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    docs = [torch.tensor(ids, dtype=torch.long) for ids in encoded]
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    starts_with_bos = bos is not None and all(len(d) and int(d[0]) == bos for d in docs)
    if not starts_with_bos and eos is not None:
        docs = [torch.cat([d, torch.tensor([eos])]) for d in docs]
    return docs


def token_stream(data: Any, tokenizer: Any = None, text_field: str = "text") -> torch.Tensor:
    """Every document of ``data`` tokenized and joined: one LongTensor [T].

    Accepts everything :func:`prepare_calibration` does; also what perplexity is measured on.
    """
    texts, tokens, _ = _collect(data, text_field, "text")
    docs = tokens + _tokenize(texts, tokenizer)
    if not docs:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(docs)


def prepare_calibration(
    data: Any,
    tokenizer: Any = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    text_field: str = "text",
) -> torch.Tensor:
    """``nsamples`` calibration windows of ``seqlen`` tokens: a LongTensor [nsamples, seqlen].

    The same data, ``nsamples``, ``seqlen`` and ``seed`` always give the same tensor.
    """
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if not isinstance(value, int) or value <= 0:
            raise CalibrationError(f"{name} must be a positive integer, got {value!r}")
    texts, tokens, where = _collect(data, text_field, "calibration")
    docs = tokens + _tokenize(texts, tokenizer)
    stream = torch.cat(docs) if docs else torch.zeros(0, dtype=torch.long)
    total, wanted = stream.numel(), nsamples * seqlen
    if total < seqlen:
        what = "is empty" if total == 0 else f"has only {total} tokens"
        raise CalibrationError(
            f"calibration data ({where}, {len(docs)} document(s)) {what}; one sample needs "
            f"seqlen={seqlen} tokens and {nsamples} x {seqlen} = {wanted} are wanted: give more "
            "text or lower seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    chunks = total // seqlen
    if chunks >= nsamples:
        offset = int(torch.randint(0, total - chunks * seqlen + 1, (1,), generator=gen))
        starts = offset + torch.randperm(chunks, generator=gen)[:nsamples] * seqlen
    else:
        logger.warning(
            "calibration data has %d tokens, fewer than nsamples x seqlen = %d; the %d "
            "windows will overlap (give more text for better calibration)",
            total, wanted, nsamples,
        )
        starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])
