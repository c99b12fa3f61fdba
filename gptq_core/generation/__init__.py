"""The project's own decode path (docs/DESIGN.md §11) and ``gptq bench generate``'s measurements.

:class:`FastGenerator` decodes a loaded transformers causal LM with a static KV cache and the
whole decode step (sampling included) captured in one CUDA graph; :func:`fast_generate` is the
one-call form.
"""

from __future__ import annotations

from .fast import FastGenerator, left_padded
from .sampling import Sampling
from .support import unsupported_reason

__all__ = ["FastGenerator", "Sampling", "fast_generate", "left_padded", "unsupported_reason"]


def fast_generate(model, input_ids, attention_mask=None, **kwargs):
    """``model.generate``-like call through a :class:`FastGenerator` kept on the model, so
    repeated calls reuse its static cache and captured graphs."""
    fast = getattr(model, "_gptq_fast_generator", None)
    rows = input_ids.shape[0]
    if fast is None or fast.max_batch < rows:
        fast = FastGenerator(model, max_batch=rows)
        model._gptq_fast_generator = fast
    return fast.generate(input_ids, attention_mask, **kwargs)
