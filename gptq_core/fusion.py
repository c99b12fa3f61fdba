"""Fused projections: linears that read one input (q/k/v; gate/up) served by one matmul.

At load, each fusion group of the architecture table (``Architecture.fusion_groups``) whose
members share every quantization setting becomes one :class:`QuantLinear` holding the
members' packed tensors concatenated along N, bound once (docs/DESIGN.md §11: one launch
instead of three reads the activations once and pays the per-call overhead once). Each member
is replaced by a :class:`FusedSlice`, which returns its columns of the fused output.

Correctness does not depend on the table being right: the first member called computes the
fused output and keeps it with its input; another member reuses it only when called with that
very tensor object (unchanged since, in eager mode), else it computes the fused matmul again.
The checkpoint format is untouched: a FusedSlice's buffers are its original tensors (views of
the fused ones where the packing allows), so ``state_dict`` keys and ``save_quantized`` bytes
are those of the separate layers (docs/DESIGN.md §2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import FormatError, GPTQError
from .format import PackedWeight
from .models.architecture import Architecture
from .options import BackendOptions
from .packing import pack_cols, unpack_cols
from .quant_linear import QuantLinear
from .selector import Binding
from .spec import Mode

#: Settings every member of a fused layer must share (besides g_idx and the device).
SHARED_SETTINGS = ("bits", "group_size", "sym", "desc_act", "zero_format", "in_features", "mode", "backend")


def concat_packed(weights: Sequence[PackedWeight]) -> PackedWeight:
    """One layer computing every weight of ``weights`` side by side (concatenated along N).

    ``qzeros`` are packed along N, so their words are unpacked, concatenated and packed again
    (a member whose N*bits is not a multiple of 32 ends in a partial word). Members without a
    bias get zeros when another member has one.
    """
    first = weights[0]
    for w in weights[1:]:
        for field in ("bits", "group_size", "sym", "desc_act", "zero_format", "in_features"):
            if getattr(w, field) != getattr(first, field):
                raise FormatError(f"cannot concatenate layers with different {field}")
        if not torch.equal(w.g_idx, first.g_idx):
            raise FormatError("cannot concatenate layers with different g_idx")
    bits = first.bits
    stored = [unpack_cols(w.qzeros, bits, w.out_features) for w in weights]
    bias = None
    if any(w.bias is not None for w in weights):
        bias = torch.cat([
            w.bias if w.bias is not None else w.scales.new_zeros(w.out_features) for w in weights
        ])
    return first.replace(
        qweight=torch.cat([w.qweight for w in weights], dim=1),
        qzeros=pack_cols(torch.cat(stored, dim=1), bits),
        scales=torch.cat([w.scales for w in weights], dim=1),
        out_features=sum(w.out_features for w in weights),
        bias=bias,
    )


def mismatch(layer: QuantLinear, other: QuantLinear, other_name: str) -> str | None:
    """Why ``layer`` cannot share a fused matmul with ``other`` (None when it can)."""
    for field in SHARED_SETTINGS:
        mine, theirs = getattr(layer, field), getattr(other, field)
        if mine != theirs:
            return f"{field}={mine!r} differs from {other_name}'s {theirs!r}"
    if layer.qweight.device != other.qweight.device:
        return f"on {layer.qweight.device}, {other_name} on {other.qweight.device}"
    if not torch.equal(layer.g_idx, other.g_idx):
        return f"g_idx differs from {other_name}'s"
    return None


class FusedGroup:
    """The fused layer of a group and the one cached (input, output) its members share.

    A plain object, not a module: the fused layer stays out of the module tree, so
    ``state_dict`` and ``named_modules`` show only the original layers.
    """

    def __init__(self, layer: QuantLinear, spans: Sequence[tuple[int, int]]) -> None:
        self.layer = layer
        self.spans = tuple(spans)
        #: Each member's width, in order; they tile the fused output (one split per step).
        self.widths = [width for _, width in self.spans]
        # (input, its version stamp, the members' outputs, members still to read them)
        self._entry: tuple[torch.Tensor, int | None, tuple[torch.Tensor, ...], int] | None = None
        self._bound: tuple | None = None

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s columns of the fused layer's output for ``x``.

        The fused output is split into every member's view by one op when it is computed
        (one call instead of one ``narrow`` per member: eager decode pays per call). The entry
        is one tuple, read and replaced whole, so concurrent callers never pair one input with
        another's output. In eager mode the input's version counter must also match (an
        in-place change of ``x`` recomputes); a traced graph cannot read it, and an inference
        tensor (``torch.inference_mode``) has none, so for those the input object alone is
        the key.
        """
        compiling = torch.compiler.is_compiling()
        version = None if compiling else (-1 if x.is_inference() else x._version)
        entry = self._entry
        if entry is not None and x is entry[0] and (compiling or version == entry[1]):
            parts, left = entry[2], entry[3] - 1
        else:
            parts, left = self.layer(x).split_with_sizes(self.widths, -1), len(self.widths) - 1
        # Freed once every member has read it, so no activation outlives the layer's step.
        self._entry = (x, version, parts, left) if left > 0 else None
        return parts[index]

    def bind(
        self,
        act_dtype: torch.dtype,
        backend: str | Sequence[str] | None,
        mode: Mode | None,
        options: Mapping[str, BackendOptions] | None,
    ) -> Binding:
        """Bind the fused layer once however many members ask with the same arguments."""
        key = (act_dtype, backend, mode, dict(options) if options is not None else None)
        binding = self.layer._bindings.get(act_dtype)
        if binding is None or key != self._bound:
            binding = self.layer.bind(act_dtype=act_dtype, backend=backend, mode=mode, options=options)
            self._bound = key
        else:
            self.layer._use(binding, act_dtype)
        return binding

    def forget(self) -> None:
        """Drop the cached output and the bindings (the weights moved or changed)."""
        self._entry = None
        self._bound = None
        self.layer.unbind()


