"""GPTQ checkpoints through plain ``transformers.AutoModelForCausalLM.from_pretrained``.

transformers routes ``quant_method: "gptq"`` to its own quantizer, which needs optimum and
gptqmodel. :func:`register` puts :class:`GptqCoreHfQuantizer` in its place, so
``from_pretrained(gptq_dir, device_map=..., dtype=...)`` builds the model with
:class:`~gptq_core.QuantLinear` layers, lets transformers read the tensors into them (and
place them by ``device_map``), then binds every layer through gptq-core's selector on the
device it landed on (docs/DESIGN.md §4). ``save_pretrained`` writes the tensors and the
``quantization_config`` of :func:`gptq_core.checkpoint.save_quantized`.

transformers offers ``register_quantizer``, but it refuses a name that exists, and "gptq"
does; so the mapping ``transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING`` is updated
directly, and the hooks the loader calls (``preprocess_model`` with ``checkpoint_files``,
``get_state_dict_and_metadata``) are those of transformers 5. Hence the supported range
:data:`SUPPORTED`; outside it, loading a GPTQ checkpoint fails with one line saying so
(unless optimum is installed, whose own path is then left alone).
"""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import GPTQConfig

from ..config import QuantizeConfig
from ..errors import CheckpointError, GPTQError
from ..quant_linear import QuantLinear

logger = logging.getLogger("gptq_core")

#: transformers versions whose loader this integration is tested against: 5.14.1, 5.17.0 and
#: 5.24.0 pass tests/test_transformers_integration.py; 5.0.0, 5.9.0 and 5.12.1 load and save
#: correctly but give wrong logits for layers offloaded to disk with ``offload_buffers=True``;
#: transformers 4 calls the quantizer hooks differently (and gptq-core itself needs 5).
SUPPORTED_RANGE = ">=5.14,<6"
SUPPORTED = SpecifierSet(SUPPORTED_RANGE)

#: The quant_method this integration serves.
METHOD = "gptq"


def transformers_version() -> Version:
    return Version(metadata.version("transformers"))


def is_supported(version: Version | None = None) -> bool:
    """Whether the installed transformers (or ``version``) is in :data:`SUPPORTED`."""
    return (version or transformers_version()) in SUPPORTED


def unsupported_message(version: Version | None = None) -> str:
    return (
        f"gptq-core's transformers integration supports transformers{SUPPORTED_RANGE}, this is "
        f"{version or transformers_version()}; install a supported version: "
        f"`pip install 'transformers{SUPPORTED_RANGE}'`"
    )


def quantize_config_of(config: Any) -> QuantizeConfig:
    """A :class:`QuantizeConfig` from transformers' ``GPTQConfig`` (or a dict of one)."""
    if isinstance(config, GptqCoreConfig):
        return config.gptq_core
    raw = dict(config) if not isinstance(config, dict) else dict(config)
    method = raw.get("quant_method")
    raw["quant_method"] = str(getattr(method, "value", method) or METHOD)
    for key in ("tokenizer", "dataset", "backend", "model_seqlen", "block_name_to_quantize",
                "module_name_preceding_first_block", "batch_size", "pad_token_id", "max_input_length",
                "cache_block_outputs", "modules_in_block_to_quantize", "act_group_aware", "use_cuda_fp16",
                "use_exllama", "exllama_config"):
        raw.pop(key, None)
    return QuantizeConfig.from_dict(raw, source="quantization_config")


class GptqCoreConfig(GPTQConfig):
    """transformers' ``GPTQConfig`` holding a :class:`QuantizeConfig`: what a model loaded
    through this integration carries as ``config.quantization_config``. It serialises exactly
    as gptq-core's own checkpoints (``QuantizeConfig.to_dict``), so ``save_pretrained`` writes
    what AutoGPTQ, GPTQModel, optimum and vLLM read."""

    def __init__(self, quantize_config: QuantizeConfig, backend: str | None = None, **kwargs: Any) -> None:
        q = quantize_config
        super().__init__(
            bits=q.bits, group_size=q.group_size, damp_percent=q.damp_percent, desc_act=q.desc_act,
            sym=q.sym, true_sequential=q.true_sequential, format=q.checkpoint_format,
            meta=dict(q.meta), backend=backend, **kwargs,
        )
        self.gptq_core = q

    def to_dict(self) -> dict[str, Any]:
        return self.gptq_core.to_dict()


