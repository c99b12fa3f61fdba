"""The fragment layout and a bit-level model of the decode kernel against the float64 reference
(CPU only): every bit width, sym/asym, act-order, group sizes -1/16/32/48/128, K not a multiple of
a unit (172), fp16 and bf16, one split and several."""

from __future__ import annotations

import pytest
import torch

from gptq_core.errors import NotSupportedError
from gptq_core.testing import assert_matches_reference, dequantized64, random_activations, random_packed
from gptq_backend_cuda import layout, policy
from gptq_backend_cuda.prepare import prepare, reference_weight

import cuda_kernel_model as km

SHAPES = [(64, 16), (172, 32), (256, 72), (200, 40)]


@pytest.mark.parametrize("bits", layout.LAYOUT_BITS)
@pytest.mark.parametrize("K,N", SHAPES)
def test_repack_then_unrepack_is_identity(bits, K, N):
    g = torch.Generator().manual_seed(K * N + bits)
    q = torch.randint(0, 2**bits, (K, N), generator=g)
    qweight, qhigh = layout.repack(q, bits)
    k_pad, n_pad = layout.padded(K, N, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (n_pad // 16, k_pad // layout.unit_k(bits), 32, 4)
    if bits == 3:
        assert qhigh.shape == (n_pad // 16, k_pad // layout.unit_k(bits), 32, 2)
        assert (qweight.numel() + qhigh.numel()) * 32 == k_pad * n_pad * 3  # 3 bits a weight, no padding bits
    else:
        assert qhigh is None and qweight.numel() * 32 == k_pad * n_pad * bits
    assert torch.equal(layout.unrepack(qweight, qhigh, bits, K, N), q)


@pytest.mark.parametrize("bits", layout.LAYOUT_BITS)
def test_every_weight_of_a_unit_lands_in_exactly_one_field(bits):
    step, col, chan = layout.fragment_index(bits)
    flat = (step * 256 + col * 16 + chan).reshape(-1)
    assert torch.equal(flat.sort().values, torch.arange(layout.unit_steps(bits) * 256))
    if bits == 3:
        step, col, chan = layout.high_fragment_index()
        assert torch.equal((step * 256 + col * 16 + chan).reshape(-1).sort().values, torch.arange(8 * 256))


def test_x_slots_give_each_lane_its_b_fragments_in_one_8_byte_load():
    slots = layout.x_slot(torch.arange(16))
    assert sorted(slots.tolist()) == list(range(16))
    for t in range(4):
        assert [int(layout.x_slot(j)) for j in (2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)] == [4 * t + i for i in range(4)]


def test_3bit_words_hold_no_straddling_value():
    """Every field of every word is whole: 16 two-bit fields or 32 one-bit fields, nothing across
    a word boundary (the GPTQ stream's values 10 and 21 are split by repack, once)."""
    assert layout.fields_per_half(3) * 2 * layout.low_bits(3) == 32


@pytest.mark.parametrize("bits", layout.LAYOUT_BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("group_size", [-1, 48, 128])
def test_prepared_weight_is_the_layer(bits, sym, desc_act, group_size):
    packed = random_packed(bits, group_size, sym, desc_act, 172, 40, seed=bits * 7 + group_size)
    prep = prepare(packed, torch.device("cpu"), torch.float16)
    torch.testing.assert_close(reference_weight(prep), dequantized64(packed), rtol=0, atol=0)
    assert (prep.zeros is None) == sym
    assert (prep.perm is None) == (not desc_act or group_size == -1)  # one group: nothing to sort


CASES = [
    # bits, group, sym, act-order, K, N, dtype, M
    (4, 128, True, False, 256, 72, torch.float16, 1),
    (4, 32, False, True, 172, 32, torch.bfloat16, 7),
    (4, -1, True, True, 200, 40, torch.float16, 8),
    (2, 48, True, False, 172, 32, torch.float16, 3),
    (2, 128, False, True, 256, 72, torch.bfloat16, 16),
    (2, -1, False, False, 200, 40, torch.bfloat16, 1),
    (3, 128, True, True, 256, 72, torch.float16, 5),
    (3, 48, False, False, 172, 32, torch.bfloat16, 2),
    (3, 16, True, False, 256, 40, torch.bfloat16, 8),
    (3, -1, False, True, 200, 40, torch.float16, 12),
    (8, 64, True, False, 256, 72, torch.bfloat16, 1),
    (8, 48, False, True, 172, 32, torch.float16, 8),
    (8, -1, True, False, 200, 40, torch.float16, 16),
    (8, 32, False, False, 256, 40, torch.bfloat16, 4),
]


@pytest.mark.parametrize("bits,group_size,sym,desc_act,K,N,dtype,M", CASES,
                         ids=[f"b{c[0]}-g{c[1]}-{'sym' if c[2] else 'asym'}-{'act' if c[3] else 'noact'}-"
                              f"K{c[4]}xN{c[5]}-{str(c[6])[6:]}-M{c[7]}" for c in CASES])
def test_kernel_model_matches_the_float64_reference(bits, group_size, sym, desc_act, K, N, dtype, M):
    """One split and several (one unit each), 8- and 16-row slices: the kernel's layout, lane
    arithmetic, staging, group folds and split sums reproduce the layer."""
    packed = random_packed(bits, group_size, sym, desc_act, K, N, seed=hash((bits, group_size, K, M)) % 9973,
                           bias=True)
    prep = prepare(packed, torch.device("cpu"), dtype)
    x = random_activations(M, K, dtype=dtype, seed=M + K)
    units = layout.padded(K, N, bits)[0] // layout.unit_k(bits)
    for per in sorted({units, 1, max(1, units // 2)}):
        for rows in (8, 16):
            y = km.gemm(x, prep, per, rows, bias=packed.bias)
            assert_matches_reference(y, x, packed, context=f"units_per_split={per}, rows={rows}")


@pytest.mark.parametrize("bits", layout.LAYOUT_BITS)
def test_v2_zero_points_including_zero_are_served(bits):
    """GPTQModel's v2 stores the zero itself, 0 included (v1 cannot): the prepared zero points
    are the real ones either way."""
    packed = random_packed(bits, 64, False, True, 172, 32, seed=bits, zero_format="v2")
    assert int(packed.zeros().min()) == 0
    prep = prepare(packed, torch.device("cpu"), torch.bfloat16)
    x = random_activations(3, 172, dtype=torch.bfloat16, seed=bits)
    assert_matches_reference(km.gemm(x, prep, 1), x, packed)


def test_kernel_model_fails_on_a_wrong_layout():
    """The model is sharp: swapping two lanes' words gives a wrong answer."""
    packed = random_packed(4, 128, True, False, 256, 32, seed=3)
    prep = prepare(packed, torch.device("cpu"), torch.float16)
    bad = prep.qweight.clone()
    bad[:, :, [0, 1]] = bad[:, :, [1, 0]]
    import dataclasses

    x = random_activations(2, 256, dtype=torch.float16, seed=4)
    y = km.gemm(x, dataclasses.replace(prep, qweight=bad), 4)
    with pytest.raises(AssertionError):
        assert_matches_reference(y, x, packed)


def test_irregular_act_order_and_odd_group_sizes_are_refused():
    packed = random_packed(4, 32, True, True, 128, 16, seed=5)
    g_idx = packed.g_idx.clone()
    g_idx[0], g_idx[1] = 0, 0
    g_idx[g_idx == 3] = 0
    with pytest.raises(NotSupportedError, match="exactly group_size=32"):
        prepare(packed.replace(g_idx=g_idx), torch.device("cpu"), torch.float16)
    with pytest.raises(NotSupportedError, match="multiple of 16"):
        prepare(random_packed(4, 20, True, False, 120, 16, seed=6), torch.device("cpu"), torch.float16)


def test_prepare_plans_for_the_reference_gpu_on_the_cpu():
    packed = random_packed(4, 128, True, False, 256, 72, seed=7)
    prep = prepare(packed, torch.device("cpu"), torch.float16)
    t = policy.DEQUANT_THRESHOLDS[4]  # measured break-even (policy.py)
    assert prep.policy.describe() == f"M<=8: cuda:mma-m8; M<={t}: cuda:mma-m16; M>{t}: dequant+cublas"
    assert [launch.kind for launch in prep.launches] == [0, 1, 2]
    assert prep.launches[-1].units_per_split == 0
    assert policy.KINDS["dequant+cublas"] == 2
