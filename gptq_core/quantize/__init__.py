"""GPTQ quantization: the per-linear algorithm, calibration data and the layer-by-layer driver.

Public interface (other modules and helpers code against these names):

* :func:`gptq.quantize_linear` ``(weight | nn.Linear, hessian | GPTQ | None, config, bias=None,
  *, inputs=None, device=None) -> (PackedWeight, LinearStats)``: one linear, from its Hessian
  or its sample inputs; round-to-nearest fallback (with ``stats.warning``) when it has neither.
* :class:`gptq.GPTQ`: Hessian accumulator of one linear (``add_batch(inputs)``, ``.H``,
  ``.nsamples``, ``.quantize(weight, config)``).
* :func:`calibration.prepare_calibration` ``(data, tokenizer=None, nsamples=128, seqlen=2048,
  seed=0) -> LongTensor [nsamples, seqlen]`` from a text/JSONL path, strings, token ids or a
  ``datasets.Dataset``; :func:`calibration.token_stream` turns the same inputs into one
  token stream (for perplexity).
* :func:`driver.quantize_model` ``(model, samples, config, layers, groups, device=None,
  work_dir=None, progress=True) -> dict[name, PackedWeight]``: sequential GPTQ of every
  listed linear of every decoder layer, resumable from ``work_dir``.
* :func:`gptq_core.eval.perplexity` ``(model, token_ids, window=512) -> float``.
"""

from __future__ import annotations

from ..eval import perplexity
from .calibration import prepare_calibration, token_stream
from .driver import QuantizeResult, quantize_model
from .gptq import GPTQ, LinearStats, quantize_linear

__all__ = [
    "GPTQ",
    "LinearStats",
    "QuantizeResult",
    "perplexity",
    "prepare_calibration",
    "quantize_linear",
    "quantize_model",
    "token_stream",
]