class FusedSlice(QuantLinear):
    """One member of a fused group: its own tensors and settings, the group's matmul.

    It stays a :class:`QuantLinear` (same attributes and buffer names, ``packed()`` returns
    the original layer), so code that lists, explains or saves quantized layers sees the
    model as it was; ``forward`` and ``binding`` are the fused layer's.
    """

    def __init__(self, group: FusedGroup, index: int, original: QuantLinear, fusion: str) -> None:
        super().__init__(
            original.bits, original.group_size, original.in_features, original.out_features,
            bias=original.bias is not None, sym=original.sym, desc_act=original.desc_act,
            zero_format=original.zero_format, backend=original.backend, device="meta",
        )
        self.mode = original.mode
        self.backend_options = original.backend_options
        self._group = group
        self._index = index
        self.fusion = fusion
        start, width = group.spans[index]
        bits = original.bits
        # qzeros are a view of the fused words only where this member's values fill whole
        # words; otherwise the layer keeps its own (small) original tensor.
        self._zero_words = (
            (start * bits // 32, width * bits // 32)
            if (start * bits) % 32 == 0 and (width * bits) % 32 == 0 else None
        )
        if self._zero_words is None:
            self.qzeros = original.qzeros
        self._refresh()

    def _refresh(self) -> None:
        """Point the format buffers at this member's columns of the fused tensors."""
        fused = self._group.layer
        start, width = self._group.spans[self._index]
        self.qweight = fused.qweight.narrow(1, start, width)
        self.scales = fused.scales.narrow(1, start, width)
        self.g_idx = fused.g_idx
        if self._zero_words is not None:
            self.qzeros = fused.qzeros.narrow(1, *self._zero_words)
        if self.bias is not None:
            self.bias = fused.bias.narrow(0, start, width)

    @property
    def fused(self) -> QuantLinear:
        """The layer that computes this member's output (shared with its group)."""
        return self._group.layer

    def packed(self) -> PackedWeight:
        """This member's weight as the checkpoint held it (contiguous copies of the views)."""
        return PackedWeight(
            qweight=self.qweight.contiguous(), qzeros=self.qzeros.contiguous(),
            scales=self.scales.contiguous(), g_idx=self.g_idx, bits=self.bits,
            group_size=self.group_size, in_features=self.in_features,
            out_features=self.out_features, sym=self.sym, desc_act=self.desc_act,
            zero_format=self.zero_format,
            bias=self.bias.contiguous() if self.bias is not None else None,
        )

    def bind(
        self,
        act_dtype: torch.dtype = torch.float16,
        backend: str | Sequence[str] | None = None,
        mode: Mode | None = None,
        options: Mapping[str, BackendOptions] | None = None,
    ) -> Binding:
        binding = self._group.bind(act_dtype, backend, mode, options)
        fused = self._group.layer
        self.backend, self.mode, self.backend_options = fused.backend, fused.mode, fused.backend_options
        return binding

    def unbind(self) -> None:
        self._group.forget()

    @property
    def binding(self) -> Binding | None:
        return self._group.layer.binding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.output(x, self._index)

    def _apply(self, fn, recurse=True):
        """Move the fused layer (idempotent: every member asks) and re-slice the views."""
        self._group.layer._apply(fn)
        self._group.forget()
        if self._zero_words is None:
            moved = fn(self.qzeros)
            self._buffers["qzeros"] = moved if moved.dtype == self.qzeros.dtype else self.qzeros.to(moved.device)
        self._refresh()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not any(k.startswith(prefix) for k in state_dict):
            # Nothing for this layer (a PEFT adapter loaded with strict=False): load nothing.
            return nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)
        raise GPTQError(
            f"'{prefix.rstrip('.')}' is part of a fused layer ({self.fusion}); loading a state "
            "dict into it would leave the fused weights stale. Load the checkpoint with "
            "fuse=False to load state dicts into its layers"
        )

    def extra_repr(self) -> str:
        served = self.binding.backend.name if self.binding is not None else "unbound"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, {self.fusion}, backend={served}"
        )


