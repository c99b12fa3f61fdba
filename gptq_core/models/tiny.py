"""Tiny random models of every listed architecture, built from transformers' config classes.

For tests and demos: no download, a few thousand parameters, two layers, a vocabulary of 128;
plus the float reference a quantized tiny model is compared with.
:data:`COMMON` holds the sizes every family shares (only the fields a config class knows are
passed); :data:`OVERRIDES` what a family needs beyond them to build and run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from ..format import PackedWeight

VOCAB = 128

#: Sizes shared by every tiny model; a config class receives only the fields it defines.
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=48, head_dim=8, max_position_embeddings=64,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=16, n_shared_experts=1,
    first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, ffn_dim=48, word_embed_proj_dim=32,
    n_inner=48, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

_MLA = dict(num_key_value_heads=4)  # multi-head latent attention has no grouped KV heads

#: What a family needs beyond COMMON (field names of its config class).
OVERRIDES: dict[str, dict[str, Any]] = {
    "gptj": dict(rotary_dim=4),
    "codegen": dict(rotary_dim=4),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "xglm": dict(decoder_start_token_id=2),
    "minicpm3": _MLA,
    "youtu": _MLA,
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
    "glm4_moe_lite": _MLA,
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "qwen3_next": dict(
        layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
    ),
    "ctrl": dict(dff=48),
    "granitemoeshared": dict(shared_intermediate_size=16),
    "llama4_text": dict(interleave_moe_layer_step=2, intermediate_size_mlp=48),
    "dbrx": dict(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2),
    ),
}


def tiny_config(model_type: str, **changes: Any):
    """A transformers config of ``model_type`` with tiny sizes (``changes`` override them).

    Tests assert the result stays tiny (every linear at most 256 wide), so a new family whose
    config names a size differently cannot slip in at full size.
    """
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    known |= set(getattr(cls, "attribute_map", {}))
    kwargs = {k: v for k, v in COMMON.items() if k in known}
    kwargs.update(OVERRIDES.get(model_type, {}))
    kwargs.update(changes)
    return cls(**kwargs)


def tiny_model(
    model_type: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    experts_implementation: str | None = None,
    **changes: Any,
):
    """A random causal LM of ``model_type`` (eval mode) from :func:`tiny_config`.

    ``experts_implementation="eager"`` makes fused MoE experts compute with transformers'
    reference loop (the default grouped matmul has no float64 kernel on the CPU).
    """
    import transformers
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **changes)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # tiny vocabularies trigger token-id warnings
    try:
        torch.manual_seed(seed)
        extra = {"experts_implementation": experts_implementation} if experts_implementation else {}
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.eval()


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: tiny matmuls only lose to thread contention on small CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def with_dequantized_weights(
    model: torch.nn.Module, packed: Mapping[str, PackedWeight], dtype: torch.dtype = torch.float64
) -> torch.nn.Module:
    """``model`` in ``dtype`` with each linear of ``packed`` holding exactly what it dequantizes to.

    The float reference a quantized model is checked against (in place; eval mode).
    """
    model = model.to(dtype)
    for name, weight in packed.items():
        linear = model.get_submodule(name)
        with torch.no_grad():
            linear.weight.copy_(weight.dequantize(torch.float64).t())
            if weight.bias is not None:
                linear.bias.copy_(weight.bias.double())
    return model.eval()
