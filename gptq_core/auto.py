"""``AutoGPTQForCausalLM``: the ecosystem's API shape over gptq-core's quantizer and checkpoints.

::

    from gptq_core import AutoGPTQForCausalLM, QuantizeConfig

    model = AutoGPTQForCausalLM.from_pretrained("Llama-3-8B", QuantizeConfig(bits=4, group_size=128))
    model.quantize("calibration.txt", nsamples=128, seqlen=2048)
    model.save_quantized("Llama-3-8B-gptq")

    model = AutoGPTQForCausalLM.from_quantized("Llama-3-8B-gptq", device="cuda:0")
    model.generate(**tokenizer("Hello", return_tensors="pt").to("cuda:0"))

The wrapper forwards everything else (``__call__``, ``generate``, ``config``...) to ``.model``,
a normal transformers model whose quantized linears are :class:`QuantLinear`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_quantized, save_quantized
from .checkpoint.configs import check_model_dir
from .checkpoint.files import CONFIG_FILE, QUANTIZE_CONFIG_FILE
from .checkpoint.load import resolve_device, resolve_dtype
from .checkpoint.save import DEFAULT_MAX_SHARD_SIZE
from .config import QuantizeConfig, check_save_dtype
from .errors import CheckpointError, GPTQError
from .format import PackedWeight
from .hub import resolve_model_dir
from .placement import DeviceMap
from .quant_linear import QuantLinear

logger = logging.getLogger("gptq_core")

#: The quantizer's per-module log, written beside the checkpoint's weights.
QUANTIZE_LOG_FILE = "quantize_log.jsonl"


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved in ``model_dir``, or None (with a warning) when it cannot be built.

    A missing tokenizer never stops a model from loading: token ids still work.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - missing files, a missing optional package, ...
        logger.warning("no tokenizer loaded from %s: %s", model_dir, str(exc).splitlines()[0] if str(exc) else exc)
        return None


def is_quantized_checkpoint(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` declares GPTQ quantization (either config file)."""
    path = Path(model_dir)
    if (path / QUANTIZE_CONFIG_FILE).is_file():
        return True
    from .checkpoint.configs import read_json

    return (path / CONFIG_FILE).is_file() and "quantization_config" in read_json(path / CONFIG_FILE)


def load_float_model(
    model_dir: str | Path, torch_dtype: torch.dtype | str = "auto", trust_remote_code: bool = False
) -> nn.Module:
    """A float transformers causal LM from a local folder, safetensors only unless trusted."""
    from transformers import AutoModelForCausalLM

    from .checkpoint.skeleton import REMOTE_CODE_HINT
    from .models import check_model_type_known

    path = check_model_dir(model_dir)
    check_model_type_known(path, trust_remote_code)
    dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) or torch_dtype == "auto" else (
        resolve_dtype(torch_dtype, torch.device("cpu"))
    )
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=None if trust_remote_code else True,
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot load the float model in {path}: {first}; gptq-core reads safetensors weights "
            f"only; {REMOTE_CODE_HINT}"
        ) from None


def check_token_ids(input_ids: torch.Tensor, model: nn.Module) -> None:
    """Token ids outside the embedding table are an error naming the id, not an index fault
    deep inside the embedding (or a silent wrong row on some devices)."""
    if input_ids.numel() == 0 or input_ids.is_floating_point():
        return
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise GPTQError(
            f"input_ids hold token id {bad}, outside the model's vocabulary [0, {vocab}); "
            "encode text with the model's own tokenizer"
        )


def _packed_with_bias(model: nn.Module, name: str, pw: PackedWeight) -> PackedWeight:
    """The packed weight plus the float layer's bias when the quantizer left it out."""
    bias = getattr(model.get_submodule(name), "bias", None)
    if pw.bias is None and isinstance(bias, torch.Tensor):
        pw = pw.replace(bias=bias.detach().to(pw.device, torch.float16).contiguous())
    return pw


