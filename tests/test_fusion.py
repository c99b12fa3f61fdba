"""Fused projections at load (gptq_core.fusion): the table's fusion groups against every
family's forward, the concatenated format, and fused == unfused on real stories260K checkpoints
(every bit width, asymmetric zeros, act-order), save round trips, and torch.compile."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from gptq_core import AutoGPTQForCausalLM, GPTQError, QuantizeConfig, quantize_rtn
from gptq_core.checkpoint import load_quantized, save_quantized
from gptq_core.format import default_g_idx
from gptq_core.fusion import FusedSlice, concat_packed
from gptq_core.models import ARCHITECTURE_LIST, ARCHITECTURES, decoder_layers, prepare_model_for_quantization
from gptq_core.models.layers import get_module
from gptq_core.quant_linear import QuantLinear
from gptq_core.testing import random_activations, random_packed, tiny_model


STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTN = "model.layers.1.self_attn"
MLP = "model.layers.1.mlp"
#: fp32 matmuls of different widths may round differently (BLAS blocking): a few ulps of the
#: largest logit, not a bitwise match.
FP32_REL = 2e-6


# ------------------------------------------------------------------------------ the table
def test_fusion_groups_are_within_one_true_sequential_group_and_never_experts():
    """Within a group, so the names are those tests/test_architectures.py checks for typos."""
    for arch in ARCHITECTURE_LIST:
        for group in arch.fusion_groups:
            assert len(group) >= 2 and len(set(group)) == len(group), arch.name
            assert not any("{expert}" in n for n in group), arch.name
            assert any(set(group) <= set(g) for g in arch.groups), (arch.name, group)
    llama = ARCHITECTURES["llama"].fusion_groups
    assert ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") in llama
    assert ("mlp.gate_proj", "mlp.up_proj") in llama


FUSING_TYPES = sorted(t for t, a in ARCHITECTURES.items() if a.fusion_groups)


@functools.lru_cache(maxsize=None)
def prepared(model_type: str) -> nn.Module:
    return prepare_model_for_quantization(tiny_model(model_type), ARCHITECTURES[model_type])


@pytest.mark.parametrize("model_type", FUSING_TYPES)
def test_every_fusion_group_reads_one_tensor_in_the_forward(model_type):
    """The members of a group are called with the very same tensor object, the same number of
    times, in every layer where they exist (what the fused layer's cache relies on)."""
    arch = ARCHITECTURES[model_type]
    model = prepared(model_type)
    seen: dict[tuple[int, int], dict[str, list[torch.Tensor]]] = {}
    hooks = []
    for i, layer in enumerate(decoder_layers(model, arch)):
        for gi, group in enumerate(arch.fusion_groups):
            for name in group:
                module = get_module(layer, name)
                if module is not None:
                    calls = seen.setdefault((i, gi), {}).setdefault(name, [])
                    hooks.append(module.register_forward_pre_hook(
                        lambda m, args, calls=calls: calls.append(args[0])))
    try:
        with torch.no_grad():
            model(torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0)))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen, "no fusion group member exists in this model"
    for key, members in seen.items():
        first = next(iter(members.values()))
        assert first, key
        for name, calls in members.items():
            assert len(calls) == len(first) and all(a is b for a, b in zip(calls, first)), (key, name)


# ------------------------------------------------------------------------------ the format
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zero_format", ["v1", "v2"])
def test_concatenated_layer_dequantizes_to_its_members_side_by_side(bits, zero_format):
    """Asymmetric zeros and widths whose packed zeros end mid-word (N*bits % 32 != 0)."""
    widths = (172, 32, 20)
    weights = [
        random_packed(bits, 32, sym=False, in_features=96, out_features=n, seed=i,
                      bias=(i == 1), zero_format=zero_format)
        for i, n in enumerate(widths)
    ]
    fused = concat_packed(weights)
    assert fused.out_features == sum(widths) and fused.zero_format == zero_format
    want = torch.cat([w.dequantize(torch.float64) for w in weights], dim=1)
    assert torch.equal(fused.dequantize(torch.float64), want)
    assert torch.equal(fused.bias, torch.cat([torch.zeros(172).half(), weights[1].bias, torch.zeros(20).half()]))


def test_layers_with_different_settings_are_not_concatenated():
    a = random_packed(4, 32, in_features=64, out_features=32)
    with pytest.raises(GPTQError, match="bits"):
        concat_packed([a, random_packed(8, 32, in_features=64, out_features=32)])
    with pytest.raises(GPTQError, match="g_idx"):
        concat_packed([random_packed(4, 32, desc_act=True, in_features=64, seed=1),
                       random_packed(4, 32, desc_act=True, in_features=64, seed=2)])


# ------------------------------------------------------------------------------ stories260K
def _act_order(pw, perm: torch.Tensor):
    """The same layer with act-order's g_idx (group of each input channel permuted)."""
    return pw.replace(g_idx=default_g_idx(pw.in_features, pw.group_size)[perm].contiguous(), desc_act=True)


