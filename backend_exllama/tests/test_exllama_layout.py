"""The shuffled layout, the folded constants and a bit-level model of the kernel, on the CPU,
against gptq_core's float64 reference (docs/DESIGN.md §5 tolerances)."""

from __future__ import annotations

import pytest
import torch

from gptq_core.testing import (changed, check_close, packed_tensors, random_activations, random_packed,
                               reference_bound, reference_matmul, snapshot)
from gptq_backend_exllama import layout
from gptq_backend_exllama.prepare import act_order_permutation, prepare, reference_weight

import exllama_kernel_model as model

CPU = torch.device("cpu")


def test_fields_fill_the_word_without_overlap():
    bits = layout.field_bits().flatten().tolist()
    assert sorted(bits) == list(range(32))


@pytest.mark.parametrize("K,N", [(8, 4), (172, 32), (256, 72), (13, 8)])
def test_shuffle_round_trips(K, N):
    q = torch.randint(0, 16, (K, N), generator=torch.Generator().manual_seed(K * N))
    words = layout.shuffle(q)
    assert words.dtype == torch.int32 and words.shape == (layout.padded_k(K) // 8, N // 4, 4)
    assert torch.equal(layout.unshuffle(words, K, N), q.to(torch.uint8))


def test_one_value_lands_where_the_kernel_reads_it():
    """q[k=2 (pair 2), n=1 (high half of pair 0)] = 0xB: rotating word 0 right by 8 and masking
    0x03C003C0 leaves 0xB at bits 22-25, i.e. the half2's high half is 0x3C00 | 0xB << 6."""
    q = torch.zeros(8, 4, dtype=torch.int64)
    q[2, 1] = 0xB
    w = int(layout.shuffle(q)[0, 0, 0]) & 0xFFFFFFFF
    rot = ((w >> 8) | (w << 24)) & 0xFFFFFFFF
    assert (rot & 0x03C003C0) | 0x3C003C00 == 0x3C003C00 | (0xB << 22)
    assert all(int(v) == 0 for v in layout.shuffle(q).flatten()[1:])


def test_rejects_what_the_layout_cannot_hold():
    from gptq_core.errors import FormatError

    with pytest.raises(FormatError, match="N % 4"):
        layout.shuffle(torch.zeros(8, 6, dtype=torch.int64))
    with pytest.raises(FormatError, match="0..15"):
        layout.shuffle(torch.full((8, 4), 16))


def test_round_to_fp16_is_one_rounding():
    x = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 2**-25, 3 * 2**-25, 65504.0, -1 - 2**-11 - 2**-40], dtype=torch.float64)
    assert layout.round_to_fp16(x).tolist() == [1.0, 1 + 2 * 2**-10, 0.0, 2**-23, 65504.0, -1 - 2**-10]


