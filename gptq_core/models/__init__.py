"""Model architectures as data, and the helpers that apply them to a transformers model.

``get_architecture(model)`` finds the :class:`Architecture` of a model (from
``config.model_type``, else from its module tree); ``prepare_model_for_quantization`` makes
every weight GPTQ quantizes an ``nn.Linear`` (fused MoE experts and Conv1D are rewritten);
``decoder_layers`` / ``sequential_groups`` / ``quantized_linear_names`` tell the quantizer what
to quantize in which order; ``replace_with_quant_linear`` prepares a model for loading a
GPTQ checkpoint.
"""

from __future__ import annotations

from .architecture import EXPERT, Architecture, MoE, checkpoint_key, model_key
from .detect import check_model_type_known, get_architecture, infer_architecture, supported_model_types
from .experts import UnfusedExperts, unfuse_experts
from .layers import (
    decoder_layers,
    linear_names,
    outside_modules,
    quantized_linear_names,
    sequential_groups,
    uncovered_linears,
)
from .prepare import apply_packed_weights, prepare_model_for_quantization, replace_with_quant_linear
from .table import ARCHITECTURE_LIST, ARCHITECTURES

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_LIST",
    "EXPERT",
    "Architecture",
    "MoE",
    "UnfusedExperts",
    "apply_packed_weights",
    "check_model_type_known",
    "checkpoint_key",
    "decoder_layers",
    "get_architecture",
    "infer_architecture",
    "linear_names",
    "model_key",
    "outside_modules",
    "prepare_model_for_quantization",
    "quantized_linear_names",
    "replace_with_quant_linear",
    "sequential_groups",
    "supported_model_types",
    "uncovered_linears",
    "unfuse_experts",
]