def write_checkpoint(folder: Path, bits: int, sym: bool = False, act_order: str | None = None) -> Path:
    """stories260K quantized by RTN; ``act_order`` "same" gives q/k/v one g_idx and gate/up
    another (as GPTQ does: one input, one Hessian), "differs" gives every linear its own."""
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    config = QuantizeConfig(bits=bits, group_size=32, sym=sym, desc_act=act_order is not None)
    packed = {}
    for i in range(5):
        for j, lin in enumerate(LINEARS):
            name = f"model.layers.{i}.{lin}"
            pw = quantize_rtn(model.get_submodule(name).weight, bits, 32, sym)
            if act_order is not None:
                seed = 10 * i + (lin.startswith("mlp.") if act_order == "same" else 2 + j)
                perm = torch.randperm(pw.in_features, generator=torch.Generator().manual_seed(seed))
                pw = _act_order(pw, perm)
            packed[name] = pw
    return save_quantized(model, packed, config, folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("fusion")
    made: dict[tuple, Path] = {}

    def get(bits: int, sym: bool = False, act_order: str | None = None) -> Path:
        key = (bits, sym, act_order)
        if key not in made:
            made[key] = write_checkpoint(base / f"b{bits}-{sym}-{act_order}", bits, sym, act_order)
        return made[key]
    return get


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids()).logits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def fused_count(model) -> int:
    return sum(isinstance(m, FusedSlice) for m in model.modules())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fused_model_computes_what_the_unfused_one_does(checkpoints, bits):
    """stories260K: k/v N=32 and gate/up N=172 (172*bits % 32 != 0 for 2, 3 and 4 bits)."""
    folder = checkpoints(bits)
    fused = load_quantized(folder, torch_dtype=torch.float32)
    plain = load_quantized(folder, torch_dtype=torch.float32, fuse=False)
    assert fused_count(fused) == 5 * 5 and fused_count(plain) == 0
    q = fused.get_submodule(f"{ATTN}.q_proj")
    assert q.fusion == "fused q_proj+k_proj+v_proj (N=128)"
    assert fused.get_submodule(f"{MLP}.up_proj").fusion == "fused gate_proj+up_proj (N=344)"
    assert q.binding is fused.get_submodule(f"{ATTN}.v_proj").binding  # bound once, shared
    assert q.binding.plan.spec.out_features == 128
    assert relative_error(logits(fused), logits(plain)) < FP32_REL


def test_greedy_generation_with_kv_cache_is_unchanged(checkpoints):
    folder = checkpoints(4, sym=True)
    fused = load_quantized(folder, torch_dtype=torch.float32)
    plain = load_quantized(folder, torch_dtype=torch.float32, fuse=False)
    prompt = token_ids()[:1, :6]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(prompt, **kw), plain.generate(prompt, **kw))


def test_act_order_layers_fuse_when_their_g_idx_match(checkpoints):
    folder = checkpoints(4, act_order="same")
    fused = load_quantized(folder, torch_dtype=torch.float32)
    plain = load_quantized(folder, torch_dtype=torch.float32, fuse=False)
    assert fused_count(fused) == 25 and fused.get_submodule(f"{ATTN}.k_proj").desc_act
    assert relative_error(logits(fused), logits(plain)) < FP32_REL


def test_act_order_layers_with_different_g_idx_stay_apart_with_the_reason(checkpoints):
    folder = checkpoints(4, act_order="differs")
    model = load_quantized(folder, torch_dtype=torch.float32)
    assert fused_count(model) == 0
    assert all(type(model.get_submodule(f"model.layers.{i}.{n}")) is QuantLinear for i in range(5) for n in LINEARS)
    assert model.get_submodule(f"{ATTN}.q_proj").fusion == "not fused: g_idx differs from k_proj's"
    assert model.get_submodule(f"{ATTN}.v_proj").fusion == "not fused: g_idx differs from q_proj's"
    assert model.get_submodule(f"{MLP}.up_proj").fusion == "not fused: g_idx differs from gate_proj's"
    assert not getattr(model.get_submodule(f"{ATTN}.o_proj"), "fusion", None)


def test_fuse_false_gives_the_separate_layers(checkpoints):
    folder = checkpoints(4, sym=True)
    model = AutoGPTQForCausalLM.from_quantized(folder, torch_dtype=torch.float32, fuse=False).model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 35 and all(type(m) is QuantLinear for m in layers.values())
    assert not any(getattr(m, "fusion", None) for m in layers.values())
    assert fused_count(AutoGPTQForCausalLM.from_quantized(folder, torch_dtype=torch.float32).model) == 25


