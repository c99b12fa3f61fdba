"""``QuantizeConfig``: the quantization settings, as written to and read from checkpoints.

Written as ``quantize_config.json`` and as ``config.json["quantization_config"]`` in the
shape AutoGPTQ, GPTQModel and transformers/optimum write. Read leniently (the synonyms peers
wrote: ``wbits``, ``w_bit``, ``groupsize``, ``q_group_size``, ``format``, ``version``,
``zero_point``) and strictly (anything that cannot be honoured raises a clear error).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import torch

from ._version import __version__
from .errors import FormatError
from .format import ZeroFormat, check_group_size
from .packing import check_bits

#: checkpoint_format value -> how qzeros are stored.
CHECKPOINT_FORMATS: dict[str, ZeroFormat] = {"gptq": "v1", "gptq_v2": "v2"}

_SYNONYMS = {
    "wbits": "bits",
    "w_bit": "bits",
    "groupsize": "group_size",
    "q_group_size": "group_size",
    "act_order": "desc_act",
    "damp": "damp_percent",
}


#: Settings GPTQModel writes inside ``meta`` rather than at the top level
#: (gptqmodel/quantization/config.py META_FIELD_*); read from there when the top level lacks them.
_META_FIELDS: tuple[str, ...] = (
    "damp_percent", "damp_auto_increment", "static_groups", "true_sequential", "mse",
    "act_group_aware", "float_target",
)

#: Keys peers write whose non-default values gptq-core cannot honour -> (is default, fix).
#: GPTQModel's per-module overrides, quantized lm_head, other pack dtypes and rotations change
#: which tensors exist or how they are read, so loading them as plain GPTQ would be wrong.
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dynamic": (lambda v: not v, "per-module overrides (GPTQModel's dynamic) are not supported; "
                "requantize with one setting for every layer"),
    "lm_head": (lambda v: not v, "a quantized lm_head is not supported; requantize with lm_head=False"),
    "pack_dtype": (lambda v: v in (None, "int32", "torch.int32"),
                   "only int32 packing (the GPTQ format) is supported; repack with pack_dtype=int32"),
    "rotation": (lambda v: not v, "rotated (SpinQuant/QuaRot) checkpoints are not supported"),
    "is_marlin_format": (lambda v: not v, "Marlin-format checkpoints are not supported; use the "
                         "GPTQ checkpoint they were repacked from"),
}


#: Fields that must be real bools: the string "false" is truthy, so accepting it would quantize
#: with the opposite of what was asked.
_BOOL_FIELDS: tuple[str, ...] = ("desc_act", "sym", "true_sequential", "static_groups", "act_group_aware")


def _check_int(name: str, value: Any) -> None:
    """An int field must hold an int: ``bits=4.7`` is refused, not truncated to 4."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{name}={value!r} is not an integer; pass a whole number such as 4")


def _check_real(name: str, value: Any) -> None:
    """A float field must hold a finite number: NaN passes every range comparison unnoticed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FormatError(f"{name}={value!r} is not a finite number; pass a float such as 0.01")


def _as_int(value: Any) -> Any:
    """Peers' configs sometimes write ``"bits": "4"``; a digit string becomes the int, anything
    else is left for :meth:`QuantizeConfig.validate` to refuse by name."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