class GptqCoreHfQuantizer(HfQuantizer):
    """transformers' quantizer interface, served by gptq-core's loader checks, QuantLinear and
    selector (no optimum, no gptqmodel)."""

    requires_calibration = False

    def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        backend = getattr(quantization_config, "backend", None)
        self.backend: str | None = "auto" if backend in (None, "auto") else str(backend)
        self.gptq_core = quantize_config_of(quantization_config)
        self.layer_names: list[str] = []
        self.inventory: dict[str, Any] = {}
        self.arch = None
        self.dtype: torch.dtype | None = None
        self.calibration = getattr(quantization_config, "dataset", None)
        self.tokenizer = getattr(quantization_config, "tokenizer", None)

    # ------------------------------------------------------------------ transformers' hooks
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not is_supported():
            raise GPTQError(unsupported_message())
        if not self.pre_quantized and not self.calibration:
            raise GPTQError(
                "GPTQConfig without dataset= on a float model: gptq-core quantizes with "
                "calibration text; pass GPTQConfig(bits=4, dataset=[...texts...], tokenizer=tok)"
            )

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self.dtype = dtype
        return dtype

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        """Swap the checkpoint's quantized linears for QuantLinear (on meta) after the same
        checks as ``from_quantized``: every problem is named before a tensor is read."""
        if not self.pre_quantized:
            return
        from ..checkpoint.configs import read_quantize_config
        from ..checkpoint.inventory import read_inventory, weight_files
        from ..checkpoint.load import (
            _check_inventory, _drop_zero_biases, _model_basename, _prepare_architecture, _quantized_names,
        )
        from ..checkpoint.save import tied_weight_keys
        from ..models import replace_with_quant_linear

        files = kwargs.get("checkpoint_files") or []
        if not files or not str(files[0]).endswith(".safetensors"):
            raise CheckpointError(
                "gptq-core reads GPTQ checkpoints from safetensors files only; this one has "
                f"{[Path(f).name for f in files][:3] or 'no weight files'}"
            )
        folder = Path(files[0]).parent
        self.gptq_core = read_quantize_config(folder)
        found, weight_map = weight_files(folder, _model_basename(folder))
        inventory, arch = _prepare_architecture(model, read_inventory(found, weight_map))
        if arch is not None and arch.checkpoint_renames:
            renamed = [k for k in inventory if k not in model.state_dict()]
            if renamed:
                raise CheckpointError(
                    f"this {type(model).__name__} checkpoint names its tensors as the peers do "
                    f"(e.g. '{renamed[0]}'), which transformers' loader does not map; load it with "
                    "gptq_core.AutoGPTQForCausalLM.from_quantized"
                )
        names = _quantized_names(model, inventory)
        if not names:
            raise CheckpointError(f"{folder} declares a GPTQ quantization_config but holds no '*.qweight' tensors")
        ties = tied_weight_keys(model)
        replace_with_quant_linear(model, names, self.gptq_core, backend=self.backend)
        layers = {n: model.get_submodule(n) for n in names}
        for layer in layers.values():
            layer.zero_format = self.gptq_core.zero_format
        ignored = set(_drop_zero_biases(names, model, inventory, dict(model.state_dict(keep_vars=True))))
        _check_inventory(model, inventory, layers, ignored, ties)
        self.layer_names, self.inventory, self.arch = names, inventory, arch
        self.quantization_config = GptqCoreConfig(self.gptq_core, backend=self.backend)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        """Check the loaded values, then bind every layer on its device (fused where the model
        sits on one device, as ``from_quantized`` does)."""
        if not self.pre_quantized:
            return self._quantize(model)
        from ..checkpoint.validate import check_layer_values
        from ..format import default_g_idx
        from ..fusion import fuse_linears
        from ..placement import bind_placed, is_offloaded

        layers = {n: model.get_submodule(n) for n in self.layer_names}
        dtype = self.dtype if isinstance(self.dtype, torch.dtype) else model.dtype
        sources = {k: e.file.name for k, e in self.inventory.items()}
        for name, layer in layers.items():
            if not isinstance(layer, QuantLinear):
                raise GPTQError(f"'{name}' is a {type(layer).__name__} after loading, not a QuantLinear")
            if f"{name}.g_idx" not in self.inventory and not is_offloaded(layer):
                layer.g_idx = default_g_idx(layer.in_features, layer.group_size, device=layer.qweight.device)
            if not is_offloaded(layer):
                check_layer_values(name, layer, sources)
        devices = {layer.qweight.device for layer in layers.values()}
        if len(devices) == 1 and next(iter(devices)).type != "meta" and self.arch is not None:
            fuse_linears(model, self.arch, layers)
            for layer in layers.values():
                layer.bind(act_dtype=dtype, backend=self.backend)
        else:
            bind_placed(layers, dtype, self.backend, None)
        model.quantize_config = self.gptq_core
        model.config.quantization_config = self.quantization_config
        return model

    def _quantize(self, model: Any) -> Any:
        """``GPTQConfig(bits=..., dataset=[...], tokenizer=tok)`` on a float model: GPTQ with
        gptq-core's quantizer on those texts, layer by layer (docs/DESIGN.md §6)."""
        from ..auto import AutoGPTQForCausalLM, load_tokenizer

        tokenizer = self.tokenizer
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer or model.name_or_path)
        if isinstance(self.calibration, str):
            raise GPTQError(
                f"dataset={self.calibration!r} names a dataset to download; gptq-core calibrates "
                "on texts you give: dataset=[...texts...] (or a path to a .txt/.jsonl file)"
            )
        if tokenizer is None:
            raise GPTQError("GPTQConfig(dataset=[...]) needs tokenizer= (or a tokenizer saved with the model)")
        qcfg = self.gptq_core.replace(meta={})
        wrapper = AutoGPTQForCausalLM(model, qcfg, tokenizer)
        texts = [str(t) for t in self.calibration]
        total = sum(len(tokenizer(t)["input_ids"]) for t in texts)
        # Samples of the documents' mean length (model_seqlen when given), cut from their
        # concatenation as gptq-core's calibration does (docs/DESIGN.md §6).
        longest = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        seqlen = int(getattr(self.quantization_config, "model_seqlen", None) or 0) or min(
            2048, longest, max(8, total // max(1, len(texts))))
        wrapper.quantize(texts, nsamples=max(1, total // seqlen), seqlen=seqlen, progress=False)
        for layer in wrapper.quant_linears().values():
            layer.bind(act_dtype=model.dtype if model.dtype in (torch.float16, torch.bfloat16) else torch.float32,
                       backend=self.backend)
        self.gptq_core = qcfg
        self.quantization_config = GptqCoreConfig(qcfg, backend=self.backend)
        model.quantize_config = qcfg
        model.config.quantization_config = self.quantization_config
        return model

    def get_state_dict_and_metadata(self, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors ``save_quantized`` writes (packed layers under their separate names, tied
        copies dropped), the non-quantized ones in the model's dtype (which save_pretrained
        records in config.json)."""
        from ..checkpoint.save import checkpoint_names, packed_weights_of, quantized_state_dict

        packed = packed_weights_of(model, None)
        return checkpoint_names(model, quantized_state_dict(model, packed, self.gptq_core, None)), {}

    @property
    def is_trainable(self) -> bool:
        return True

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True


class UnsupportedTransformersQuantizer(HfQuantizer):
    """Registered outside :data:`SUPPORTED` (when optimum is not installed either): loading a
    GPTQ checkpoint then fails with one line naming the versions, not an ImportError about
    optimum."""

    requires_calibration = False

    def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
        raise GPTQError(unsupported_message())

    # transformers 4 declares these abstract; never reached (``__init__`` raises).
    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:  # pragma: no cover
        return None

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> None:  # pragma: no cover
        return None

    @property
    def is_trainable(self) -> bool:  # pragma: no cover - never constructed
        return False

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:  # pragma: no cover
        return False


_ORIGINAL: dict[str, Any] = {}


def register() -> type[HfQuantizer] | None:
    """Serve ``quant_method: "gptq"`` in transformers by gptq-core (idempotent); returns the
    quantizer class registered, or None when transformers' own path was left in place."""
    from transformers.quantizers import auto

    mapping = auto.AUTO_QUANTIZER_MAPPING
    _ORIGINAL.setdefault(METHOD, mapping.get(METHOD))
    if is_supported():
        mapping[METHOD] = GptqCoreHfQuantizer
        return GptqCoreHfQuantizer
    try:
        metadata.version("optimum")
        return None  # optimum's GPTQ path may work with this transformers: leave it alone
    except metadata.PackageNotFoundError:
        mapping[METHOD] = UnsupportedTransformersQuantizer
        return UnsupportedTransformersQuantizer


def unregister() -> None:
    """Give "gptq" back to transformers' own quantizer (optimum/gptqmodel)."""
    from transformers.quantizers import auto

    if _ORIGINAL.get(METHOD) is not None:
        auto.AUTO_QUANTIZER_MAPPING[METHOD] = _ORIGINAL[METHOD]


def _register_if_pending() -> None:
    """Importing this module first imports transformers' quantizer table, whose import hook
    (``gptq_core.integrations.install``) then finds this module half-initialised and leaves
    the registration to it."""
    from . import take_pending

    if take_pending():
        register()


_register_if_pending()
