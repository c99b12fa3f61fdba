"""The packed weight format: hand-computed dequantization, v1/v2 zeros, validation errors."""

from __future__ import annotations

import pytest
import torch

from gptq_core import PackedWeight, pack_weight, quantize_rtn
from gptq_core.errors import FormatError
from gptq_core.format import encode_zeros, num_groups
from gptq_core.testing import random_packed


def as_u32(t: torch.Tensor) -> set[int]:
    return {w & 0xFFFFFFFF for w in t.flatten().tolist()}


@pytest.mark.parametrize(("bits", "word"), [(2, 0x55555555), (4, 0x77777777), (8, 0x7F7F7F7F)])
def test_symmetric_v1_qzeros_words(bits, word):
    """zero = 2**(bits-1), stored as zero - 1 in every slot of every word."""
    packed = quantize_rtn(torch.randn(64, 96), bits=bits, group_size=32, sym=True)
    assert as_u32(packed.qzeros) == {word}
    assert torch.equal(packed.zeros(), torch.full((3, 64), 2 ** (bits - 1), dtype=torch.int32))


def test_symmetric_3bit_v1_qzeros_words():
    packed = quantize_rtn(torch.randn(32, 64), bits=3, group_size=-1, sym=True)
    words = [w & 0xFFFFFFFF for w in packed.qzeros[0].tolist()]
    assert words == [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D]  # 011 repeated, LSB first


def hand_weight(**kw) -> PackedWeight:
    """N=2, K=4, 4-bit, two groups of two input channels."""
    q = torch.tensor([[0, 1, 2, 3], [15, 14, 13, 12]])  # [N, K]
    scales = torch.tensor([[0.5, 1.0], [0.25, 2.0]])  # [G, N]
    zeros = torch.tensor([[8, 1], [3, 15]])  # [G, N]
    return pack_weight(q, scales, zeros, bits=4, group_size=2, sym=False, **kw)


def test_hand_computed_dequantization():
    w = hand_weight(bias=torch.tensor([1.0, -1.0]))
    expected = torch.tensor([[-4.0, 14.0], [-3.5, 13.0], [-0.25, -4.0], [0.0, -6.0]])  # [K, N]
    assert torch.equal(w.dequantize(torch.float64), expected.double())
    assert torch.equal(w.dequantize(torch.float32, k_slice=slice(2, 4)), expected[2:])
    # v1 stores zero - 1 along N: group 0 -> 7 and 0, group 1 -> 2 and 14 (nibbles, LSB first)
    assert [x & 0xFFFFFFFF for x in w.qzeros[:, 0].tolist()] == [0x07, 0xE2]
    assert w.bias.dtype == torch.float16 and w.zero_format == "v1"


def test_act_order_g_idx_is_used_as_given():
    g_idx = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    w = hand_weight(g_idx=g_idx, desc_act=True)
    # channel 0 now reads group 1 (scale 0.25 / zero 3 for n=0), channel 1 reads group 0
    assert w.dequantize(torch.float64)[:, 0].tolist() == [0.25 * (0 - 3), 0.5 * (1 - 8),
                                                          0.25 * (2 - 3), 0.5 * (3 - 8)]
    assert w.desc_act and torch.equal(w.g_idx, g_idx)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("K", "N", "group_size"), [(10, 3, 4), (172, 32, 128), (33, 40, -1)])
