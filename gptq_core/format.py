"""The packed weight format: one frozen dataclass per linear layer, byte-compatible with GPTQ.

For K = in_features, N = out_features, G = ceil(K / group_size) (1 when group_size == -1):

=========  =====  =======================  ==============================================
tensor     dtype  shape                    meaning
=========  =====  =======================  ==============================================
qweight    int32  [ceil(K*bits/32), N]     quantized ints, packed along K
qzeros     int32  [G, ceil(N*bits/32)]     zero points, packed along N (v1: zero - 1)
scales     fp16   [G, N]                   per-group scales
g_idx      int32  [K]                      group of each input channel
bias       fp16   [N]                      optional
=========  =====  =======================  ==============================================

``W[n, k] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = g_idx[k]``. ``zero_format``
records whether ``qzeros`` holds ``zero - 1`` ("v1", AutoGPTQ / optimum / vLLM) or the zero
itself ("v2", GPTQModel). Conversion is explicit (:meth:`PackedWeight.to_format`), never guessed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import FormatError, NotSupportedError
from .packing import check_bits, pack_cols, pack_rows, packed_length, unpack_cols, unpack_rows

ZeroFormat = Literal["v1", "v2"]
ZERO_FORMATS: tuple[str, ...] = ("v1", "v2")


def num_groups(in_features: int, group_size: int) -> int:
    """G = ceil(K / group_size), or 1 for a single group (group_size == -1)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def check_group_size(group_size: int) -> None:
    """Raise a clear error for a group size that is neither -1 nor positive."""
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise FormatError(
            f"group_size={group_size!r} is invalid; use -1 (one group per column) "
            "or a positive number of input channels such as 32, 64 or 128"
        )


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """The g_idx of a layer quantized without act-order: ``k // group_size``."""
    k = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(k) if group_size == -1 else k // group_size