class AutoGPTQForCausalLM:
    """A transformers causal LM, its :class:`QuantizeConfig` and its tokenizer, together."""

    def __init__(
        self,
        model: nn.Module,
        quantize_config: QuantizeConfig,
        tokenizer: Any = None,
        model_dir: str | Path | None = None,
    ) -> None:
        self.model = model
        self.quantize_config = quantize_config
        self.tokenizer = tokenizer
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.packed: dict[str, PackedWeight] = {}
        #: ``generate`` goes through :meth:`fast_generate` (``from_quantized(..., fast=True)``).
        self.fast = False
        self.quantize_log: list[dict[str, Any]] = []
        #: Set by ``from_pretrained(..., stream_weights=True)``: reads each decoder layer's float
        #: weights from the shards when the quantizer needs them (:mod:`gptq_core.quantize.streaming`).
        self.stream: Any = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        quantize_config: QuantizeConfig | None = None,
        *,
        torch_dtype: torch.dtype | str = "auto",
        trust_remote_code: bool = False,
        revision: str | None = None,
        stream_weights: bool = False,
    ) -> AutoGPTQForCausalLM:
        """Load a float model (on the CPU) to be quantized with ``quantize_config``; a hub id
        (``org/name``) with ``revision`` is fetched through huggingface_hub's cache.

        ``stream_weights=True`` loads only the modules outside the decoder layers (embeddings,
        final norm, head); :meth:`quantize` then reads each layer's float weights from the
        safetensors shards just before quantizing it and drops them once its packed result is
        kept, so a model larger than host memory quantizes, to the same checkpoint bytes
        (docs/DESIGN.md §6). Until then the layers hold no data (meta device).
        """
        model_dir = resolve_model_dir(model_dir, revision)
        if is_quantized_checkpoint(model_dir):
            raise CheckpointError(
                f"{model_dir} is already a GPTQ checkpoint; load it with "
                "AutoGPTQForCausalLM.from_quantized"
            )
        stream = None
        if stream_weights:
            from .quantize.streaming import load_streamed_model

            model, stream = load_streamed_model(check_model_dir(model_dir), torch_dtype, trust_remote_code)
        else:
            model = load_float_model(model_dir, torch_dtype, trust_remote_code)
        model.eval()
        tokenizer = load_tokenizer(model_dir, trust_remote_code)
        wrapper = cls(model, quantize_config or QuantizeConfig(), tokenizer, model_dir)
        wrapper.stream = stream
        return wrapper

    @classmethod
    def from_quantized(
        cls,
        model_dir: str | Path,
        device: torch.device | str | None = "cpu",
        backend: str | None = "auto",
        torch_dtype: torch.dtype | str = "auto",
        trust_remote_code: bool = False,
        backend_options: Mapping[str, Mapping[str, Any]] | None = None,
        fuse: bool = True,
        fast: bool = False,
        verify: bool = True,
        *,
        revision: str | None = None,
        device_map: DeviceMap | None = None,
        max_memory: Mapping[int | str, int | str] | None = None,
        offload_folder: str | Path | None = None,
        progress: bool | None = None,
        training_options: Mapping[str, Any] | None = None,
    ) -> AutoGPTQForCausalLM:
        """Load a GPTQ checkpoint (this project's or a peer's), every layer bound to a backend.

        ``model_dir`` is a folder or a hub id (``org/name``, with ``revision``: a branch, tag
        or commit), fetched through huggingface_hub's cache (``HF_HUB_OFFLINE=1`` reads only
        the cache). ``device_map`` ("auto", "balanced", a device or {module: device}, with
        ``max_memory``) places the model through accelerate instead of ``device``: each layer
        is bound on the device it lands on, "cpu" layers run on the CPU, "disk" layers are kept
        in ``offload_folder`` and read per call (``gptq_core.placement``). ``progress`` shows a
        loading bar (None: for large checkpoints on a terminal).

        ``backend_options`` tunes backends by name, e.g. ``{"marlin": {"dense_cache_mb": 512}}``
        (``gptq backends list --options`` lists them); unknown names are an error.
        ``fuse=False`` keeps q/k/v and gate/up as separate matmuls (see ``load_quantized``).
        ``fast=True`` makes :meth:`generate` use gptq-core's decode path (:meth:`fast_generate`).
        ``verify=False`` skips checking the weights against ``gptq_manifest.json`` (faster).
        ``training_options`` (:class:`gptq_core.training.TrainingOptions`, e.g.
        ``{"dequant_cache_mb": 4096}``) tunes the backward pass that LoRA training runs.
        """
        from .training import TrainingOptions, configure_training

        training = TrainingOptions.of(training_options) if training_options is not None else None
        path = resolve_model_dir(model_dir, revision)
        model = load_quantized(path, device, backend, torch_dtype, trust_remote_code,
                               backend_options=backend_options, fuse=fuse, verify=verify,
                               device_map=device_map, max_memory=max_memory,
                               offload_folder=offload_folder, progress=progress)
        if training is not None:
            configure_training(model, training)
        wrapper = cls(model, model.quantize_config, load_tokenizer(path, trust_remote_code), path)
        wrapper.fast = fast
        return wrapper

    # ------------------------------------------------------------------ quantization
    def quantize(
        self,
        calibration: Any,
        nsamples: int = 128,
        seqlen: int = 2048,
        seed: int = 0,
        device: torch.device | str | None = None,
        work_dir: str | Path | None = None,
        progress: bool = True,
        tokenizer: Any = None,
        batch_size: int | None = None,
        devices: Sequence[torch.device | str] | str | None = None,
    ) -> AutoGPTQForCausalLM:
        """Quantize every decoder linear with GPTQ, layer by layer, on ``calibration``.

        ``calibration`` is anything :func:`prepare_calibration` takes (a text/JSONL file, strings,
        token ids) or a ready [nsamples, seqlen] LongTensor. ``work_dir`` makes the run
        resumable: rerun with the same folder after a crash to continue where it stopped.
        ``batch_size``: calibration samples per forward (default: the driver's measured
        ``DEFAULT_BATCH_SIZE``; a smaller one lowers peak memory). ``devices``: identical devices
        to spread each layer's work over (``"cuda:0,cuda:1"`` or a list), with the bytes of the
        first alone (docs/DESIGN.md §6). Afterwards the linears are :class:`QuantLinear` and the
        model runs quantized.
        """
        from .models import (
            apply_packed_weights,
            decoder_layers,
            get_architecture,
            prepare_model_for_quantization,
            sequential_groups,
        )
        from .quantize import prepare_calibration, quantize_model
        from .quantize.driver import DEFAULT_BATCH_SIZE

        if any(isinstance(m, QuantLinear) for m in self.model.modules()):
            raise GPTQError("this model is already quantized; load the float model to quantize again")
        if batch_size is not None and batch_size < 1:
            raise GPTQError(f"batch_size={batch_size} must be >= 1 (calibration samples per forward)")
        if isinstance(calibration, torch.Tensor) and calibration.dim() == 2 and not calibration.is_floating_point():
            samples = calibration.long()
        else:
            samples = prepare_calibration(calibration, tokenizer or self.tokenizer, nsamples, seqlen, seed)
        arch = get_architecture(self.model)
        prepare_model_for_quantization(self.model, arch)
        layers = decoder_layers(self.model, arch)
        dev = resolve_device(device) if device is not None else None
        options: dict[str, Any] = {}
        if self.stream is not None:
            options["layer_source"] = self.stream.source(
                lambda index, layer: [n for g in sequential_groups(layer, arch) for n in g]
            )
        result = quantize_model(
            self.model, samples, self.quantize_config, layers,
            lambda index, layer: sequential_groups(layer, arch),
            device=dev, work_dir=work_dir, progress=progress,
            batch_size=batch_size or DEFAULT_BATCH_SIZE, devices=devices, **options,
        )
        self.quantize_log = list(getattr(result, "records", []))
        zero_format = self.quantize_config.zero_format
        self.packed = {
            n: _packed_with_bias(self.model, n, pw).to_format(zero_format) for n, pw in dict(result).items()
        }
        apply_packed_weights(self.model, self.packed)
        self.stream = None  # every layer now holds its packed weights and float norms
        return self

    # ------------------------------------------------------------------ saving
    def save_quantized(
        self,
        out_dir: str | Path,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        *,
        overwrite: bool = False,
        torch_dtype: torch.dtype | None = torch.float16,
        extra_files: Mapping[str, str | Path | bytes] | None = None,
    ) -> Path:
        """Write the GPTQ checkpoint folder (atomically); see :func:`gptq_core.checkpoint.save_quantized`.

        After :meth:`quantize`, the per-module log (error, damp used, seconds) is written
        beside the weights as ``quantize_log.jsonl``.
        """
        torch_dtype = check_save_dtype(torch_dtype)
        extra = dict(extra_files or {})
        if self.quantize_log and QUANTIZE_LOG_FILE not in extra:
            extra[QUANTIZE_LOG_FILE] = "".join(json.dumps(r) + "\n" for r in self.quantize_log).encode()
        return save_quantized(
            self.model, self.packed or None, self.quantize_config, out_dir,
            tokenizer=self.tokenizer, max_shard_size=max_shard_size, overwrite=overwrite,
            torch_dtype=torch_dtype, source_dir=self.model_dir, extra_files=extra,
        )

    # ------------------------------------------------------------------ running
    @property
    def device(self) -> torch.device:
        for t in self.model.parameters():
            return t.device
        return torch.device("cpu")

    def quant_linears(self) -> dict[str, QuantLinear]:
        """Every quantized layer by full module name."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, QuantLinear)}

    def to(self, device: torch.device | str) -> AutoGPTQForCausalLM:
        self.model.to(device)
        return self

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """transformers' ``generate``; with ``fast=True`` at load, gptq-core's decode path."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            check_token_ids(ids, self.model)
        if self.fast:
            return self.fast_generate(*args, **kwargs)
        return self.model.generate(*args, **kwargs)

    def fast_generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Decode with gptq-core's static-cache path, the whole step (sampling included) in one
        CUDA graph on GPUs (docs/DESIGN.md §11); it falls back to ``generate`` with the reason
        for models whose attention it cannot serve. Keyword arguments as in
        :meth:`gptq_core.generation.FastGenerator.generate`."""
        from .generation import fast_generate

        return fast_generate(self.model, input_ids, attention_mask, **kwargs)

    def __getattr__(self, name: str):
        if name in ("model", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"AutoGPTQForCausalLM({self.quantize_config!r},\n{self.model!r})"


def load_for_inference(
    model_dir: str | Path,
    device: torch.device | str | None = None,
    backend: str | None = "auto",
    torch_dtype: torch.dtype | str = "auto",
    trust_remote_code: bool = False,
    backend_options: Mapping[str, Mapping[str, Any]] | None = None,
    fuse: bool = True,
    verify: bool = True,
    *,
    revision: str | None = None,
    device_map: DeviceMap | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a GPTQ checkpoint, or of a float model folder for comparison;
    ``model_dir`` may be a hub id with ``revision``, placed by ``device_map`` as in
    :meth:`AutoGPTQForCausalLM.from_quantized`."""
    path = resolve_model_dir(model_dir, revision)
    if is_quantized_checkpoint(path):
        model = load_quantized(path, None if device_map is not None else resolve_device(device), backend,
                               torch_dtype, trust_remote_code, backend_options=backend_options, fuse=fuse,
                               verify=verify, device_map=device_map, max_memory=max_memory,
                               offload_folder=offload_folder)
    elif device_map is not None:
        raise GPTQError(
            f"{path} is a float model; device_map places GPTQ checkpoints only: load it with --device"
        )
    else:
        dev = resolve_device(device)
        model = load_float_model(path, resolve_dtype(torch_dtype, dev), trust_remote_code).to(dev).eval()
    return model, load_tokenizer(path, trust_remote_code)