def test_awkward_shapes_round_trip(bits, K, N, group_size):
    g = torch.Generator().manual_seed(K * N + bits)
    q = torch.randint(0, 2**bits, (N, K), generator=g)
    G = num_groups(K, group_size)
    zeros = torch.randint(1, 2**bits, (G, N), generator=g)
    scales = torch.rand(G, N, generator=g) + 0.1
    w = pack_weight(q, scales, zeros, bits=bits, group_size=group_size, sym=False)
    assert w.qweight.shape == (-(-K * bits // 32), N)
    assert w.qzeros.shape == (G, -(-N * bits // 32))
    assert torch.equal(w.unpack_qweight().to(torch.int64), q.t())
    assert torch.equal(w.zeros().to(torch.int64), zeros)
    gi = w.g_idx.long()
    expected = (q.t().double() - zeros[gi].double()) * scales.half()[gi].double()
    assert torch.equal(w.dequantize(torch.float64), expected)


def test_v1_v2_conversion_is_explicit_and_lossless():
    v1 = random_packed(4, 32, sym=False, in_features=96, out_features=40, seed=3)
    v2 = v1.to_format("v2")
    assert v2.zero_format == "v2" and not torch.equal(v1.qzeros, v2.qzeros)
    assert torch.equal(v1.zeros(), v2.zeros())
    assert torch.equal(v1.dequantize(torch.float64), v2.dequantize(torch.float64))
    assert torch.equal(v2.to_format("v1").qzeros, v1.qzeros)
    assert v1.to_format("v1") is v1
    # stored words differ by exactly one per value: v1 holds zero - 1
    assert torch.equal(v2.zeros() - 1, v1.replace(zero_format="v2").zeros())


def test_v2_zero_of_zero_cannot_be_written_as_v1():
    v2 = random_packed(4, 32, sym=False, in_features=64, out_features=8, seed=1, zero_format="v2")
    v2 = v2.replace(qzeros=encode_zeros(torch.zeros(2, 8, dtype=torch.int32), 4, "v2"))
    with pytest.raises(FormatError, match="outside \\[1, 16\\].*gptq_v2"):
        v2.to_format("v1")


def test_v1_reads_a_zero_of_two_to_the_bits_like_the_ecosystem_kernels():
    qzeros = encode_zeros(torch.full((1, 8), 16), 4, "v1")  # stored 15
    assert as_u32(qzeros) == {0xFFFFFFFF}
    w = random_packed(4, -1, sym=False, in_features=32, out_features=8).replace(qzeros=qzeros)
    assert set(w.zeros().flatten().tolist()) == {16}


def test_move_keeps_format():
    w = random_packed(3, 64, sym=False, desc_act=True, in_features=172, out_features=32, bias=True)
    m = w.to("meta")
    assert m.device.type == "meta" and m.bias.device.type == "meta"
    assert (m.bits, m.group_size, m.desc_act, m.zero_format) == (3, 64, True, "v1")


# ---------------------------------------------------------------------- validation
@pytest.fixture
def valid() -> PackedWeight:
    return random_packed(4, 32, in_features=64, out_features=8, bias=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: {"qweight": w.qweight[:-1]},
         r"qweight has shape \(7, 8\) but bits=4, group_size=32, K=64, N=8 require \(8, 8\)"),
        (lambda w: {"qzeros": w.qzeros.repeat(1, 2)},
         r"qzeros has shape \(2, 2\) but .* require \(2, 1\)"),
        (lambda w: {"scales": w.scales.float()},
         "scales has dtype torch.float32, the GPTQ format requires torch.float16"),
        (lambda w: {"g_idx": w.g_idx.long()}, "g_idx has dtype torch.int64"),
        (lambda w: {"g_idx": w.g_idx[:10]}, r"g_idx has shape \(10,\) .* require \(64,\)"),
        (lambda w: {"bias": w.bias[:4]}, r"bias has shape \(4,\) .* require \(8,\)"),
        (lambda w: {"scales": w.scales.to("meta")}, "scales is on meta but qweight is on cpu"),
        (lambda w: {"qweight": w.qweight.numpy()}, "qweight must be a torch.Tensor, got ndarray"),
        (lambda w: {"bits": 5}, r"bits=5 is not a GPTQ bit width; use one of \[2, 3, 4, 8\]"),
        (lambda w: {"group_size": 0}, "group_size=0 is invalid; use -1"),
        (lambda w: {"zero_format": "v3"}, "zero_format='v3' is unknown"),
        (lambda w: {"in_features": 0}, "in_features must be a positive integer, got 0"),
    ],
)
def test_validation_names_tensor_expected_and_found(valid, change, message):
    with pytest.raises(FormatError, match=message):
        valid.replace(**change(valid))


def test_value_checks(valid):
    with pytest.raises(FormatError, match=r"g_idx values must lie in \[0, 1\], found \[0, 2\]"):
        valid.replace(g_idx=torch.where(valid.g_idx == 1, 2, valid.g_idx).int()).check_values()
    bad = valid.scales.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FormatError, match="scales contain NaN or Inf"):
        valid.replace(scales=bad).check_values()
    valid.check_values()


def test_rtn_error_is_within_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(16, 100)
    # asymmetric v1 zeros are floored at 1 (v1 stores zero - 1), which can cost up to a step
    for sym, steps in ((True, 0.5), (False, 1.0)):
        packed = quantize_rtn(weight, bits=4, group_size=32, sym=sym)
        step = packed.scales.float()[packed.g_idx.long()].t()  # [N, K]
        err = (packed.dequantize(torch.float32).t() - weight).abs()
        assert bool((err <= (steps + 0.01) * step).all())  # 0.01: the fp16 rounding of scales
        if not sym:
            assert int(packed.zeros().min()) >= 1


def test_rtn_rejects_non_finite_weights():
    w = torch.randn(4, 32)
    w[1, 3] = float("inf")
    with pytest.raises(FormatError, match="NaN or Inf"):
        quantize_rtn(w, bits=4, group_size=32)
