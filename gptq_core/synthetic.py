"""Random-weight Llama models of real shapes, and their 4-bit checkpoints, built offline.

No large real model can be downloaded where the project is benchmarked, and speed depends on
shapes, not on weight values: ``build_synthetic("llama-2-7b", out_dir)`` writes a float model of
Llama-2-7B's exact shapes (random weights, the real Llama-2 tokenizer shipped in
``gptq_core/data/llama2-tokenizer``) and its RTN 4-bit g128 symmetric GPTQ checkpoint written by
:func:`gptq_core.checkpoint.save_quantized`, the same path users' checkpoints take
(docs/DESIGN.md §9, §11). The model is built directly on the target device, each weight drawn
there from one seeded generator, so a 7B pair takes seconds of GPU work and the float weights
exist once.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import save_quantized
from .checkpoint.files import QUANTIZE_CONFIG_FILE
from .config import QuantizeConfig
from .errors import GPTQError
from .format import PackedWeight, pack_weight
from .rtn import minmax_params, quantize_rtn, quantize_values

#: The shipped tokenizer used for prompt text of every synthetic model.
TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "llama2-tokenizer"

#: ``quantize_config.json`` meta key naming the float model a checkpoint was made from
#: (relative to the checkpoint folder); ``gptq bench generate`` times that model beside it.
FLOAT_MODEL_KEY = "float_model"

#: Standard deviation of every random weight matrix (Llama's initializer_range).
INIT_STD = 0.02


@dataclass(frozen=True)
class Shape:
    """The config fields that decide a Llama model's shapes and decode cost."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    rope_theta: float
    bos: int
    eos: int


#: The shapes the benchmarks use (docs/DESIGN.md §9). ``llama-3-70b-layers`` keeps Llama-3-70B's
#: layer shapes with 4 of its 80 layers, so it fits one GPU and builds fast.
SHAPES: dict[str, Shape] = {
    "llama-2-7b": Shape(4096, 11008, 32, 32, 32, 32000, 4096, 10000.0, 1, 2),
    "llama-3-8b": Shape(4096, 14336, 32, 32, 8, 128256, 8192, 500000.0, 128000, 128001),
    "llama-3-70b-layers": Shape(8192, 28672, 4, 64, 8, 128256, 8192, 500000.0, 128000, 128001),
}

#: How the synthetic checkpoint is quantized (the ecosystem's default).
SYNTHETIC_QUANTIZATION = QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False)


@dataclass(frozen=True)
class SyntheticPair:
    """Where a build put its float model and its GPTQ checkpoint."""

    name: str
    float_dir: Path
    quantized_dir: Path
    seconds: float


def shape_of(shape: str | Shape) -> Shape:
    if isinstance(shape, Shape):
        return shape
    if shape not in SHAPES:
        raise GPTQError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[shape]


def llama_config(shape: str | Shape, layers: int | None = None, dtype: torch.dtype = torch.float16):
    """The transformers ``LlamaConfig`` of ``shape`` (a name of :data:`SHAPES` or a
    :class:`Shape`), optionally with fewer layers."""
    from transformers import LlamaConfig

    s = shape_of(shape)
    if layers is not None and layers < 1:
        raise GPTQError(f"layers={layers} must be >= 1")
    return LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=layers or s.layers, num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads, max_position_embeddings=s.max_positions,
        rms_norm_eps=1e-5, rope_theta=s.rope_theta, bos_token_id=s.bos, eos_token_id=s.eos,
        tie_word_embeddings=False, initializer_range=INIT_STD, dtype=dtype,
    )


