"""``QuantLinear``: a drop-in ``nn.Linear`` holding one GPTQ-packed weight.

Its buffers carry the checkpoint's tensor names (``qweight``, ``qzeros``, ``scales``,
``g_idx``, ``bias``), so a GPTQ state dict loads into it directly. :meth:`QuantLinear.bind`
asks the selector once for a backend and keeps the prepared weight and the backend's
``qmatmul`` function; ``forward`` then calls that function directly, with no plugin lookup.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from . import selector
from .device import DeviceInfo
from .errors import FormatError, GPTQError, NotSupportedError
from .format import ZERO_FORMATS, PackedWeight, ZeroFormat, check_group_size, default_g_idx, num_groups
from .options import BackendOptions
from .packing import check_bits, packed_length
from .spec import LayerSpec, Mode
from .tracing import plain_eager
from .training import DequantBudget, WeightSource, differentiable_qmatmul

_FORMAT_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")

logger = logging.getLogger("gptq_core")


class QuantLinear(nn.Module):
    """A quantized linear layer: ``y = x @ W.T + bias`` with W stored in the GPTQ format."""

    #: Whether this layer shares one fused matmul with its siblings (q/k/v, gate/up), and why
    #: or why not (:mod:`gptq_core.fusion`); None for layers of no fusion group.
    fusion: str | None = None

    def __init__(
        self,
        bits: int,
        group_size: int,
        in_features: int,
        out_features: int,
        bias: bool = False,
        sym: bool = True,
        desc_act: bool = False,
        zero_format: ZeroFormat = "v1",
        backend: str | Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_bits(bits)
        check_group_size(group_size)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise FormatError(f"QuantLinear {name} must be a positive integer, got {value!r}")
        if zero_format not in ZERO_FORMATS:
            raise FormatError(f"zero_format={zero_format!r} is unknown; use 'v1' (gptq) or 'v2' (gptq_v2)")
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = in_features, out_features
        self.sym, self.desc_act, self.zero_format = sym, desc_act, zero_format
        self.backend = backend
        #: Parsed options per backend name (``selector.parse_backend_options``), used at bind.
        self.backend_options: Mapping[str, BackendOptions] = {}
        self.mode: Mode = "inference"
        K, N, G = in_features, out_features, num_groups(in_features, group_size)
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(packed_length(K, bits), N, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(G, packed_length(N, bits), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(G, N, dtype=torch.float16, **kw))
        self.register_buffer("g_idx", default_g_idx(K, group_size, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=torch.float16, **kw) if bias else None)
        self._bindings: dict[torch.dtype, selector.Binding] = {}
        self._binding: selector.Binding | None = None
        self._binding_dtype: torch.dtype | None = None
        # The hot path's things, copied out of the binding so ``forward`` reads plain
        # attributes (docs/DESIGN.md §3: nothing of the selector runs per call).
        self._qmatmul = None
        self._prepared = None
        self._eager = None
        self._trainable = False
        self._device: torch.device | None = None
        self._bias: torch.Tensor | None = None
        # What the backward pass reads (gptq_core.training), built at the first forward that
        # needs a gradient and dropped with the binding; the budget is shared per model.
        self._grad_source: WeightSource | None = None
        self._dequant_budget: DequantBudget | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_packed(
        cls,
        weight: PackedWeight,
        backend: str | Sequence[str] | None = None,
        act_dtype: torch.dtype | None = torch.float16,
        mode: Mode = "inference",
    ) -> QuantLinear:
        """Wrap a :class:`PackedWeight` (tensors are shared, not copied) and bind it.

        ``act_dtype=None`` defers binding to the first forward call.
        """
        layer = cls(
            weight.bits, weight.group_size, weight.in_features, weight.out_features,
            bias=weight.bias is not None, sym=weight.sym, desc_act=weight.desc_act,
            zero_format=weight.zero_format, backend=backend, device="meta",
        )
        for name in _FORMAT_TENSORS:
            value = getattr(weight, name)
            if value is not None:
                setattr(layer, name, value)
        layer.mode = mode
        if act_dtype is not None:
            layer.bind(act_dtype=act_dtype)
        return layer

    def packed(self) -> PackedWeight:
        """This layer's tensors as a validated :class:`PackedWeight` (no copy)."""
        return PackedWeight(
            qweight=self.qweight, qzeros=self.qzeros, scales=self.scales, g_idx=self.g_idx,
            bits=self.bits, group_size=self.group_size, in_features=self.in_features,
            out_features=self.out_features, sym=self.sym, desc_act=self.desc_act,
            zero_format=self.zero_format, bias=self.bias,
        )

    # ------------------------------------------------------------------ binding
    def spec(self, act_dtype: torch.dtype = torch.float16) -> LayerSpec:
        return LayerSpec(
            bits=self.bits, group_size=self.group_size, in_features=self.in_features,
            out_features=self.out_features, sym=self.sym, desc_act=self.desc_act,
            act_dtype=act_dtype, mode=self.mode,
        )

    def bind(
        self,
        act_dtype: torch.dtype = torch.float16,
        backend: str | Sequence[str] | None = None,
        mode: Mode | None = None,
        options: Mapping[str, BackendOptions] | None = None,
    ) -> selector.Binding:
        """Select a backend for this layer on its current device and prepare the weight."""
        if backend is not None:
            self.backend = backend
        if options is not None:
            self.backend_options = options
        if mode is not None and mode != self.mode:
            self.mode = mode
            self.unbind()
        if self.qweight.device.type == "meta":
            raise GPTQError("QuantLinear has no weights yet (meta device); load a state dict first")
        self._drop_grad_source()  # the weights may have changed since it was built
        weight = self.packed()
        binding = selector.bind(
            weight, DeviceInfo.of(self.qweight.device), self.spec(act_dtype), self.backend,
            options=self.backend_options,
        )
        self._bindings[act_dtype] = binding
        self._use(binding, act_dtype)
        return binding

    def _use(self, binding: selector.Binding | None, act_dtype: torch.dtype | None) -> None:
        self._binding, self._binding_dtype = binding, act_dtype
        self._qmatmul = binding.qmatmul if binding is not None else None
        self._prepared = binding.prepared if binding is not None else None
        # The backend's direct entry for plainly eager calls on [..., K] inputs, where its
        # prepared object offers one (docs/DESIGN.md §3, ``eager_qmatmul``).
        self._eager = getattr(binding.prepared, "eager_qmatmul", None) if binding is not None else None
        self._trainable = binding is not None and binding.backend.info.capabilities.training
        # nn.Module.__getattr__ costs about a microsecond per buffer read; these two are
        # read every call, and any change to them (``_apply``, loading) unbinds first.
        self._device = self.qweight.device if binding is not None else None
        self._bias = self.bias if binding is not None else None

    def unbind(self) -> None:
        """Forget prepared weights (after the buffers changed device or content)."""
        self._bindings.clear()
        self._use(None, None)
        self._drop_grad_source()

    def set_dequant_budget(self, budget: DequantBudget | None) -> None:
        """Share ``budget`` for the dequantized copy the backward pass may keep (None: none);
        see :func:`gptq_core.training.configure_training`."""
        self._drop_grad_source()
        self._dequant_budget = budget

    def _drop_grad_source(self) -> None:
        if self._grad_source is not None:
            self._grad_source.release()
            self._grad_source = None

    @property
    def binding(self) -> selector.Binding | None:
        """The binding used most recently (None before the first bind)."""
        return self._binding

    def _binding_for(self, x: torch.Tensor) -> selector.Binding:
        binding = self._bindings.get(x.dtype)
        if binding is None:
            if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise NotSupportedError(
                    f"QuantLinear input has dtype {x.dtype}; use float16, bfloat16 or float32"
                )
            binding = self.bind(act_dtype=x.dtype)
        self._use(binding, x.dtype)
        return binding

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # This runs once per layer per decode step, and eager decode pays for each microsecond
        # here (docs/DESIGN.md §11). The backend's eager entry, where it has one, takes the
        # input as it is (any leading dimensions, no reshapes here) and checks its shape and
        # device itself; an input it refuses takes the checked path below, which names the
        # problem.
        eager = self._eager
        if (eager is not None and x.dtype == self._binding_dtype
                and not (x.requires_grad and torch.is_grad_enabled()) and plain_eager()):
            try:
                return eager(x, self._bias)
            except RuntimeError:
                pass
        if x.dtype != self._binding_dtype or self._qmatmul is None:
            self._binding_for(x)
        try:  # free unless it raises: a 0-d input has no x.shape[-1]
            if x.shape[-1] != self.in_features:
                raise NotSupportedError(
                    f"input has {x.shape[-1]} features in its last dimension, this layer takes "
                    f"K={self.in_features} (shape {tuple(x.shape)})"
                )
        except IndexError:
            raise NotSupportedError(
                f"input is a 0-d tensor (a scalar); this layer takes [..., K={self.in_features}] "
                "inputs: give it at least one dimension"
            ) from None
        if x.device != self._device:
            raise NotSupportedError(
                f"input is on {x.device} but this layer's weights are on {self.qweight.device}; "
                "move the input or the model"
            )
        if x.requires_grad and torch.is_grad_enabled():
            return self._forward_with_grad(x)
        if x.dim() == 2:
            return self._qmatmul(x if x.is_contiguous() else x.contiguous(), self._prepared, self._bias)
        lead = x.shape[:-1]
        y = self._qmatmul(x.reshape(-1, self.in_features).contiguous(), self._prepared, self._bias)
        return y.reshape(*lead, self.out_features)

    def _forward_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """The forward whose input needs a gradient: the same kernel, wrapped so that the
        backward computes ``dY @ W`` (gptq_core.training; the weight itself stays frozen)."""
        if not self._trainable:
            self._bind_for_training(x)
        source = self._grad_source
        if source is None:
            source = WeightSource(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                                  self.group_size, self.zero_format, self._dequant_budget)
            if not torch.compiler.is_compiling():  # a traced graph rebuilds it inline
                self._grad_source = source
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = differentiable_qmatmul(self._qmatmul, x2.contiguous(), self._prepared, self._bias, source)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _bind_for_training(self, x: torch.Tensor) -> None:
        """A gradient is wanted but the bound backend declares no backward pass: when the
        backend was chosen automatically, choose again among those that have one (as binding
        with mode='training' would have; PEFT users never call bind); an explicit choice is
        kept and refused."""
        served = self._binding.backend.name
        if selector.parse_preference(self.backend) is not None or torch.compiler.is_compiling():
            raise NotSupportedError(
                f"backend '{served}' has no backward pass; bind the model "
                "with mode='training' to pick a backend that has one"
            )
        binding = self.bind(act_dtype=x.dtype, mode="training")
        logger.info("QuantLinear K=%d N=%d: backend '%s' has no backward pass, '%s' serves it "
                    "for training", self.in_features, self.out_features, served, binding.backend.name)

    # ------------------------------------------------------------------ nn.Module plumbing
    def _apply(self, fn, recurse=True):
        """Move buffers between devices but never change their dtypes (the format fixes them)."""
        for name in _FORMAT_TENSORS:
            buf = self._buffers.get(name)
            if buf is None:
                continue
            moved = fn(buf)
            if moved.dtype != buf.dtype:
                moved = buf.to(moved.device)
            self._buffers[name] = moved
        self.unbind()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in _FORMAT_TENSORS:
            t = state_dict.get(prefix + name)
            own = self._buffers.get(name)
            if t is not None and own is not None and tuple(t.shape) != tuple(own.shape):
                raise FormatError(
                    f"tensor '{prefix}{name}' has shape {tuple(t.shape)}, but bits={self.bits}, "
                    f"group_size={self.group_size}, K={self.in_features}, N={self.out_features} "
                    f"require {tuple(own.shape)}; the checkpoint contradicts its config"
                )
            if t is not None and own is not None and own.device.type == "meta":
                self._buffers[name] = torch.empty_like(t, device="cpu")
        self.unbind()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        served = self._binding.backend.name if self._binding is not None else "unbound"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, desc_act={self.desc_act}, "
            f"bias={self.bias is not None}, backend={served}"
        )
