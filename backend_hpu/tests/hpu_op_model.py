"""A pure-torch model of ``torch.ops.hpu.convert_from_uint4``'s documented semantics (CPU only).

It is a model, not the device: tests that use it check this package's layout and the math
around the op, never Gaudi itself (README, "never run on hardware"). Written from the op's
schema and meta function in habana_frameworks (output = input shape with the last dimension
times 8; groups are equal runs of K / G rows) and the packing that AutoGPTQ's and
vllm-hpu-extension's Gaudi paths feed it (value j of a word at bits [4j, 4j+4)). The nibbles
are decoded here by shifts of its own, independently of gptq_core.packing.
"""

from __future__ import annotations

import torch


def unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> int64 [R, 8C]: value j of each word is bits [4j, 4j+4), unsigned."""
    w = words.to(torch.int64) & 0xFFFFFFFF  # the word's 32 bits as an unsigned number
    shifts = torch.arange(8, dtype=torch.int64) * 4
    return ((w.unsqueeze(-1) >> shifts) & 0xF).reshape(words.shape[0], -1)


def convert_from_uint4(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """``(q - z) * scale`` per equal run of K / G rows, computed in float64, cast to ``out_dtype``."""
    q = unpack_nibbles(qweight)
    K, G = q.shape[0], scale.shape[0]
    assert K % G == 0, "the op's groups are equal runs of rows"
    rows = torch.arange(K) // (K // G)
    z = unpack_nibbles(zero_point)
    assert z.shape == scale.shape, (z.shape, scale.shape)
    w = (q - z[rows]).to(torch.float64) * scale.to(torch.float64)[rows]
    return w.to(out_dtype)


def convert_from_uint4_exact(qweight, scale, zero_point, out_dtype) -> torch.Tensor:
    """The model kept in float64 (no rounding to ``out_dtype``): for exact layout checks."""
    return convert_from_uint4(qweight, scale, zero_point, torch.float64)