@dataclass
class QuantizeConfig:
    """GPTQ settings. Defaults follow the ecosystem (4-bit, group 128, sym, no act-order).

    Quality methods beyond the paper (DESIGN.md §6; measured in NOTES/quantizer.md):
    ``mse`` searches each group's range (the norm of the error it minimises; 0 is min-max);
    ``act_group_aware`` quantizes whole groups in order of their most important input channel
    and, inside a group, channel by channel in order of importance: act-order's quality with a
    monotone ``g_idx`` (readable by every kernel and engine, unlike ``desc_act``);
    ``float_target`` (0 to 1) pulls each layer toward the *float* model's outputs instead of
    its quantized predecessors' (asymmetric calibration, as GPTAQ), at 1 fully. The paper's
    plain GPTQ is ``mse=0, act_group_aware=False, float_target=0``.
    """

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    damp_auto_increment: float = 0.0025
    true_sequential: bool = True
    static_groups: bool = False
    mse: float = 0.0
    act_group_aware: bool = False
    #: On by default: the measured best within 1.5x of plain GPTQ's time (NOTES/quantizer.md).
    float_target: float = 0.5
    checkpoint_format: str = "gptq"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's type and range in one place: the constructor, ``from_dict`` (configs
        read from disk) and the CLI all come through here, so a bad value never reaches a checkpoint."""
        _check_int("bits", self.bits)
        check_bits(self.bits)
        _check_int("group_size", self.group_size)
        check_group_size(self.group_size)
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise FormatError(
                    f"{name}={value!r} is not a bool; pass True or False (JSON true/false), "
                    "not a string or number"
                )
        if not isinstance(self.checkpoint_format, str) or self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise FormatError(
                f"checkpoint_format={self.checkpoint_format!r} cannot be read or written by "
                f"gptq-core; supported: {sorted(CHECKPOINT_FORMATS)} (repack other formats such "
                "as marlin or bitblas from their GPTQ source)"
            )
        _check_real("damp_percent", self.damp_percent)
        if not 0 < self.damp_percent < 1:
            raise FormatError(f"damp_percent={self.damp_percent} must lie in (0, 1), e.g. 0.01")
        _check_real("damp_auto_increment", self.damp_auto_increment)
        if self.damp_auto_increment < 0:
            raise FormatError(
                f"damp_auto_increment={self.damp_auto_increment} must be >= 0, e.g. 0.0025"
            )
        _check_real("mse", self.mse)
        if self.mse < 0:
            raise FormatError(
                f"mse={self.mse} (the MSE scale-search norm) must be 0 (off) or positive, e.g. 2.4"
            )
        if self.act_group_aware and self.desc_act:
            raise FormatError(
                "act_group_aware and desc_act are two orders for the same thing; pick one "
                "(act_group_aware keeps g_idx monotone, which vLLM and exllama-style kernels need)"
            )
        _check_real("float_target", self.float_target)
        if not 0 <= self.float_target <= 1:
            raise FormatError(
                f"float_target={self.float_target} must lie in [0, 1] (0: off, e.g. 0.25)"
            )
        if not isinstance(self.meta, dict):
            raise FormatError(f"meta={self.meta!r} must be a dict (a JSON object)")

    @property
    def zero_format(self) -> ZeroFormat:
        return CHECKPOINT_FORMATS[self.checkpoint_format]

    def replace(self, **changes) -> QuantizeConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` dict as the ecosystem writes it."""
        # The fields win over a ``meta`` read from disk: a config changed with ``replace`` must
        # write what it quantized with.
        meta = {"quantizer": [f"gptq-core:{__version__}"], **self.meta}
        meta.update(
            damp_auto_increment=self.damp_auto_increment,
            mse=self.mse,
            act_group_aware=self.act_group_aware,
            float_target=self.float_target,
        )
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "damp_percent": self.damp_percent,
            "true_sequential": self.true_sequential,
            "static_groups": self.static_groups,
            "checkpoint_format": self.checkpoint_format,
            "format": self.checkpoint_format,
            "meta": meta,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "quantization config") -> QuantizeConfig:
        """Read a config a peer wrote; reject what cannot be honoured with a clear error."""
        if not isinstance(raw, dict):
            raise FormatError(f"{source} must be a JSON object, got {type(raw).__name__}")
        data = dict(raw)
        method = data.pop("quant_method", "gptq")
        if isinstance(method, enum.Enum):  # transformers' GPTQConfig.to_dict() keeps its enum
            method = method.value
        method = str(method).lower()
        if method != "gptq":
            raise FormatError(
                f"{source} has quant_method={method!r}; gptq-core loads GPTQ checkpoints only"
            )
        for key, (is_default, fix) in _UNSUPPORTED.items():
            if key in data and not is_default(data[key]):
                raise FormatError(f"{source} has {key}={data[key]!r}: {fix}")
        for old, new in _SYNONYMS.items():
            if old in data and new not in data:
                data[new] = data.pop(old)
            else:
                data.pop(old, None)
        fmt = data.pop("checkpoint_format", None) or data.pop("format", None)
        data.pop("format", None)
        version = data.pop("version", None)
        if fmt is None and version is not None:
            fmt = str(version).lower()
        fmt = str(fmt or "gptq").lower()
        if fmt in ("v1", "gptq_v1"):
            fmt = "gptq"
        elif fmt == "v2":
            fmt = "gptq_v2"
        if "zero_point" in data and "sym" not in data:
            zero_point = data.pop("zero_point")
            if not isinstance(zero_point, bool):
                raise FormatError(f"{source}: zero_point={zero_point!r} is not a bool; write true or false")
            data["sym"] = not zero_point
        meta = data.pop("meta", None) or {}
        if not isinstance(meta, dict):
            meta = {}
        known = {f.name for f in dataclasses.fields(cls)} - {"meta", "checkpoint_format"}
        kwargs = {k: data[k] for k in known if k in data}
        for k in _META_FIELDS:
            if k not in kwargs and meta.get(k) is not None:
                kwargs[k] = meta[k]
        if kwargs.get("group_size") is None:
            kwargs["group_size"] = -1
        if kwargs.get("damp_percent") is None:
            kwargs.pop("damp_percent", None)
        for k in ("bits", "group_size"):
            if k in kwargs:
                kwargs[k] = _as_int(kwargs[k])
        if kwargs.get("desc_act") is True and kwargs.get("act_group_aware") is True:
            # only how it was quantized, not how it is read: desc_act decides the loading
            kwargs["act_group_aware"] = False
        try:
            return cls(checkpoint_format=fmt, meta=meta, **kwargs)
        except FormatError as exc:
            raise FormatError(f"{source}: {exc}") from None


#: dtypes a checkpoint's non-quantized tensors (embeddings, norms, head) may be saved in: the
#: float types every peer loader reads. An integer dtype would cast float weights to integers.
SAVE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def check_save_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The ``torch_dtype`` of ``save_quantized`` as a torch dtype (``None``: keep the model's),
    or a clear error for anything but float16, bfloat16 and float32 (given as dtype or name)."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in SAVE_DTYPES:
        return SAVE_DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in SAVE_DTYPES.values():
        return dtype
    raise FormatError(
        f"torch_dtype={dtype!r} cannot hold a checkpoint's float tensors; use one of "
        f"{', '.join('torch.' + name for name in SAVE_DTYPES)} (or None to keep the model's dtype)"
    )