def act_order_permutation(g_idx: torch.Tensor, in_features: int, group_size: int,
                          who: str = "this kernel") -> torch.Tensor | None:
    """The stable sort of ``g_idx`` when it differs from ``k // group_size``, else None.

    Kernels that walk contiguous groups sort ``g_idx`` once at load, permute the weight rows to
    match and the activation columns at run time (docs/DESIGN.md §2). Raises NotSupportedError,
    naming ``who``, when the sorted groups are not equal runs of ``group_size`` channels (GPTQ's
    act-order always produces those).
    """
    expected = default_g_idx(in_features, group_size, device=g_idx.device).long()
    g = g_idx.long()
    if torch.equal(g, expected):
        return None
    order = torch.argsort(g, stable=True)
    if not torch.equal(g[order], expected):
        counts = torch.bincount(g).tolist()
        raise NotSupportedError(
            f"{who} needs each group of g_idx to hold exactly group_size={group_size} input "
            f"channels (as GPTQ's act-order produces); this g_idx has group sizes "
            f"{counts[:8]}{'...' if len(counts) > 8 else ''}; use another backend (the torch "
            "backend serves it)",
            ["g_idx groups are not of equal size group_size"],
        )
    return order


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """One quantized linear layer in the GPTQ checkpoint format (see module docstring).

    Instances are validated on construction, values included (g_idx range, finite scales:
    one pass, never per call); backends receive them and must not mutate them.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    out_features: int
    sym: bool = True
    desc_act: bool = False
    zero_format: ZeroFormat = "v1"
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.validate()
        self.check_values()

    # ------------------------------------------------------------------ shape contract
    @property
    def num_groups(self) -> int:
        return num_groups(self.in_features, self.group_size)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def expected_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype every tensor must have for this layer's declared config."""
        K, N, b, G = self.in_features, self.out_features, self.bits, self.num_groups
        shapes = {
            "qweight": ((packed_length(K, b), N), torch.int32),
            "qzeros": ((G, packed_length(N, b)), torch.int32),
            "scales": ((G, N), torch.float16),
            "g_idx": ((K,), torch.int32),
        }
        if self.bias is not None:
            shapes["bias"] = ((N,), torch.float16)
        return shapes

    def validate(self) -> None:
        """Check config and every tensor's dtype, shape and device; raise FormatError naming it."""
        check_bits(self.bits)
        check_group_size(self.group_size)
        if self.zero_format not in ZERO_FORMATS:
            raise FormatError(
                f"zero_format={self.zero_format!r} is unknown; use 'v1' (gptq) or 'v2' (gptq_v2)"
            )
        for name, value in (("in_features", self.in_features), ("out_features", self.out_features)):
            if not isinstance(value, int) or value <= 0:
                raise FormatError(f"{name} must be a positive integer, got {value!r}")
        for name, (shape, dtype) in self.expected_shapes().items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise FormatError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise FormatError(
                    f"{name} has shape {tuple(t.shape)} but bits={self.bits}, "
                    f"group_size={self.group_size}, K={self.in_features}, "
                    f"N={self.out_features} require {shape}"
                )
            if t.dtype != dtype:
                raise FormatError(f"{name} has dtype {t.dtype}, the GPTQ format requires {dtype}")
            if t.device != self.qweight.device:
                raise FormatError(
                    f"{name} is on {t.device} but qweight is on {self.qweight.device}; "
                    "move the whole PackedWeight with .to(device)"
                )

    def check_values(self) -> None:
        """Value checks (g_idx range, finite scales and bias): one pass at construction.

        A g_idx outside [0, G) indexes past the scales and NaN scales poison every output;
        neither is visible in shapes, so both are checked here once, never per forward.
        """
        if self.qweight.device.type == "meta":
            return  # a layer not loaded yet holds no values
        G = self.num_groups
        layer = f"layer K={self.in_features}, N={self.out_features}, group_size={self.group_size}"
        lo, hi = (int(v) for v in torch.aminmax(self.g_idx))
        if lo < 0 or hi >= G:
            raise FormatError(
                f"g_idx values must lie in [0, {G - 1}], found [{lo}, {hi}] ({layer}, {G} "
                "groups); g_idx[k] is the group of input channel k: use k // group_size, or "
                "the act-order permutation the quantizer wrote"
            )
        if not bool(torch.isfinite(self.scales).all()):
            raise FormatError(
                f"scales contain NaN or Inf ({layer}); the quantized weight is corrupt: "
                "quantize the layer again"
            )
        if self.bias is not None and not bool(torch.isfinite(self.bias).all()):
            raise FormatError(
                f"bias contains NaN or Inf ({layer}); the checkpoint is corrupt"
            )

    # ------------------------------------------------------------------ conversions
    def replace(self, **changes) -> PackedWeight:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> PackedWeight:
        """The same layer with every tensor on ``device``."""
        move = {f: getattr(self, f).to(device) for f in ("qweight", "qzeros", "scales", "g_idx")}
        if self.bias is not None:
            move["bias"] = self.bias.to(device)
        return self.replace(**move)

    def unpack_qweight(self) -> torch.Tensor:
        """Quantized ints as uint8 [K, N]."""
        return unpack_rows(self.qweight, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """The real zero points as int32 [G, N], whatever ``zero_format`` stores."""
        stored = unpack_cols(self.qzeros, self.bits, self.out_features).to(torch.int32)
        if self.zero_format == "v1":
            # The ecosystem's kernels read ((stored) & mask) + 1; a zero of 0 written as v1
            # therefore reads back as 2**bits. We read exactly what those kernels read.
            return stored + 1
        return stored

    def to_format(self, zero_format: ZeroFormat) -> PackedWeight:
        """Convert the zero-point convention explicitly (v1 <-> v2)."""
        if zero_format not in ZERO_FORMATS:
            raise FormatError(f"zero_format={zero_format!r} is unknown; use 'v1' or 'v2'")
        if zero_format == self.zero_format:
            return self
        z = self.zeros()
        return self.replace(qzeros=encode_zeros(z, self.bits, zero_format), zero_format=zero_format)

    def dequantize(
        self, dtype: torch.dtype = torch.float32, k_slice: slice | None = None
    ) -> torch.Tensor:
        """The dequantized weight, transposed: [K, N] (rows ``k_slice`` of it when given).

        The [K, N] orientation is that of ``qweight``; ``x @ w`` computes the layer.
        """
        q = self.unpack_qweight()
        g = self.g_idx.long()
        if k_slice is not None:
            q, g = q[k_slice], g[k_slice]
        z = self.zeros().to(dtype)
        s = self.scales.to(dtype)
        return (q.to(dtype) - z[g]) * s[g]


def encode_zeros(zeros: torch.Tensor, bits: int, zero_format: ZeroFormat) -> torch.Tensor:
    """Real zero points int [G, N] -> packed ``qzeros`` in the given convention."""
    maxq = 2**bits - 1
    z = zeros.to(torch.int64)
    if zero_format == "v1":
        if bool((z < 1).any()) or bool((z > maxq + 1).any()):
            raise FormatError(
                f"a zero point outside [1, {maxq + 1}] cannot be stored in GPTQ v1 (it stores "
                "zero - 1); save with checkpoint_format='gptq_v2', or quantize for v1, "
                "which keeps asymmetric zeros >= 1"
            )
        return pack_cols((z - 1) & maxq, bits)
    if bool((z < 0).any()) or bool((z > maxq).any()):
        raise FormatError(f"a zero point outside [0, {maxq}] cannot be stored in {bits} bits")
    return pack_cols(z, bits)


def pack_weight(
    intweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    sym: bool = True,
    desc_act: bool = False,
    bias: torch.Tensor | None = None,
    zero_format: ZeroFormat = "v1",
) -> PackedWeight:
    """Build a :class:`PackedWeight` from quantized ints.

    ``intweight`` is [N, K] (the orientation of ``nn.Linear.weight``) with values in
    [0, 2**bits); ``scales`` and ``zeros`` are [G, N]; ``g_idx`` defaults to ``k // group_size``.
    """
    check_bits(bits)
    check_group_size(group_size)
    if intweight.dim() != 2:
        raise FormatError(f"intweight must be [N, K], got shape {tuple(intweight.shape)}")
    N, K = intweight.shape
    if g_idx is None:
        g_idx = default_g_idx(K, group_size, device=intweight.device)
    qweight = pack_rows(intweight.t(), bits)
    return PackedWeight(
        qweight=qweight,
        qzeros=encode_zeros(zeros, bits, zero_format),
        scales=scales.to(torch.float16).contiguous(),
        g_idx=g_idx.to(torch.int32).contiguous(),
        bits=bits,
        group_size=group_size,
        in_features=K,
        out_features=N,
        sym=sym,
        desc_act=desc_act,
        zero_format=zero_format,
        bias=None if bias is None else bias.to(torch.float16).contiguous(),
    )
