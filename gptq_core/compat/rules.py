"""Which GPTQ checkpoints each peer reader loads, as data (docs/COMPATIBILITY.md).

Every rule was read off the reader's own code at the version named in :data:`READERS`; its
``source`` is the file (in that reader's repository) the condition comes from. A rule is a
check name from :data:`gptq_core.compat.evaluate.CHECKS` with its parameter, the reason shown
when it fails and the fix. ``when`` limits a rule to checkpoints whose settings match (a reader
path that only some checkpoints take, e.g. TGI's Marlin path); ``unless`` is the opposite.

The verdicts assume what the readers assume by default: an NVIDIA GPU of compute capability
8.0 or newer with each reader's own kernels installed, tensor parallel size 1, fp16 or bf16
activations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Reader:
    """A program that loads GPTQ checkpoints, at the version its rules were read from."""

    key: str
    name: str
    version: str
    repository: str
    note: str = ""


@dataclass(frozen=True)
class Rule:
    """One condition a reader puts on a checkpoint (see the module docstring)."""

    reader: str
    check: str
    value: Any
    reason: str
    fix: str
    source: str
    when: Mapping[str, tuple] = field(default_factory=lambda: MappingProxyType({}))
    unless: Mapping[str, tuple] = field(default_factory=lambda: MappingProxyType({}))


READERS: tuple[Reader, ...] = (
    Reader("transformers", "transformers/optimum", "transformers 5.17.0, optimum main (83c88b8)",
           "huggingface/transformers, huggingface/optimum",
           "transformers routes GPTQ through optimum and gptqmodel (both must be installed); "
           "gptqmodel's kernels decide"),
    Reader("gptqmodel", "GPTQModel", "7.3.4", "ModelCloud/GPTQModel"),
    Reader("autogptq", "AutoGPTQ", "0.8.0.dev0 (main 9f7d370, archived)", "AutoGPTQ/AutoGPTQ"),
    Reader("vllm", "vLLM", "0.33.0", "vllm-project/vllm"),
    Reader("sglang", "SGLang", "0.5.23", "sgl-project/sglang",
           "on CUDA only the gptq_marlin method is registered for GPTQ checkpoints"),
    Reader("tgi", "TGI", "3.3.7", "huggingface/text-generation-inference",
           "Marlin for sym 4/8-bit with group -1/32/64/128, else ExLlama (4-bit) or Triton"),
    Reader("exllamav2", "ExLlamaV2", "0.2.7", "turboderp/exllamav2"),
)

READER_KEYS: tuple[str, ...] = tuple(r.key for r in READERS)

#: The group sizes the Marlin kernels of vLLM, SGLang and TGI take.
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
#: The widest group-size list among GPTQModel's GPTQ kernels (its torch kernel).
GPTQMODEL_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
#: The settings TGI serves through its Marlin kernel (layers/marlin/gptq.py can_use_gptq_marlin).
TGI_MARLIN = MappingProxyType({"sym": (True,), "bits": (4, 8), "group_size": MARLIN_GROUP_SIZES})

_V2_FIX = "save with --format gptq (v1)"
_ASYM_FIX = "quantize symmetric (drop --asym)"
_ACT_FIX = "quantize without --desc-act, or with --desc-act --static-groups (written as desc_act: false)"

RULES: tuple[Rule, ...] = (
    # transformers 5.17 + optimum: GPTQConfig.post_init, then gptqmodel's hf_select_quant_linear_v2
    Rule("transformers", "bits", (2, 3, 4, 8), "GPTQConfig takes bits 2/3/4/8 only",
         "quantize to 2, 3, 4 or 8 bits",
         "transformers: src/transformers/utils/quantization_config.py (GPTQConfig.post_init)"),
    Rule("transformers", "formats", ("gptq", "gptq_v2"), "checkpoint_format must be gptq or gptq_v2",
         _V2_FIX, "optimum: optimum/gptq/quantizer.py (format -> gptqmodel FORMAT)"),
    Rule("transformers", "group_sizes", GPTQMODEL_GROUP_SIZES,
         "no gptqmodel kernel takes this group size", "use group size -1, 16, 32, 64, 128, 256, 512 or 1024",
         "gptqmodel: gptqmodel/nn_modules/qlinear/torch.py (SUPPORTS_GROUP_SIZE)"),
    # GPTQModel 7.3.4
    Rule("gptqmodel", "bits", (2, 3, 4, 5, 6, 7, 8), "no GPTQ kernel takes this bit width",
         "quantize to 2, 3, 4 or 8 bits", "gptqmodel/nn_modules/qlinear/torch.py (SUPPORTS_BITS)"),
    Rule("gptqmodel", "group_sizes", GPTQMODEL_GROUP_SIZES,
         "no GPTQ kernel takes this group size", "use group size -1, 16, 32, 64, 128, 256, 512 or 1024",
         "gptqmodel/nn_modules/qlinear/torch.py (SUPPORTS_GROUP_SIZE); utils/importer.py select_quant_linear"),
    Rule("gptqmodel", "asym_v1_producer", ("gptqmodel", "0.9.0"),
         "refuses sym=False with format gptq unless meta.quantizer names gptqmodel >= 0.9.0",
         "save asymmetric checkpoints with --format gptq_v2 for GPTQModel",
         "gptqmodel/models/loader.py (sym=False v1 check); gptqmodel/quantization/config.py is_quantized_by_gptaq"),
    # AutoGPTQ main (archived)
    Rule("autogptq", "formats", ("gptq", "marlin"), "knows checkpoint_format gptq and marlin only",
         _V2_FIX, "auto_gptq/quantization/config.py (BaseQuantizeConfig.from_quant_config)"),
    Rule("autogptq", "bits", (2, 3, 4, 8), "takes bits 2/3/4/8 only", "quantize to 2, 3, 4 or 8 bits",
         "auto_gptq/quantization/config.py (bits choices)"),
    Rule("autogptq", "k_multiple", 32, "sizes qweight as in_features // 32 * bits rows",
         "keep in_features a multiple of 32", "auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py (buffers)"),
    Rule("autogptq", "n_multiple", 32, "sizes qzeros as out_features // 32 * bits columns",
         "keep out_features a multiple of 32", "auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py (buffers)"),
    # vLLM 0.33.0: every GPTQ checkpoint goes through AutoGPTQConfig (Marlin-family kernels)
    Rule("vllm", "bits", (4, 8), "serves GPTQ at 4 and 8 bits only", "quantize to 4 or 8 bits",
         "vllm/model_executor/layers/quantization/auto_gptq.py (AutoGPTQConfig.TYPE_MAP)"),
    Rule("vllm", "sym", True, "serves symmetric GPTQ only (sym=False is an unsupported config)", _ASYM_FIX,
         "vllm/model_executor/layers/quantization/auto_gptq.py (AutoGPTQConfig.TYPE_MAP)"),
    Rule("vllm", "no_act_order", True, "refuses desc_act=True with groups (g_idx is discarded)", _ACT_FIX,
         "vllm/model_executor/layers/quantization/utils/gptq_utils.py (normalize_and_validate_gptq_desc_act)"),
    Rule("vllm", "group_sizes", MARLIN_GROUP_SIZES, "Marlin takes group size -1/32/64/128 only",
         "use group size -1, 32, 64 or 128",
         "vllm/model_executor/layers/quantization/utils/marlin_utils.py (verify_marlin_supported)"),
    Rule("vllm", "k_divisible_by_group", True, "needs in_features divisible by the group size",
         "choose a group size that divides every layer's in_features",
         "vllm/model_executor/kernels/linear/mixed_precision/marlin.py (can_implement); "
         "auto_gptq.py (scales of input_size // group_size)"),
    Rule("vllm", "k_multiple", "pack", "sizes qweight as in_features // (32 / bits) rows",
         "keep in_features a multiple of 32 / bits",
         "vllm/model_executor/layers/quantization/auto_gptq.py (create_weights)"),
    Rule("vllm", "n_multiple", "pack", "sizes qzeros as out_features // (32 / bits) columns",
         "keep out_features a multiple of 32 / bits",
         "vllm/model_executor/layers/quantization/auto_gptq.py (create_weights)"),
    # SGLang 0.5.23 on CUDA: gptq_marlin only
    Rule("sglang",
         "bits", (4, 8), "converts GPTQ to gptq_marlin at 4 and 8 bits only; plain gptq is not registered on CUDA",
         "quantize to 4 or 8 bits",
         "python/sglang/srt/layers/quantization/gptq/gptq.py (GPTQMarlinConfig); quantization/__init__.py"),
    Rule("sglang", "sym", True, "gptq_marlin serves symmetric GPTQ only", _ASYM_FIX,
         "python/sglang/srt/layers/quantization/gptq/gptq.py (GPTQMarlinConfig.TYPE_MAP)"),
    Rule("sglang", "group_sizes", MARLIN_GROUP_SIZES, "Marlin takes group size -1/32/64/128 only",
         "use group size -1, 32, 64 or 128",
         "python/sglang/srt/layers/quantization/marlin_utils.py (MARLIN_SUPPORTED_GROUP_SIZES)"),
    Rule("sglang",
         "tile_shapes", ((128, 64),), "Marlin needs in_features % 128 == 0 and out_features % 64 == 0",
         "use a model whose linear shapes are multiples of 128",
         "python/sglang/srt/layers/quantization/marlin_utils.py (verify_marlin_supports_shape)"),
    Rule("sglang", "k_divisible_by_group", True, "needs in_features divisible by the group size",
         "choose a group size that divides every layer's in_features",
         "python/sglang/srt/layers/quantization/marlin_utils.py (verify_marlin_supports_shape)"),
    # TGI 3.3.7
    Rule("tgi", "bits", (2, 4, 8), "its Triton kernel (the only one for 3-bit) takes 2/4/8 bits",
         "quantize to 2, 4 or 8 bits", "server/text_generation_server/layers/gptq/triton.py (QuantLinear)"),
    Rule("tgi", "k_multiple", "pack", "derives in_features from the qweight rows (rows * 32 / bits)",
         "keep in_features a multiple of 32 / bits",
         "server/text_generation_server/layers/marlin/gptq.py (repack_gptq_for_marlin); layers/gptq/exllamav2.py"),
    Rule("tgi", "formats", ("gptq",),
         "ignores checkpoint_format and reads qzeros as v1 (zero - 1) on its ExLlama/Triton kernels",
         _V2_FIX,
         "server/text_generation_server/utils/quantization.py (_get_quantizer_config); layers/gptq/__init__.py",
         unless=TGI_MARLIN),
    Rule("tgi", "tile_shapes", ((128, 64), (64, 128)),
         "the GPTQ Marlin kernel needs (in, out) divisible by (128, 64) or (64, 128)",
         "use a model whose linear shapes are multiples of 128",
         "server/text_generation_server/layers/marlin/gptq.py (_check_valid_shape)", when=TGI_MARLIN),
    Rule("tgi",
         "k_divisible_by_group", True, "Marlin repacking needs in_features divisible by the group size",
         "choose a group size that divides every layer's in_features",
         "server/text_generation_server/layers/marlin/gptq.py (repack_gptq_for_marlin)", when=TGI_MARLIN),
    # ExLlamaV2 0.2.7
    Rule("exllamav2", "bits", (4,), "reads GPTQ tensors as 4-bit only", "quantize to 4 bits",
         "exllamav2/exllamav2_ext/cuda/q_matrix.cu (MatrixView_q4); exllamav2/ext.py make_q_matrix"),
    Rule("exllamav2", "group_pow2", True, "infers the group size as a power of two from the scales' rows",
         "use group size -1 or a power of two (32, 64, 128)",
         "exllamav2/exllamav2_ext/cuda/q_matrix.cu (gptq_groupsize)"),
    Rule("exllamav2", "k_multiple", "pack", "takes in_features as qweight rows * 8",
         "keep in_features a multiple of 8", "exllamav2/ext.py (make_q_matrix)"),
    Rule("exllamav2", "n_multiple", "pack", "reads qzeros as 8 values per word along out_features",
         "keep out_features a multiple of 8", "exllamav2/exllamav2_ext/cuda/q_matrix.cu (MatrixView_q4_row)"),
)


def rules_of(reader: str) -> tuple[Rule, ...]:
    """The rules of one reader, in table order."""
    return tuple(r for r in RULES if r.reader == reader)
