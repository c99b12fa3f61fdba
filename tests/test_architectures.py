"""The architecture table against the transformers modeling code it describes.

Every listed model_type is built as a tiny random model (no download) and checked: its
layers are where the table says, the groups cover every linear of every layer (or the table
says why one stays in float), the outside modules are what sits beside the layers, unfusing
MoE experts keeps the outputs, and a GPTQ state dict loads into ``replace_with_quant_linear``.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from gptq_core import GPTQError, QuantizeConfig, QuantLinear, quantize_rtn
from gptq_core.cli.main import main as cli_main
from gptq_core.models import (
    ARCHITECTURE_LIST,
    ARCHITECTURES,
    UnfusedExperts,
    apply_packed_weights,
    checkpoint_key,
    decoder_layers,
    get_architecture,
    infer_architecture,
    model_key,
    outside_modules,
    prepare_model_for_quantization,
    quantized_linear_names,
    replace_with_quant_linear,
    sequential_groups,
    uncovered_linears,
)
from gptq_core.models.layers import get_module, sibling_modules
from gptq_core.modules import is_linear_like
from gptq_core.testing import tiny_config, tiny_model, with_dequantized_weights
from gptq_core.threads import single_thread

ALL_TYPES = sorted(ARCHITECTURES)
MOE_TYPES = sorted(t for t, a in ARCHITECTURES.items() if a.moe is not None)
#: What the issue names explicitly; the table must keep them.
REQUIRED = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi", "phi3", "falcon", "gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt",
    "bloom", "stablelm", "starcoder2", "olmo", "olmo2", "cohere", "deepseek_v2", "deepseek_v3",
    "granite",
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@functools.lru_cache(maxsize=None)
def prepared(model_type: str) -> nn.Module:
    """A tiny prepared model per type, shared by the read-only checks of this file."""
    model = tiny_model(model_type)
    return prepare_model_for_quantization(model, ARCHITECTURES[model_type])


def ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the table
def test_table_lists_at_least_40_types_including_the_required_ones():
    assert len(ARCHITECTURES) >= 40
    missing = [t for t in REQUIRED if t not in ARCHITECTURES]
    assert not missing
    assert len(MOE_TYPES) >= 10


def test_every_listed_type_is_a_transformers_causal_lm():
    assert [t for t in ALL_TYPES if t not in CONFIG_MAPPING] == []
    assert [t for t in ALL_TYPES if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES] == []


def test_table_entries_are_well_formed():
    for arch in ARCHITECTURE_LIST:
        names = arch.group_names()
        assert len(set(names)) == len(names), f"{arch.name}: a name is in two groups"
        assert not set(names) & set(arch.skip), f"{arch.name}: a name is both quantized and skipped"
        if arch.moe is not None:
            assert arch.moe.expert.startswith(arch.moe.experts + ".")
            templated = [n for n in names if "{expert}" in n]
            assert templated and all(n.startswith(arch.moe.expert + ".") for n in templated)
            assert {n.rsplit(".", 1)[1] for n in templated} == set(arch.moe.linear_names())


def test_every_group_name_exists_in_some_model_of_its_family():
    """Catches typos: a name that no model of the family has would silently quantize nothing."""
    for arch in ARCHITECTURE_LIST:
        seen: set[str] = set()
        for model_type in arch.model_types:
            model = prepared(model_type)
            for layer in decoder_layers(model, arch):
                for name, module in layer.named_modules():
                    if is_linear_like(module):
                        seen.add(name)
        unseen = []
        for name in arch.group_names() + arch.skip:
            probe = name.replace("{expert}", "0")
            if probe not in seen:
                unseen.append(name)
        optional = {  # projections only some sizes of the family have (absent in tiny configs)
            "self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
            "self_attn.g_proj", "self_attn.gate_proj", "mlp.router.gate",
            "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
            "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj",
            "mlp.shared_expert_gate",
        }
        assert [n for n in unseen if n not in optional] == [], arch.name


# ------------------------------------------------------------------------------ per model type
@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_layout_matches_the_module_tree(model_type):
    model = prepared(model_type)
    arch = get_architecture(model)
    assert arch is ARCHITECTURES[model_type]
    layers = decoder_layers(model, arch)
    assert len(layers) == 2
    for i, layer in enumerate(layers):
        assert uncovered_linears(layer, arch) == [], f"layer {i} has linears no group names"
        groups = sequential_groups(layer, arch)
        assert groups, f"layer {i} has nothing to quantize"
        for name in (n for g in groups for n in g):
            assert isinstance(layer.get_submodule(name), nn.Linear)  # Conv1D and experts prepared
    widths = [max(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    assert max(widths) <= 256, "the tiny config left a full-size dimension (see gptq_core/testing.py)"
    head = get_module(model, arch.head)
    assert head is not None and head is model.get_output_embeddings()
    beside = set(sibling_modules(model, arch.layers)) - {arch.head}
    assert set(outside_modules(model, arch)) == beside
    names = quantized_linear_names(model, arch)
    assert len(names) == len(set(names))
    assert arch.head not in names
    assert all(n.startswith(arch.layers + ".") for n in names)
    if arch.moe is not None:
        experts = [get_module(l, arch.moe.experts) for l in layers]
        assert any(isinstance(e, UnfusedExperts) for e in experts)
        assert any("{expert}" in n for n in arch.group_names())
        assert sum(".experts." in n for n in names) >= 3 * 4  # every expert of a MoE layer


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_unfusing_experts_keeps_the_outputs(model_type):
    model = tiny_model(model_type, dtype=torch.float64, experts_implementation="eager")
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    fused_params = sum(p.numel() for p in model.parameters())
    prepare_model_for_quantization(model)
    prepare_model_for_quantization(model)  # idempotent
    with torch.no_grad():
        after = model(x).logits
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in model.parameters()) == fused_params  # nothing lost or doubled
    assert not [n for n, p in model.named_parameters() if p.dim() == 3 and "experts" in n]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_experts_without_tokens_are_never_called(model_type):
    """The driver learns that an expert got no calibration tokens by never seeing its inputs."""
    model = prepared(model_type)
    arch = ARCHITECTURES[model_type]
    layer = decoder_layers(model, arch)[1]
    experts = get_module(layer, arch.moe.experts)
    called: set[int] = set()
    hooks = [
        experts[e].get_submodule(arch.moe.down).register_forward_hook(lambda *a, e=e: called.add(e))
        for e in range(experts.num_experts)
    ]
    try:
        with torch.no_grad():
            model(ids(batch=1, length=1))
    finally:
        for h in hooks:
            h.remove()
    assert len(called) == 2  # top-2 routing of one token: two experts run, the others never


def test_prepare_works_on_an_empty_meta_model_and_names_match():
    """A checkpoint loader prepares a model built on the meta device, before any weight exists."""
    for model_type in ("qwen2_moe", "gpt2", "dbrx"):
        with torch.device("meta"):
            empty = AutoModelForCausalLM.from_config(tiny_config(model_type))
        arch = get_architecture(empty)
        prepare_model_for_quantization(empty, arch)
        assert quantized_linear_names(empty, arch) == quantized_linear_names(prepared(model_type), arch)
        assert all(p.device.type == "meta" for p in empty.parameters())


def test_sequential_groups_refuse_fused_experts():
    model = tiny_model("mixtral")
    arch = get_architecture(model)
    with pytest.raises(GPTQError, match="prepare_model_for_quantization"):
        sequential_groups(decoder_layers(model, arch)[0], arch)


# ------------------------------------------------------------------------------ loading
def _rtn_state_dict(model: nn.Module, names: list[str], config: QuantizeConfig):
    """A GPTQ-format state dict of ``model``: RTN-packed ``names``, every other tensor as is."""
    packed, state = {}, {}
    for name in names:
        lin = model.get_submodule(name)
        packed[name] = quantize_rtn(lin.weight, config.bits, config.group_size, config.sym, lin.bias)
        for field in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            value = getattr(packed[name], field)
            if value is not None:
                state[f"{name}.{field}"] = value
    skip = tuple(n + "." for n in names)
    state.update({k: v for k, v in model.state_dict().items() if not k.startswith(skip)})
    return packed, state


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2_moe", "gpt_oss", "dbrx"])
def test_gptq_state_dict_loads_into_replaced_layers(model_type):
    config = QuantizeConfig(bits=4, group_size=16, sym=False)
    source = prepare_model_for_quantization(tiny_model(model_type, seed=1))
    arch = get_architecture(source)
    names = quantized_linear_names(source, arch)
    packed, state = _rtn_state_dict(source, names, config)

    target = tiny_model(model_type, seed=2)  # other random weights: all must come from the state
    prepare_model_for_quantization(target, arch)
    replace_with_quant_linear(target, names, config, backend="torch")
    for name in names:
        layer = target.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.qweight.device.type == "meta"
        assert (layer.bias is not None) == (source.get_submodule(name).bias is not None)
    missing, unexpected = target.load_state_dict(state, strict=True, assign=True)
    assert not missing and not unexpected
    target.eval()

    reference = with_dequantized_weights(source, packed)
    x = ids(seed=3)
    with torch.no_grad():
        want = reference(x).logits
        got = target(x).logits
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert target.get_submodule(names[0]).binding.backend.name == "torch"


def test_apply_packed_weights_swaps_in_quant_linears():
    model = prepare_model_for_quantization(tiny_model("phi3"))
    arch = get_architecture(model)
    names = quantized_linear_names(model, arch)
    config = QuantizeConfig(bits=8, group_size=-1)
    packed, _ = _rtn_state_dict(model, names, config)
    reference = with_dequantized_weights(prepare_model_for_quantization(tiny_model("phi3")), packed)
    apply_packed_weights(model, packed, backend="torch")
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    x = ids(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits.double(), reference(x).logits, rtol=1e-4, atol=1e-4)


def test_replacing_something_that_is_not_a_linear_is_a_clear_error():
    model = tiny_model("llama")
    config = QuantizeConfig()
    with pytest.raises(GPTQError, match="not an nn.Linear"):
        replace_with_quant_linear(model, ["model.layers.0.input_layernorm"], config)
    with pytest.raises(GPTQError, match="no module 'model.layers.0.mlp.nope'"):
        replace_with_quant_linear(model, ["model.layers.0.mlp.nope"], config)


def test_checkpoint_names_of_mixtral_and_phimoe_round_trip():
    mixtral, phimoe = ARCHITECTURES["mixtral"], ARCHITECTURES["phimoe"]
    name = "model.layers.3.mlp.experts.7.w1.qweight"
    assert checkpoint_key(name, mixtral) == "model.layers.3.block_sparse_moe.experts.7.w1.qweight"
    assert model_key(checkpoint_key(name, mixtral), mixtral) == name
    router = "model.layers.0.mlp.router.weight"
    assert checkpoint_key(router, phimoe) == "model.layers.0.block_sparse_moe.gate.weight"
    assert model_key(checkpoint_key(router, phimoe), phimoe) == router
    assert checkpoint_key(name, ARCHITECTURES["llama"]) == name


# ------------------------------------------------------------------------------ detection
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "deepseek_v3", "qwen2_moe", "gpt_oss"])
def test_unknown_model_type_is_detected_from_the_module_tree(model_type, caplog):
    model = tiny_model(model_type)
    model.config.model_type = "my_new_" + model_type
    arch = get_architecture(model)
    assert arch.inferred and arch.layers == ARCHITECTURES[model_type].layers
    assert "not in the architecture table" in caplog.text
    prepare_model_for_quantization(model, arch)
    table = ARCHITECTURES[model_type]
    for layer in decoder_layers(model, arch):
        assert uncovered_linears(layer, arch) == []
        want = [sorted(g) for g in sequential_groups(layer, table)]
        assert [sorted(g) for g in sequential_groups(layer, arch)] == want
    assert set(outside_modules(model, arch)) == set(outside_modules(model, table))


def test_detection_falls_back_to_one_group_when_names_say_nothing(caplog):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha, self.beta = nn.Linear(8, 8), nn.Linear(8, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.blocks = nn.ModuleList([Block(), Block()])

    arch = infer_architecture(Net())
    assert arch.layers == "blocks" and arch.groups == (("alpha", "beta"),)
    assert arch.outside == ("embed",)
    assert "one group" in caplog.text


def test_undetectable_models_and_unknown_types_are_rejected_clearly():
    with pytest.raises(GPTQError, match="no ModuleList") as err:
        get_architecture(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    assert "llama" in str(err.value) and "mixtral" in str(err.value)  # lists supported types
    with pytest.raises(GPTQError, match="'not_a_model'.*Supported model types"):
        get_architecture("not_a_model")
    config = CONFIG_MAPPING["llama"]()
    config.model_type = "not_a_model"
    with pytest.raises(GPTQError, match="no model was given"):
        get_architecture(config)


def test_fused_experts_of_an_unknown_layout_are_rejected():
    model = tiny_model("llama4_text")  # Llama 4 experts lack transformers' experts interface
    model.config.model_type = "unknown_moe"
    with pytest.raises(GPTQError, match="3-D weight of Llama4TextExperts"):
        get_architecture(model)


# ------------------------------------------------------------------------------ CLI
def test_models_list_prints_every_type(capsys):
    assert cli_main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for model_type in ALL_TYPES:
        assert model_type in out
    assert "mlp.experts.{expert}.w1" in out and "model.decoder.layers" in out
    assert cli_main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(t for r in rows for t in r["model_types"]) == ALL_TYPES
    mixtral = next(r for r in rows if "mixtral" in r["model_types"])
    assert mixtral["experts"]["linears"] == ["w1", "w3", "w2"]
