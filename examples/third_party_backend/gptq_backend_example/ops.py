"""The example backend's kernel, a ``torch.library`` custom op with a fake implementation.

The fake (meta) implementation tells torch.compile the output's shape and dtype without
running the kernel, so a model using this backend compiles with ``fullgraph=True``.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("gptq_example::grouped_matmul", mutates_args=())
def grouped_matmul(
    x: torch.Tensor,
    q: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    starts: list[int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x @ W`` for W stored as int8 rows grouped contiguously.

    ``q`` [K, N] int8 holds ``qint - 2**(bits-1)`` with rows sorted by group; ``zeros`` and
    ``scales`` [G, N] float32 (zeros shifted the same way); group ``g`` owns rows
    ``starts[g]:starts[g+1]``; ``perm`` (act-order) reorders x's columns to match the rows.
    """
    xs = (x if perm is None else x.index_select(1, perm)).to(torch.float32)
    out = torch.zeros(x.shape[0], q.shape[1], dtype=torch.float32, device=x.device)
    for g in range(len(starts) - 1):
        a, b = starts[g], starts[g + 1]
        if a == b:
            continue
        w = (q[a:b].to(torch.float32) - zeros[g]) * scales[g]  # one group, dequantized
        out.addmm_(xs[:, a:b], w)
    if bias is not None:
        out += bias.to(torch.float32)
    return out.to(x.dtype)


@grouped_matmul.register_fake
def _(x, q, zeros, scales, perm, starts, bias):
    return x.new_empty(x.shape[0], q.shape[1])