@pytest.mark.parametrize("act_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("zero_format", ["v1", "v2"])
def test_kernel_decode_matches_the_float64_weight(act_dtype, sym, zero_format):
    """The kernel's bit operations on the shuffled words give (q - zero) * scale to within the
    fold's rounding: the zero term (16 + zero) * scale rounded once, then the fma's result."""
    packed = random_packed(4, 32, sym=sym, desc_act=True, in_features=172, out_features=72, seed=3,
                           zero_format=zero_format)
    p = prepare(packed, CPU, act_dtype)
    w = model.decode(p.q, p.sz, p.group_rows)[: packed.in_features]
    ref = packed.dequantize(torch.float64)[p.perm.long()]  # sorted order
    _, Z = layout.unfold_scales(p.sz)
    z = Z[torch.arange(172) // p.group_rows].abs()
    eps = 2.0**-11 if act_dtype == torch.float16 else 2.0**-24
    assert bool(((w - ref).abs() <= eps * (z + ref.abs()) + 1e-12).all())
    # The prepared form, read back with exact arithmetic in the original k order.
    back = reference_weight(p)[p.perm.long()]
    assert bool(((back - ref).abs() <= eps * z + 1e-12).all())


def test_act_order_permutation_sorts_groups_and_rejects_uneven_ones():
    from gptq_core.errors import NotSupportedError

    packed = random_packed(4, 32, desc_act=True, in_features=96, out_features=8, seed=5)
    perm = act_order_permutation(packed.g_idx, 96, 32)
    assert torch.equal(packed.g_idx.long()[perm], torch.arange(96) // 32)
    assert act_order_permutation(torch.arange(96, dtype=torch.int32) // 32, 96, 32) is None
    uneven = torch.tensor([0] * 40 + [1] * 24 + [2] * 32, dtype=torch.int32)
    with pytest.raises(NotSupportedError, match="exactly group_size=32"):
        act_order_permutation(uneven, 96, 32)


CASES = [
    # dtype, group size, sym, act-order, K, N, M, splits
    (torch.float16, 128, True, False, 256, 72, 1, 1),
    (torch.float16, 128, True, True, 256, 72, 7, 3),
    (torch.float16, -1, False, False, 172, 32, 2, 2),
    (torch.float16, 48, False, True, 172, 32, 16, 4),
    (torch.float16, 32, True, True, 172, 72, 3, 6),
    (torch.float16, 64, False, True, 256, 32, 9, 1),
    (torch.bfloat16, 128, True, True, 256, 72, 1, 2),
    (torch.bfloat16, 48, False, True, 172, 32, 7, 3),
    (torch.bfloat16, -1, True, False, 172, 72, 2, 1),
    (torch.bfloat16, 32, False, False, 256, 32, 16, 5),
]


@pytest.mark.parametrize("dtype,gs,sym,act,K,N,M,splits", CASES)
def test_simulated_kernel_matches_the_float64_reference(dtype, gs, sym, act, K, N, M, splits):
    """The whole kernel (staging through the permutation, group segments, 32- and 8-row steps
    with half2 partial sums, split-K in fp32, bias, final rounding) within the conformance
    tolerance of the float64 reference."""
    packed = random_packed(4, gs, sym=sym, desc_act=act, in_features=K, out_features=N,
                           seed=K + N + M + splits, bias=True)
    x = random_activations(M, K, dtype=dtype, seed=M * 7 + splits)
    p = prepare(packed, CPU, dtype)
    assert (p.perm is not None) == act
    bias = packed.bias.to(dtype)
    y = model.simulate_gemm(x, p.q, p.sz, p.perm, p.group_rows, bias, splits)
    ref = reference_matmul(x, packed, bias)
    check = check_close(y, ref, reference_bound(x, packed, ref), dtype)
    assert check.ok, check.message
    # And not by a wide margin only: a wrong row order or group would be far outside.
    assert check.worst < 0.5, check.message


def test_a_wrong_permutation_is_caught():
    """The model is sensitive: dropping the act-order permutation at staging fails the check."""
    packed = random_packed(4, 32, desc_act=True, in_features=256, out_features=32, seed=9)
    x = random_activations(2, 256, dtype=torch.float16, seed=1)
    p = prepare(packed, CPU, torch.float16)
    y = model.simulate_gemm(x, p.q, p.sz, None, p.group_rows, None, 1)
    ref = reference_matmul(x, packed)
    assert not check_close(y, ref, reference_bound(x, packed, ref), torch.float16).ok


def test_splits_cover_k_once_on_aligned_boundaries():
    for k_pad in (8, 176, 256, 8192):
        for splits in (1, 2, 3, 7, 64, 1000):
            ranges = model.splits_for(k_pad, splits)
            assert ranges[0][0] == 0 and ranges[-1][1] == k_pad
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(b % 32 == 0 for b, _ in ranges)


def test_prepare_is_deterministic_and_leaves_the_weight_alone():
    packed = random_packed(4, 128, sym=False, desc_act=True, in_features=256, out_features=72, seed=2, bias=True)
    before = snapshot(packed_tensors(packed))
    a, b = prepare(packed, CPU, torch.float16), prepare(packed, CPU, torch.float16)
    assert not changed(before, packed_tensors(packed))
    assert torch.equal(a.q, b.q) and torch.equal(a.sz, b.sz) and torch.equal(a.perm, b.perm)
    assert a.acc is b.acc  # one workspace per device


def test_fp16_fold_rejects_scales_that_overflow():
    from gptq_core.errors import NotSupportedError

    with pytest.raises(NotSupportedError, match="overflows"):
        layout.fold_scales(torch.full((1, 4), 3000.0), torch.full((1, 4), 8), torch.float16)
    sz = layout.fold_scales(torch.full((1, 4), 3000.0), torch.full((1, 4), 8), torch.bfloat16)
    assert sz.dtype == torch.float32