def random_model(config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``config`` allocated on ``device`` and filled there: matrices
    from N(0, 0.02^2), norms at one, one seeded generator, module by module."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, INIT_STD, generator=generator)
    return model.eval()


def rtn_on_device(weight: torch.Tensor, config: QuantizeConfig = SYNTHETIC_QUANTIZATION) -> PackedWeight:
    """:func:`gptq_core.rtn.quantize_rtn`'s result, computed on the weight's device for all
    groups at once (quantize_rtn loops over groups on the CPU, minutes for a 7B model)."""
    n, k = weight.shape
    size = config.group_size
    if size == -1 or k % size:
        return quantize_rtn(weight.cpu(), config.bits, config.group_size, config.sym,
                            zero_format=config.zero_format).to(weight.device)
    groups = k // size
    w = weight.detach().float().view(n, groups, size)
    floor = 1 if config.zero_format == "v1" and not config.sym else 0
    scale, zero = minmax_params(w.transpose(0, 1).reshape(groups * n, size), config.bits, config.sym, floor)
    scale, zero = scale.view(groups, n), zero.view(groups, n)
    q = quantize_values(w, scale.t()[:, :, None], zero.t()[:, :, None], config.bits).view(n, k)
    return pack_weight(q.to(torch.int32), scale, zero.to(torch.int32), bits=config.bits,
                       group_size=size, sym=config.sym, desc_act=False, zero_format=config.zero_format)


def write_rtn_checkpoint(
    model: nn.Module, tokenizer, out_dir: str | Path, float_dir: str | Path, overwrite: bool = False
) -> Path:
    """Quantize every decoder linear of the float ``model`` by RTN (4-bit g128 sym) on its
    device and write the GPTQ checkpoint with :func:`save_quantized`, recording ``float_dir``
    (relative when it is a sibling) as the model it was made from."""
    from .models import get_architecture, quantized_linear_names

    out, source = Path(out_dir), Path(float_dir)
    names = quantized_linear_names(model, get_architecture(model))
    packed = {n: rtn_on_device(model.get_submodule(n).weight) for n in names}
    where = f"../{source.name}" if source.parent.resolve() == out.parent.resolve() else str(source.resolve())
    qconfig = SYNTHETIC_QUANTIZATION.replace(meta={FLOAT_MODEL_KEY: where})
    return save_quantized(model, packed, qconfig, out, tokenizer=tokenizer, overwrite=overwrite,
                          source_dir=source)


def build_synthetic(
    shape: str | Shape,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str | None = None,
    layers: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    reuse: bool = False,
) -> SyntheticPair:
    """Write ``out_dir/<shape>-float`` and ``out_dir/<shape>-gptq-4bit-g128``; see the module doc.

    ``shape`` is a name of :data:`SHAPES` or a :class:`Shape` (tests use a small one);
    ``layers`` overrides the number of decoder layers. Existing folders are replaced only with
    ``overwrite=True``, or returned as they are with ``reuse=True`` when both are complete.
    """
    from transformers import AutoTokenizer

    from .checkpoint.load import resolve_device

    start = time.perf_counter()
    dev = resolve_device(device)
    config = llama_config(shape, layers, dtype)
    name = shape if isinstance(shape, str) else "llama-custom"
    tag = name if layers is None else f"{name}-{layers}layers"
    out = Path(out_dir)
    float_dir, quant_dir = out / f"{tag}-float", out / f"{tag}-gptq-4bit-g128"
    if reuse and (float_dir / "config.json").is_file() and (quant_dir / QUANTIZE_CONFIG_FILE).is_file():
        return SyntheticPair(tag, float_dir, quant_dir, 0.0)
    for folder in (float_dir, quant_dir):
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise GPTQError(f"{folder} exists and is not empty; pass overwrite=True or another out_dir")
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    model = random_model(config, dev, dtype, seed)
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.do_sample = False

    partial = float_dir.with_name(float_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    shutil.rmtree(float_dir, ignore_errors=True)
    partial.rename(float_dir)

    write_rtn_checkpoint(model, tokenizer, quant_dir, float_dir, overwrite=overwrite)
    return SyntheticPair(tag, float_dir, quant_dir, time.perf_counter() - start)


def float_model_of(checkpoint_dir: str | Path) -> Path | None:
    """The float model folder a GPTQ checkpoint records it was made from, if it still exists."""
    from .checkpoint import read_quantize_config

    folder = Path(checkpoint_dir)
    try:
        source = read_quantize_config(folder).meta.get(FLOAT_MODEL_KEY)
    except GPTQError:
        return None
    if not source:
        return None
    path = (folder / source).resolve() if not Path(source).is_absolute() else Path(source)
    return path if (path / "config.json").is_file() else None
