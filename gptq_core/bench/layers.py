"""Random GPTQ layers made directly on the benchmark device (a 70B layer in well under a second).

Values span the whole integer range, scales and zeros vary per group and column, and
act-order gives a shuffled ``g_idx``; never zeros, which would time and check nothing real.
"""

from __future__ import annotations

import torch

from ..format import PackedWeight, default_g_idx, num_groups, pack_weight


def random_layer(k: int, n: int, bits: int, group_size: int, *, sym: bool, act_order: bool,
                 device: torch.device, seed: int) -> PackedWeight:
    """One random layer [K, N] in the GPTQ v1 format, on ``device``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    maxq = 2**bits - 1
    groups = num_groups(k, group_size)
    q = torch.randint(0, maxq + 1, (n, k), generator=g, device=device, dtype=torch.int32)
    # Scales keep x @ W of order one for x ~ N(0, 1): |q - z| ~ 2**bits / 4, K terms.
    scale = 4.0 / (2**bits * k**0.5)
    scales = (torch.rand(groups, n, generator=g, device=device) + 0.5) * scale
    if sym:
        zeros = torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32, device=device)
    else:
        zeros = torch.randint(1, maxq + 1, (groups, n), generator=g, device=device, dtype=torch.int32)
    g_idx = default_g_idx(k, group_size, device=device)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g, device=device)]
    return pack_weight(q, scales, zeros, bits=bits, group_size=group_size, g_idx=g_idx,
                       sym=sym, desc_act=act_order)


def format_bytes(w: PackedWeight) -> int:
    """Bytes of the layer in the GPTQ format (qweight, qzeros, scales, and g_idx if act-order)."""
    parts = [w.qweight, w.qzeros, w.scales] + ([w.g_idx] if w.desc_act else [])
    return sum(t.numel() * t.element_size() for t in parts)
