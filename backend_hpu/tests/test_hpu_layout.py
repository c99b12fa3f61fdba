"""GPTQ v1/v2 -> convert_from_uint4's layout, checked on the CPU against gptq_core's float64
reference through a pure-torch model of the op (hpu_op_model.py), on random layers and on
stories260K layers quantized by this project's RTN and GPTQ."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import gptq_core
from gptq_core import NotSupportedError, QuantizeConfig
from gptq_core.quantize.gptq import quantize_linear
from gptq_core.format import encode_zeros
from gptq_core.rtn import quantize_rtn
from gptq_core.testing import (
    assert_matches_reference,
    changed,
    dequantized64,
    packed_tensors,
    random_activations,
    random_packed,
    snapshot,
)
from gptq_backend_hpu.layout import group_order, to_hpu_layout
from gptq_backend_hpu.prepare import POLICY, prepare, qmatmul_with

import hpu_op_model as op

STORIES = Path(gptq_core.__file__).resolve().parent / "data" / "stories260K" / "model.safetensors"


def expected_rows(packed, layout) -> torch.Tensor:
    """The float64 reference weight [K, N] in the row order the layout holds."""
    w = dequantized64(packed)
    return w if layout.perm is None else w[layout.perm.long()]


def scales_as(packed, dtype) -> torch.Tensor:
    """The float64 reference weight [K, N] with its scales rounded to ``dtype`` (what the op reads)."""
    q = packed.unpack_qweight().to(torch.float64)
    g = packed.g_idx.long()
    s = packed.scales.to(dtype).to(torch.float64)
    return (q - packed.zeros().to(torch.float64)[g]) * s[g]


def test_model_decodes_nibbles_low_first():
    # One word 0x12345678 holds 8, 7, ..., 1 from its low bits up (value j at bits 4j).
    word = torch.tensor([[0x12345678]], dtype=torch.int32)
    assert op.unpack_nibbles(word).tolist() == [[8, 7, 6, 5, 4, 3, 2, 1]]
    top = torch.tensor([[-0x10000000]], dtype=torch.int32)  # 0xF0000000: the sign bit is data
    assert op.unpack_nibbles(top).tolist() == [[0, 0, 0, 0, 0, 0, 0, 15]]


@pytest.mark.parametrize("zero_format", ["v1", "v2"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,desc_act", [(-1, False), (32, False), (128, False),
                                                 (32, True), (128, True)])
def test_layout_dequantizes_to_the_reference_exactly(group_size, desc_act, sym, zero_format):
    packed = random_packed(4, group_size, sym, desc_act, in_features=256, out_features=96,
                           seed=group_size + 7 * desc_act + 3 * sym, zero_format=zero_format)
    layout = to_hpu_layout(packed, torch.float16)
    K, N, G = 256, 96, packed.num_groups
    assert layout.qweight.shape == (K, N // 8) and layout.qweight.dtype == torch.int32
    assert layout.zeros.shape == (G, N // 8) and layout.zeros.dtype == torch.int32
    assert layout.scales.shape == (G, N) and layout.scales.dtype == torch.float16
    assert (layout.perm is not None) == desc_act
    got = op.convert_from_uint4_exact(layout.qweight, layout.scales, layout.zeros, torch.float64)
    assert torch.equal(got, expected_rows(packed, layout))


def test_sym_zeros_are_the_real_zero_8_in_every_nibble():
    packed = random_packed(4, 64, sym=True, in_features=128, out_features=16)
    layout = to_hpu_layout(packed, torch.bfloat16)
    # GPTQ v1 stores 0x77777777 (zero - 1); the op reads the zero itself.
    assert (layout.zeros == 0x88888888 - (1 << 32)).all()


def test_bf16_scales_are_rounded_once_at_prepare():
    packed = random_packed(4, 32, sym=False, desc_act=True, in_features=128, out_features=32, seed=5)
    layout = to_hpu_layout(packed, torch.bfloat16)
    assert layout.scales.dtype == torch.bfloat16
    got = op.convert_from_uint4_exact(layout.qweight, layout.scales, layout.zeros, torch.float64)
    want = scales_as(packed, torch.bfloat16)
    assert torch.equal(got, want[layout.perm.long()])


def test_the_callers_tensors_are_not_modified():
    packed = random_packed(4, 32, sym=False, desc_act=True, in_features=128, out_features=64, seed=2)
    before = snapshot(packed_tensors(packed))
    prepare(packed, torch.device("cpu"), torch.float16)
    assert changed(before, packed_tensors(packed)) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [0, 1, 7])
def test_matmul_around_the_op_matches_the_reference(dtype, m):
    """Act-order gather, the op (its model here), matmul and bias against float64."""
    packed = random_packed(4, 32, sym=False, desc_act=True, in_features=256, out_features=64,
                           seed=m, bias=True)
    prepared = prepare(packed, torch.device("cpu"), dtype)
    assert prepared.policy is POLICY and prepared.policy.path_for(1) == "hpu:convert_from_uint4+matmul"
    x = random_activations(m, 256, dtype=dtype, seed=m)
    y = qmatmul_with(op.convert_from_uint4, x, prepared, packed.bias.to(dtype))
    assert_matches_reference(y, x, packed, context=f"M={m} {dtype}")


def stories_weight(name: str) -> torch.Tensor:
    with safe_open(str(STORIES), "pt") as f:
        return f.get_tensor(name)


@pytest.mark.parametrize("zero_format", ["v1", "v2"])
def test_stories260k_rtn_layers(zero_format):
    for name, gs in (("model.layers.0.self_attn.q_proj.weight", 32),
                     ("model.layers.1.self_attn.k_proj.weight", 64),
                     ("model.layers.0.mlp.down_proj.weight", -1)):
        packed = quantize_rtn(stories_weight(name), bits=4, group_size=gs, sym=False,
                              zero_format=zero_format)
        layout = to_hpu_layout(packed, torch.float16)
        got = op.convert_from_uint4_exact(layout.qweight, layout.scales, layout.zeros, torch.float64)
        assert torch.equal(got, expected_rows(packed, layout)), name


def test_stories260k_gptq_act_order_layer():
    """A real act-order layer: GPTQ with desc_act on q_proj, calibrated on the model's embeddings."""
    emb = stories_weight("model.embed_tokens.weight")
    packed, _ = quantize_linear(stories_weight("model.layers.0.self_attn.q_proj.weight"),
                                inputs=emb, config=QuantizeConfig(bits=4, group_size=16,
                                                                  desc_act=True, sym=False))
    assert packed.desc_act and not torch.equal(packed.g_idx.long(), torch.arange(64) // 16)
    prepared = prepare(packed, torch.device("cpu"), torch.float16)
    assert prepared.layout.perm is not None
    got = op.convert_from_uint4_exact(prepared.layout.qweight, prepared.layout.scales,
                                      prepared.layout.zeros, torch.float64)
    assert torch.equal(got, expected_rows(packed, prepared.layout))
    x = emb[:9].to(torch.float16)
    assert_matches_reference(qmatmul_with(op.convert_from_uint4, x, prepared, None), x, packed,
                             bias=False)


def test_static_act_order_groups_need_no_permutation():
    packed = random_packed(4, 32, in_features=128, out_features=16)
    assert group_order(packed.replace(desc_act=True)) is None


def test_unequal_groups_are_refused_with_the_reason():
    packed = random_packed(4, 32, in_features=128, out_features=16)
    g = packed.g_idx.clone()
    g[0] = 1  # group 0 now holds 31 channels, group 1 holds 33
    with pytest.raises(NotSupportedError, match="group 0, but convert_from_uint4 needs every group to hold 32"):
        to_hpu_layout(packed.replace(g_idx=g, desc_act=True), torch.float16)


def test_a_v1_zero_of_16_is_refused():
    packed = random_packed(4, 32, sym=False, in_features=64, out_features=8, zero_format="v2")
    z = packed.zeros()
    v1 = packed.replace(qzeros=encode_zeros(z.clamp(min=1), 4, "v1"), zero_format="v1")
    stored = v1.qzeros.clone()
    stored[0, 0] = stored[0, 0] | 0xF  # the nibble of column 0 = 15: zero 16
    bad = v1.replace(qzeros=stored)
    assert int(bad.zeros()[0, 0]) == 16
    with pytest.raises(NotSupportedError, match="does not fit in 4 unsigned bits"):
        to_hpu_layout(bad, torch.float16)


@pytest.mark.parametrize("bits,n,reason", [(8, 64, "8-bit"), (4, 12, "N=12 is not divisible by 8")])
def test_layers_the_op_cannot_take_are_refused(bits, n, reason):
    packed = random_packed(bits, 32, in_features=64, out_features=n)
    with pytest.raises(NotSupportedError, match=reason):
        to_hpu_layout(packed, torch.float16)
