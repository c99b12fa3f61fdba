"""GPTQ checkpoints on disk: the format of docs/DESIGN.md §2, written atomically, read strictly.

* :func:`save_quantized` ``(model, packed, config, out_dir, tokenizer=None, max_shard_size="4GB")``
* :func:`load_quantized` ``(model_dir, device="cpu", backend="auto", torch_dtype="auto")``
* :func:`read_quantize_config` ``(model_dir)``
"""

from __future__ import annotations

from .configs import read_quantize_config
from .files import atomic_directory
from .load import load_quantized
from .save import save_quantized

__all__ = ["atomic_directory", "load_quantized", "read_quantize_config", "save_quantized"]