def _short(name: str) -> str:
    return name.rpartition(".")[2]


def _partition(names: Sequence[str], layers: Mapping[str, QuantLinear]) -> list[list[str]]:
    """Members in classes that can share one matmul, each class in the group's order."""
    classes: list[list[str]] = []
    for name in names:
        for cls in classes:
            if mismatch(layers[name], layers[cls[0]], _short(cls[0])) is None:
                cls.append(name)
                break
        else:
            classes.append([name])
    return classes


def _fuse(names: Sequence[str], layers: Mapping[str, QuantLinear]) -> dict[str, FusedSlice]:
    members = [layers[n] for n in names]
    weights = [m.packed() for m in members]
    spans, start = [], 0
    for w in weights:
        spans.append((start, w.out_features))
        start += w.out_features
    first = members[0]
    layer = QuantLinear.from_packed(concat_packed(weights), backend=first.backend, act_dtype=None, mode=first.mode)
    layer.backend_options = first.backend_options
    layer.fusion = f"fused {'+'.join(_short(n) for n in names)} (N={start})"
    group = FusedGroup(layer, spans)
    return {n: FusedSlice(group, i, m, layer.fusion) for i, (n, m) in enumerate(zip(names, members))}


def fusion_members(model: nn.Module, arch: Architecture, layers: Mapping[str, QuantLinear]) -> list[list[str]]:
    """Per decoder layer and fusion group of ``arch``: the full names of its quantized members."""
    from .models import decoder_layers

    found = []
    for index, _ in enumerate(decoder_layers(model, arch)):
        prefix = f"{arch.layers}.{index}."
        for group in arch.fusion_groups:
            names = [prefix + n for n in group if prefix + n in layers]
            if len(names) > 1:
                found.append(names)
    return found


def fuse_linears(model: nn.Module, arch: Architecture, layers: dict[str, QuantLinear]) -> None:
    """Replace the members of every fusable group by :class:`FusedSlice` modules, in place.

    ``layers`` maps full names to the model's QuantLinears and is updated in place, group by
    group, so each group's original tensors are freed as soon as its fused layer exists (hold
    no other reference to them: on a full GPU, all originals plus all fused copies may not
    fit). A member that cannot join its group gets ``fusion = "not fused: <why>"``.
    """
    from .models.layers import set_module

    for names in fusion_members(model, arch, layers):
        for cls in _partition(names, layers):
            if len(cls) == 1:
                name = cls[0]
                other = next(n for n in names if n != name)
                layers[name].fusion = f"not fused: {mismatch(layers[name], layers[other], _short(other))}"
                continue
            for name, piece in _fuse(cls, layers).items():
                set_module(model, name, piece)
                layers[name] = piece
