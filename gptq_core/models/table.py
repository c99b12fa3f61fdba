"""The architecture table: one :class:`Architecture` per decoder family, keyed by model_type.

Data only. Module names are those of transformers 5 (checked by tests/test_architectures.py
against a tiny random model of every type). Groups list the linears of a decoder layer in
true-sequential order: what reads the layer input, then what reads those outputs, and so on;
names a layer lacks are dropped for that layer, so one family entry serves dense and MoE
layers, with or without optional projections. ``{expert}`` expands to every expert index.
"""

from __future__ import annotations

from .architecture import Architecture, MoE

# ---------------------------------------------------------------- shared pieces (data)
_ROPE_OUTSIDE = ("model.embed_tokens", "model.rotary_emb", "model.norm")

_ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_ATTN_O = ("self_attn.o_proj",)
_MLP_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_MLP_DOWN = ("mlp.down_proj",)
_LLAMA_GROUPS = (_ATTN_QKV, _ATTN_O, _MLP_GATE_UP, _MLP_DOWN)

# Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3): low-rank q and kv, then their ups.
_MLA_IN = ("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")
_MLA_UP = ("self_attn.q_b_proj", "self_attn.kv_b_proj")

# DeepSeek-style MoE block: a dense MLP in the first layers, routed + shared experts later.
_DS_EXPERTS = MoE(experts="mlp.experts", expert="mlp.experts.{expert}")
_DS_MOE_IN = (
    "mlp.gate_proj", "mlp.up_proj",
    "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
    "mlp.experts.{expert}.gate_proj", "mlp.experts.{expert}.up_proj",
)
_DS_MOE_OUT = ("mlp.down_proj", "mlp.shared_experts.down_proj", "mlp.experts.{expert}.down_proj")

# Qwen-MoE block: one (gated) shared expert, routed experts, optional dense layers.
_QWEN_MOE_IN = (
    "mlp.gate_proj", "mlp.up_proj",
    "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
    "mlp.experts.{expert}.gate_proj", "mlp.experts.{expert}.up_proj",
)
_QWEN_MOE_OUT = ("mlp.down_proj", "mlp.shared_expert.down_proj", "mlp.experts.{expert}.down_proj")

# Mixtral naming: experts w1 (gate), w3 (up), w2 (down); checkpoints say block_sparse_moe.
_MIXTRAL_EXPERTS = MoE(
    experts="mlp.experts", expert="mlp.experts.{expert}", gate="w1", up="w3", down="w2"
)
_MIXTRAL_GROUPS = (
    _ATTN_QKV, _ATTN_O,
    ("mlp.experts.{expert}.w1", "mlp.experts.{expert}.w3"),
    ("mlp.experts.{expert}.w2",),
)
_MIXTRAL_RENAMES = ((".mlp.", ".block_sparse_moe."),)

