"""The triton backend's prepared weight: GPTQ's qweight re-laid out once, at pack time.

The kernels compute ``out^T = W^T x^T`` with the dequantized weight as the register operand of
the tensor-core MMA, which holds input channels (k, k+1) of one output column in one 32-bit
register (two fp16). So the layout puts exactly those two values in the two 16-bit halves of
one word, and cuts K into tiles of ``H * S`` channels (H values per 16-bit half, S channels per
sub-tile): word row ``t*S/2 + r`` holds, for ``j = 0..H-1`` and ``h = 0, 1``::

    word(t, r, n) bits [16*h + b*j, 16*h + b*(j+1))  =  q[t*H*S + j*S + 2*r + h, n]

``(word >> b*j) & mask`` then yields both halves of sub-tile j's register at once, and
``| 0x64006400`` turns them into two fp16 ``1024 + q`` ("magic number" dequantization, no
integer-to-float conversions). Each sub-tile covers S contiguous channels, a legal MMA operand.
3-bit weights use tiles of H = 16 sub-tiles: two int32 words of 2-bit values (sub-tiles 0-7
and 8-15, laid out as above) plus one int32 of third bits (bit 16*h + j), all 32-bit loads:
3 bits per value, no padding. (An int16 third-bit plane forced a trip through shared memory
per sub-tile: 6.1 SASS instructions per weight, and 0.7x fp16 on the H100.) S divides the
group size, so every sub-tile lies inside one group.

Act-order: ``g_idx`` is sorted once (stable) and the weight rows permuted to match, so groups
are contiguous; the kernels gather the activation columns through ``perm`` at run time.
K is zero-padded to a whole number of tiles and N to a multiple of 16 (aligned 16-byte loads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gptq_core.errors import NotSupportedError
from gptq_core.format import PackedWeight, default_g_idx
from gptq_core.policy import DispatchPolicy

from .options import TritonOptions
from .scratch import Scratch

#: Version of the packed layout per bit width. Bump a width's number whenever its layout changes:
#: tuned entries record the version they were measured on, and entries of another version are
#: ignored (their tiles may not even fit any more). 3-bit is 2 since its third bits moved from
#: an int16 plane to an int32 plane.
LAYOUT_VERSIONS = {2: 1, 3: 2, 4: 1, 8: 1}

#: Input channels per sub-tile, largest first: S must divide the group size.
SUB_TILES = (32, 16)
#: N is padded to a multiple of this (16-byte aligned rows of int32 words).
N_ALIGN = 16


def low_bits(bits: int) -> int:
    """Bits per value in the main plane (3-bit: the low 2 bits; the third has a plane of its own)."""
    return 2 if bits == 3 else bits


def sub_tiles_per_tile(bits: int) -> int:
    """H: sub-tiles per planar tile: the values one 16-bit half of a word holds (2/4/8-bit);
    16 for 3-bit, whose tile is two 2-bit words plus one word of third bits."""
    return 16 if bits == 3 else 16 // bits


def tile_k(bits: int, sub: int) -> int:
    """Input channels per planar tile: H * S."""
    return sub_tiles_per_tile(bits) * sub


def sub_tile(group_size: int) -> int:
    """The sub-tile height S for a group size (-1: one group, any S works)."""
    for s in SUB_TILES:
        if group_size == -1 or group_size % s == 0:
            return s
    raise NotSupportedError(
        f"group size {group_size} is not a multiple of {SUB_TILES[-1]}: the triton kernels "
        f"tile K in blocks of {SUB_TILES[-1]} inside one group; the torch backend serves it",
        [f"group size {group_size} is not a multiple of {SUB_TILES[-1]}"],
    )


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _wrap(x: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """int64 holding unsigned ``bits``-bit patterns -> signed ``dtype`` with the same bits."""
    half = 1 << (bits - 1)
    return ((x ^ half) - half).to(dtype)


@dataclass(frozen=True, eq=False)
class TritonPrepared:
    """One layer in the planar layout (see module docstring), on its device, and what its calls
    need, decided when it was prepared (``dispatch.prepare``).

    ``zeros`` is None when every zero point is ``2**(bits-1)`` (symmetric): the kernels then
    use the constant. ``perm`` is None without act-order; else ``perm[i]`` is the original
    input channel of sorted position ``i`` (padded with 0 past K).

    ``policy`` says which path serves which M (``gptq backends explain`` shows it); ``scratch``
    is the split-K workspace (None: no split-K); ``configs`` holds the configuration per
    (M bucket, dtype) and ``plans`` the worked-out launch per (M, dtype, bias given), both
    filled at the first call that needs them and plain dictionary lookups after that.
    """

    qweight: torch.Tensor
    qhigh: torch.Tensor | None  # 3-bit: the third bits, int32 [K_pad / 32, N_pad]
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    bits: int
    group_size: int
    sub: int
    in_features: int
    out_features: int
    k_pad: int
    n_pad: int
    options: TritonOptions = TritonOptions()
    policy: DispatchPolicy | None = None
    scratch: Scratch | None = None
    gpu: str = "interpreter"
    sms: int = 4
    configs: dict[tuple[int, torch.dtype], Any] = field(default_factory=dict, repr=False)
    plans: dict[tuple[int, torch.dtype, bool], Any] = field(default_factory=dict, repr=False)

    @property
    def tiles(self) -> int:
        """Number of planar K tiles."""
        return self.k_pad // tile_k(self.bits, self.sub)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        """Bytes a full pass over the prepared weight reads (for bandwidth figures)."""
        parts = (self.qweight, self.qhigh, self.scales, self.zeros, self.perm)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def sort_act_order(weight: PackedWeight) -> torch.Tensor | None:
    """The stable sort of ``g_idx`` that makes groups contiguous, or None if already in order.

    Raises NotSupportedError when the sorted ``g_idx`` is not ``k // group_size`` (a group of
    the wrong size), which no tiled kernel can serve without a per-channel scale gather.
    """
    K, gs = weight.in_features, weight.group_size
    g_idx = weight.g_idx.to(torch.int64)
    expected = default_g_idx(K, gs, device=g_idx.device).to(torch.int64)
    if torch.equal(g_idx, expected):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], expected):
        raise NotSupportedError(
            "g_idx does not put exactly group_size input channels in each group, so sorting it "
            "cannot make the groups contiguous tiles; the torch backend serves this layer",
            ["g_idx groups are not all of size group_size (irregular act-order)"],
        )
    return perm


def planar_pack(q: torch.Tensor, bits: int, sub: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integers q [K_pad, N_pad] (K_pad a multiple of H*sub) -> (int32 plane, 3-bit high plane).

    2/4/8-bit: one word row per channel pair and tile. 3-bit: two word rows of 2-bit values
    (sub-tiles 0-7, then 8-15) per pair and tile, and a high plane of one int32 per pair and
    tile whose bit ``16*h + j`` is bit 2 of value (j, h): 3 bits per value, all int32.
    """
    H, lb = sub_tiles_per_tile(bits), low_bits(bits)
    k_pad, n_pad = q.shape
    tiles = k_pad // (H * sub)
    # k = t*H*S + j*S + 2*r + h  <->  index [t, j, r, h, n]
    v = q.to(torch.int64).view(tiles, H, sub // 2, 2, n_pad)
    per_word = 16 // lb  # sub-tiles one word holds
    words = torch.zeros(tiles, H // per_word, sub // 2, n_pad, dtype=torch.int64, device=q.device)
    for j in range(H):
        for h in range(2):
            words[:, j // per_word] |= (v[:, j, :, h] & ((1 << lb) - 1)) << (
                16 * h + lb * (j % per_word))
    low32 = _wrap(words, 32, torch.int32).view(-1, n_pad)
    if bits != 3:
        return low32, None
    high = torch.zeros(tiles, sub // 2, n_pad, dtype=torch.int64, device=q.device)
    for j in range(H):
        for h in range(2):
            high |= ((v[:, j, :, h] >> 2) & 1) << (16 * h + j)
    return low32, _wrap(high, 32, torch.int32).view(-1, n_pad)


def prepare(weight: PackedWeight, device: torch.device) -> TritonPrepared:
    """Re-lay ``weight`` out for the kernels, on ``device``. Never modifies ``weight``. (The
    layout alone: ``dispatch.prepare`` adds the policy and the workspace a layer needs.)"""
    w = weight.to(device)
    bits, gs = w.bits, w.group_size
    K, N = w.in_features, w.out_features
    sub = sub_tile(gs)
    k_pad = _ceil_to(K, tile_k(bits, sub))
    n_pad = _ceil_to(N, N_ALIGN)
    perm = sort_act_order(w)

    q = w.unpack_qweight()
    if perm is not None:
        q = q[perm]
    qp = torch.zeros(k_pad, n_pad, dtype=torch.uint8, device=device)
    qp[:K, :N] = q
    low, high = planar_pack(qp, bits, sub)

    g_pad = 1 if gs == -1 else k_pad // gs + (k_pad % gs > 0)
    G = w.num_groups
    scales = torch.zeros(g_pad, n_pad, dtype=torch.float16, device=device)
    scales[:G, :N] = w.scales
    z = w.zeros()
    zeros = None
    if not bool((z == 2 ** (bits - 1)).all()):
        zeros = torch.zeros(g_pad, n_pad, dtype=torch.int16, device=device)
        zeros[:G, :N] = z.to(torch.int16)
    perm_t = None
    if perm is not None:
        perm_t = torch.zeros(k_pad, dtype=torch.int32, device=device)
        perm_t[:K] = perm.to(torch.int32)
    return TritonPrepared(
        qweight=low.contiguous(),
        qhigh=None if high is None else high.contiguous(),
        scales=scales,
        zeros=zeros,
        perm=perm_t,
        bits=bits,
        group_size=gs,
        sub=sub,
        in_features=K,
        out_features=N,
        k_pad=k_pad,
        n_pad=n_pad,
    )


def unplanar(prepared: TritonPrepared) -> torch.Tensor:
    """Inverse of the packing, for tests: integers [K_pad, N_pad] in sorted (prepared) order."""
    p = prepared
    H, lb = sub_tiles_per_tile(p.bits), low_bits(p.bits)
    per_word = 16 // lb
    words = p.qweight.to(torch.int64).view(p.tiles, H // per_word, 1, p.sub // 2, 1, p.n_pad)
    words = words & 0xFFFFFFFF
    jj = torch.arange(per_word, device=words.device).view(1, 1, per_word, 1, 1, 1)
    h = torch.arange(2, device=words.device).view(1, 1, 1, 1, 2, 1)
    q = ((words >> (16 * h + lb * jj)) & ((1 << lb) - 1)).reshape(p.tiles, H, p.sub // 2, 2, p.n_pad)
    if p.qhigh is not None:
        hi = p.qhigh.to(torch.int64).view(p.tiles, 1, p.sub // 2, 1, p.n_pad) & 0xFFFFFFFF
        j = torch.arange(H, device=hi.device).view(1, H, 1, 1, 1)
        h2 = torch.arange(2, device=hi.device).view(1, 1, 1, 2, 1)
        q = q | (((hi >> (16 * h2 + j)) & 1) << 2)
    return q.reshape(p.k_pad, p.n_pad)