# ------------------------------------------------------------------------------ the format stays
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_saving_a_fused_model_writes_the_source_tensors(checkpoints, bits, tmp_path):
    folder = checkpoints(bits)
    model = load_quantized(folder, torch_dtype=torch.float32)
    config = QuantizeConfig(bits=bits, group_size=32, sym=False)
    save_quantized(model, None, config, tmp_path / "again")
    source = load_file(folder / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(again) == sorted(source)
    for key, tensor in source.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key


def test_state_dict_of_a_fused_model_has_the_separate_layers(checkpoints):
    """Same keys and values as the unfused model; qweight and scales are views of the fused
    tensors, so the fused layer costs no second copy."""
    folder = checkpoints(3)
    fused = load_quantized(folder, torch_dtype=torch.float32)
    plain = load_quantized(folder, torch_dtype=torch.float32, fuse=False)
    mine, theirs = fused.state_dict(), plain.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    k = fused.get_submodule(f"{ATTN}.k_proj")
    assert k.qweight.untyped_storage().data_ptr() == k.fused.qweight.untyped_storage().data_ptr()


def test_loading_a_state_dict_into_a_fused_layer_says_how(checkpoints):
    model = load_quantized(checkpoints(4, sym=True), torch_dtype=torch.float32)
    with pytest.raises(GPTQError, match="fuse=False"):
        model.load_state_dict(model.state_dict())


# ------------------------------------------------------------------------------ the shared output
def test_members_share_one_matmul_and_free_it(checkpoints):
    model = load_quantized(checkpoints(4, sym=True), torch_dtype=torch.float32)
    attn = model.get_submodule(ATTN)
    calls = []
    attn.q_proj.fused.register_forward_hook(lambda m, args, out: calls.append(out))
    x = random_activations(2, 5, 64, dtype=torch.float32)
    with torch.no_grad():
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert len(calls) == 1 and attn.q_proj._group._entry is None  # freed after the last read
    assert torch.equal(torch.cat([q, k, v], dim=-1), calls[0])
    plain = load_quantized(checkpoints(4, sym=True), torch_dtype=torch.float32, fuse=False)
    with torch.no_grad():
        assert torch.allclose(k, plain.get_submodule(f"{ATTN}.k_proj")(x), rtol=0, atol=1e-6)


def test_a_member_called_with_another_tensor_computes_its_own_slice(checkpoints):
    model = load_quantized(checkpoints(4, sym=True), torch_dtype=torch.float32)
    attn = model.get_submodule(ATTN)
    x, other = (random_activations(3, 64, dtype=torch.float32, seed=s) for s in (1, 2))
    with torch.no_grad():
        attn.q_proj(x)
        x.mul_(2)                         # the same tensor changed in place: recomputed
        v_doubled = attn.v_proj(x)
        k_other = attn.k_proj(other)      # another tensor: its own result
        attn.k_proj(x)
        k_doubled = attn.k_proj(x)        # called twice: still the right slice
    assert torch.equal(k_other, attn.q_proj.fused(other)[:, 64:96])
    assert torch.equal(v_doubled, attn.q_proj.fused(x)[:, 96:128])
    assert torch.equal(k_doubled, attn.q_proj.fused(x)[:, 64:96])


def test_moving_and_casting_keep_views_and_results(checkpoints):
    folder = checkpoints(4)
    fused = load_quantized(folder, torch_dtype=torch.float32)
    plain = load_quantized(folder, torch_dtype=torch.float32, fuse=False)
    logits(fused)  # bound for float32 first: casting must rebind
    fused.to("cpu").half()
    plain.half()
    q = fused.get_submodule(f"{ATTN}.q_proj")
    assert q.qweight.untyped_storage().data_ptr() == q.fused.qweight.untyped_storage().data_ptr()
    assert q.scales.dtype == torch.float16 and q.qzeros.dtype == torch.int32
    assert q.scales.data_ptr() == q.fused.scales.data_ptr()
    assert relative_error(logits(fused), logits(plain)) < 2e-3  # fp16 outputs, rounded once each
    assert q.binding.plan.spec.act_dtype == torch.float16


# ------------------------------------------------------------------------------ torch.compile
def _qmatmul_calls(model) -> tuple[int, torch.Tensor]:
    graphs = []

    def count(gm, inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend=count)(token_ids()).logits
    assert len(graphs) == 1
    return sum("qmatmul" in str(n.target) for n in graphs[0].graph.nodes), out


def test_compiled_forward_has_one_matmul_per_fused_group_and_no_graph_break(checkpoints):
    model = load_quantized(checkpoints(4, sym=True), torch_dtype=torch.float32)
    calls, out = _qmatmul_calls(model)
    assert calls == 5 * 4  # qkv, o, gate_up, down per layer
    assert torch.equal(out, logits(model))
    assert model.get_submodule(f"{ATTN}.q_proj")._group._entry is None


@pytest.mark.slow
def test_inductor_compiled_fused_model_matches_eager(checkpoints):
    model = load_quantized(checkpoints(4, sym=True), torch_dtype=torch.float32)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True)(token_ids()).logits
    assert relative_error(out, logits(model)) < 1e-5