# GPT-2 style blocks (fused qkv c_attn, Conv1D in GPT-2 / OpenAI GPT, Linear in BigCode).
_GPT2_GROUPS = (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))
# Falcon / BLOOM / GPT-NeoX / Persimmon fused query_key_value blocks.
_NEOX_MLP = (("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",))
# OPT-style blocks (OPT, XGLM, BioGPT): attention projections and fc1/fc2 on the layer.
_OPT_GROUPS = (_ATTN_QKV, ("self_attn.out_proj",), ("fc1",), ("fc2",))
# LFM2: short-convolution layers (conv.in_proj/out_proj) alternate with attention layers.
_LFM2_ATTN = (
    ("conv.in_proj", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("conv.out_proj", "self_attn.out_proj"),
)

# Fusion groups: linears the modeling code calls with one input tensor (checked against every
# family's forward by tests/test_fusion.py); gptq_core.fusion serves each by one matmul.
_FUSE_QKV = (_ATTN_QKV,)
_FUSE_LLAMA = (_ATTN_QKV, _MLP_GATE_UP)
_LFM2_GATE_UP = ("feed_forward.w1", "feed_forward.w3")
_SHARED_EXPERT_GATE_UP = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
_SHARED_EXPERTS_GATE_UP = ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")


ARCHITECTURE_LIST: tuple[Architecture, ...] = (
    # ------------------------------------------------------------------ dense, Llama-like
    Architecture(
        name="llama",
        model_types=(
            "llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
            "vaultgemma", "stablelm", "olmo", "olmo2", "olmo3", "cohere", "cohere2", "granite",
            "exaone4", "helium", "ernie4_5", "hunyuan_v1_dense", "smollm3", "seed_oss",
            "diffllama",
        ),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=_LLAMA_GROUPS,
        fusion_groups=_FUSE_LLAMA,
    ),
    Architecture(
        name="ungated-mlp",  # Nemotron, Apertus, Arcee, Jais2: up_proj -> act -> down_proj
        model_types=("nemotron", "apertus", "arcee", "jais2"),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(_ATTN_QKV, _ATTN_O, ("mlp.up_proj",), _MLP_DOWN),
        fusion_groups=_FUSE_QKV,
    ),
    Architecture(
        name="nanochat",
        model_types=("nanochat",),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(_ATTN_QKV, _ATTN_O, ("mlp.fc1",), ("mlp.fc2",)),
        fusion_groups=_FUSE_QKV,
    ),
    Architecture(
        name="starcoder2",
        model_types=("starcoder2",),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(_ATTN_QKV, _ATTN_O, ("mlp.c_fc",), ("mlp.c_proj",)),
        fusion_groups=_FUSE_QKV,
    ),
    Architecture(
        name="phi",
        model_types=("phi",),
        layers="model.layers",
        outside=("model.embed_tokens", "model.rotary_emb", "model.embed_dropout", "model.final_layernorm"),
        groups=(_ATTN_QKV, ("self_attn.dense",), ("mlp.fc1",), ("mlp.fc2",)),
        fusion_groups=_FUSE_QKV,
    ),
    Architecture(
        name="phi3",
        model_types=("phi3",),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(("self_attn.qkv_proj",), _ATTN_O, ("mlp.gate_up_proj",), _MLP_DOWN),
    ),
    Architecture(
        name="glm",
        model_types=("glm", "glm4"),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(_ATTN_QKV, _ATTN_O, ("mlp.gate_up_proj",), _MLP_DOWN),
        fusion_groups=_FUSE_QKV,
    ),
    Architecture(
        name="mla",  # dense multi-head latent attention
        model_types=("minicpm3", "youtu"),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(_MLA_IN, _MLA_UP, _ATTN_O, _MLP_GATE_UP, _MLP_DOWN),
        fusion_groups=(_MLA_IN, _MLP_GATE_UP),
    ),
    Architecture(
        name="lfm2",
        model_types=("lfm2",),
        layers="model.layers",
        outside=("model.embed_tokens", "model.rotary_emb", "model.embedding_norm"),
        groups=_LFM2_ATTN + (("feed_forward.w1", "feed_forward.w3"), ("feed_forward.w2",)),
        fusion_groups=(_ATTN_QKV, _LFM2_GATE_UP),
    ),
    # ------------------------------------------------------------------ fused-qkv families
    Architecture(
        name="persimmon",
        model_types=("persimmon",),
        layers="model.layers",
        outside=("model.embed_tokens", "model.final_layernorm", "model.rotary_emb"),
        groups=(("self_attn.query_key_value",), ("self_attn.dense",)) + _NEOX_MLP,
    ),
    Architecture(
        name="falcon",
        model_types=("falcon",),
        layers="transformer.h",
        outside=("transformer.word_embeddings", "transformer.ln_f", "transformer.rotary_emb"),
        groups=(("self_attention.query_key_value",), ("self_attention.dense",)) + _NEOX_MLP,
    ),
    Architecture(
        name="bloom",
        model_types=("bloom",),
        layers="transformer.h",
        outside=("transformer.word_embeddings", "transformer.word_embeddings_layernorm", "transformer.ln_f"),
        groups=(("self_attention.query_key_value",), ("self_attention.dense",)) + _NEOX_MLP,
    ),
    Architecture(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        outside=("gpt_neox.embed_in", "gpt_neox.emb_dropout", "gpt_neox.final_layer_norm", "gpt_neox.rotary_emb"),
        groups=(("attention.query_key_value",), ("attention.dense",)) + _NEOX_MLP,
    ),
    Architecture(
        name="gptj",
        model_types=("gptj",),
        layers="transformer.h",
        outside=("transformer.wte", "transformer.drop", "transformer.ln_f"),
        groups=(("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("attn.out_proj",), ("mlp.fc_in",), ("mlp.fc_out",)),
        fusion_groups=(("attn.q_proj", "attn.k_proj", "attn.v_proj"),),
    ),
    Architecture(
        name="codegen",
        model_types=("codegen",),
        layers="transformer.h",
        outside=("transformer.wte", "transformer.drop", "transformer.ln_f"),
        groups=(("attn.qkv_proj",), ("attn.out_proj",), ("mlp.fc_in",), ("mlp.fc_out",)),
    ),
    Architecture(
        name="gpt2",
        model_types=("gpt2", "gpt_bigcode"),
        layers="transformer.h",
        outside=("transformer.wte", "transformer.wpe", "transformer.drop", "transformer.ln_f"),
        groups=_GPT2_GROUPS,
    ),
    Architecture(
        name="openai-gpt",
        model_types=("openai-gpt",),
        layers="transformer.h",
        outside=("transformer.tokens_embed", "transformer.positions_embed", "transformer.drop"),
        groups=_GPT2_GROUPS,
    ),
    Architecture(
        name="gpt_neo",
        model_types=("gpt_neo",),
        layers="transformer.h",
        outside=("transformer.wte", "transformer.wpe", "transformer.drop", "transformer.ln_f"),
        groups=(
            ("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"),
            ("attn.attention.out_proj",), ("mlp.c_fc",), ("mlp.c_proj",),
        ),
        fusion_groups=(("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"),),
    ),
    Architecture(
        name="mpt",
        model_types=("mpt",),
        layers="transformer.blocks",
        outside=("transformer.wte", "transformer.norm_f"),
        groups=(("attn.Wqkv",), ("attn.out_proj",), ("ffn.up_proj",), ("ffn.down_proj",)),
    ),
    Architecture(
        name="ctrl",
        model_types=("ctrl",),
        layers="transformer.h",
        outside=("transformer.w", "transformer.dropout", "transformer.layernorm"),
        groups=(
            ("multi_head_attention.Wq", "multi_head_attention.Wk", "multi_head_attention.Wv"),
            ("multi_head_attention.dense",), ("ffn.0",), ("ffn.2",),
        ),
        fusion_groups=(("multi_head_attention.Wq", "multi_head_attention.Wk", "multi_head_attention.Wv"),),
    ),
    # ------------------------------------------------------------------ OPT-like
    Architecture(
        name="opt",
        model_types=("opt",),
        layers="model.decoder.layers",
        outside=(
            "model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in",
            "model.decoder.final_layer_norm", "model.decoder.project_out",
        ),
        groups=_OPT_GROUPS,
        fusion_groups=_FUSE_QKV,
    ),
    Architecture(
        name="xglm",
        model_types=("xglm",),
        layers="model.layers",
        outside=("model.embed_tokens", "model.embed_positions", "model.layer_norm"),
        groups=_OPT_GROUPS,
        fusion_groups=_FUSE_QKV,
    ),
    Architecture(
        name="biogpt",
        model_types=("biogpt",),
        layers="biogpt.layers",
        outside=("biogpt.embed_tokens", "biogpt.embed_positions", "biogpt.layer_norm"),
        groups=_OPT_GROUPS,
        head="output_projection",
        fusion_groups=_FUSE_QKV,
    ),
    # ------------------------------------------------------------------ mixture of experts
    Architecture(
        name="mixtral",
        model_types=("mixtral", "minimax_m2"),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=_MIXTRAL_GROUPS,
        moe=_MIXTRAL_EXPERTS,
        checkpoint_renames=_MIXTRAL_RENAMES,
        fusion_groups=_FUSE_QKV,
    ),
    Architecture(
        name="phimoe",
        model_types=("phimoe",),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=_MIXTRAL_GROUPS,
        skip=("mlp.router",),
        moe=_MIXTRAL_EXPERTS,
        checkpoint_renames=((".mlp.router.", ".block_sparse_moe.gate."),) + _MIXTRAL_RENAMES,
        fusion_groups=_FUSE_QKV,
    ),
    Architecture(
        name="qwen-moe",
        model_types=("qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "cohere2_moe", "mellum"),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(_ATTN_QKV, _ATTN_O, _QWEN_MOE_IN, _QWEN_MOE_OUT),
        skip=("mlp.shared_expert_gate",),
        moe=_DS_EXPERTS,
        fusion_groups=_FUSE_LLAMA + (_SHARED_EXPERT_GATE_UP,),
    ),
    Architecture(
        name="qwen3_next",  # gated-delta-net linear attention layers beside full attention
        model_types=("qwen3_next",),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(
            _ATTN_QKV + ("linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba"),
            _ATTN_O + ("linear_attn.out_proj",),
            _QWEN_MOE_IN, _QWEN_MOE_OUT,
        ),
        skip=("mlp.shared_expert_gate",),
        moe=_DS_EXPERTS,
        fusion_groups=_FUSE_LLAMA + (_SHARED_EXPERT_GATE_UP,),
    ),
    Architecture(
        name="hunyuan-moe",
        model_types=("hunyuan_v1_moe",),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(
            _ATTN_QKV, _ATTN_O,
            ("mlp.shared_mlp.gate_proj", "mlp.shared_mlp.up_proj",
             "mlp.experts.{expert}.gate_proj", "mlp.experts.{expert}.up_proj"),
            ("mlp.shared_mlp.down_proj", "mlp.experts.{expert}.down_proj"),
        ),
        skip=("mlp.gate.wg",),
        moe=_DS_EXPERTS,
        fusion_groups=(_ATTN_QKV, ("mlp.shared_mlp.gate_proj", "mlp.shared_mlp.up_proj")),
    ),
    Architecture(
        name="granitemoe",
        model_types=("granitemoe", "granitemoeshared"),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(
            _ATTN_QKV, _ATTN_O,
            ("shared_mlp.input_linear",
             "block_sparse_moe.experts.{expert}.gate_proj", "block_sparse_moe.experts.{expert}.up_proj"),
            ("shared_mlp.output_linear", "block_sparse_moe.experts.{expert}.down_proj"),
        ),
        moe=MoE(experts="block_sparse_moe.experts", expert="block_sparse_moe.experts.{expert}"),
        fusion_groups=_FUSE_QKV,
    ),
    Architecture(
        name="deepseek",  # MLA + DeepSeek MoE
        model_types=("deepseek_v2", "deepseek_v3", "glm4_moe_lite"),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(_MLA_IN, _MLA_UP, _ATTN_O, _DS_MOE_IN, _DS_MOE_OUT),
        moe=_DS_EXPERTS,
        fusion_groups=(_MLA_IN, _MLP_GATE_UP, _SHARED_EXPERTS_GATE_UP),
    ),
    Architecture(
        name="deepseek-moe",  # grouped-query attention (+ optional output gate) + DeepSeek MoE
        model_types=(
            "dots1", "glm4_moe", "ernie4_5_moe", "exaone_moe", "solar_open", "laguna", "afmoe",
            "mimo_v2_flash",
        ),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(
            _ATTN_QKV + ("self_attn.g_proj", "self_attn.gate_proj"), _ATTN_O, _DS_MOE_IN, _DS_MOE_OUT,
        ),
        skip=("mlp.router.gate",),
        moe=_DS_EXPERTS,
        fusion_groups=_FUSE_LLAMA + (_SHARED_EXPERTS_GATE_UP,),
    ),
    Architecture(
        name="gpt_oss",  # experts with biases, interleaved gate/up and a clamped SwiGLU
        model_types=("gpt_oss",),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(
            _ATTN_QKV, _ATTN_O,
            ("mlp.experts.{expert}.gate_proj", "mlp.experts.{expert}.up_proj"),
            ("mlp.experts.{expert}.down_proj",),
        ),
        moe=_DS_EXPERTS,
        fusion_groups=_FUSE_QKV,
    ),
    Architecture(
        name="llama4",  # every expert sees every (router-scaled) token; MoE and dense layers interleave
        model_types=("llama4_text",),
        layers="model.layers",
        outside=_ROPE_OUTSIDE,
        groups=(
            _ATTN_QKV, _ATTN_O,
            ("feed_forward.gate_proj", "feed_forward.up_proj",
             "feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj",
             "feed_forward.experts.{expert}.gate_proj", "feed_forward.experts.{expert}.up_proj"),
            ("feed_forward.down_proj", "feed_forward.shared_expert.down_proj",
             "feed_forward.experts.{expert}.down_proj"),
        ),
        skip=("feed_forward.router",),
        moe=MoE(experts="feed_forward.experts", expert="feed_forward.experts.{expert}", style="dense"),
        fusion_groups=(
            _ATTN_QKV, ("feed_forward.gate_proj", "feed_forward.up_proj"),
            ("feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj"),
        ),
    ),
    Architecture(
        name="dbrx",
        model_types=("dbrx",),
        layers="transformer.blocks",
        outside=("transformer.wte", "transformer.rotary_emb", "transformer.norm_f"),
        groups=(
            ("norm_attn_norm.attn.Wqkv",), ("norm_attn_norm.attn.out_proj",),
            ("ffn.experts.mlp.{expert}.w1", "ffn.experts.mlp.{expert}.v1"),
            ("ffn.experts.mlp.{expert}.w2",),
        ),
        skip=("ffn.router.layer",),
        moe=MoE(
            experts="ffn.experts", expert="ffn.experts.mlp.{expert}", gate="w1", up="v1", down="w2",
            style="dbrx",
        ),
    ),
    Architecture(
        name="lfm2_moe",
        model_types=("lfm2_moe",),
        layers="model.layers",
        outside=("model.embed_tokens", "model.pos_emb", "model.embedding_norm"),
        groups=_LFM2_ATTN + (
            ("feed_forward.w1", "feed_forward.w3",
             "feed_forward.experts.{expert}.w1", "feed_forward.experts.{expert}.w3"),
            ("feed_forward.w2", "feed_forward.experts.{expert}.w2"),
        ),
        moe=MoE(
            experts="feed_forward.experts", expert="feed_forward.experts.{expert}",
            gate="w1", up="w3", down="w2",
        ),
        fusion_groups=(_ATTN_QKV, _LFM2_GATE_UP),
    ),
)


def _index(archs: tuple[Architecture, ...]) -> dict[str, Architecture]:
    table: dict[str, Architecture] = {}
    for arch in archs:
        for model_type in arch.model_types:
            if model_type in table:
                raise RuntimeError(f"model_type {model_type!r} is listed twice in the architecture table")
            table[model_type] = arch
    return table


#: model_type -> Architecture.
ARCHITECTURES: dict[str, Architecture] = _index(ARCHITECTURE_LIST)
