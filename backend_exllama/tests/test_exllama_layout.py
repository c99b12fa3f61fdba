"""The shuffled layout, the folded constants and a bit-level model of the kernel, on the CPU,
against gptq_core's float64 reference (docs/DESIGN.md §5 tolerances)."""

from __future__ import annotations

import pytest
import torch

from gptq_core.format import pack_weight
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


def _sorted_g(p) -> torch.Tensor:
    return torch.arange(p.q.shape[0] * 8) // p.group_rows


@pytest.mark.parametrize("act_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("zero_format", ["v1", "v2"])
def test_kernel_decode_is_exact(act_dtype, sym, zero_format):
    """The kernel's bit operations on the shuffled words give (q - zero) * scale with no rounding
    of their own: fp16, the decoded d times the column factor M is exact (and the dequantize
    kernel's weight is its one rounding to fp16); bf16, the fma is its one rounding to fp32."""
    packed = random_packed(4, 32, sym=sym, desc_act=True, in_features=172, out_features=72, seed=3,
                           zero_format=zero_format)
    p = prepare(packed, CPU, act_dtype)
    ref = packed.dequantize(torch.float64)[p.perm.long()]  # sorted order
    vals, m = model.decode(p.q, p.sz, p.group_rows)
    dense = model.dequantize(p.q, p.sz, p.group_rows)[:172]
    if act_dtype == torch.float16:
        assert torch.equal((vals * m[_sorted_g(p)])[:172], ref)
        assert torch.equal(dense, ref.to(torch.float16).to(torch.float64))
    else:
        assert m is None
        assert torch.equal(vals[:172], ref.to(torch.float32).to(torch.float64))
        assert torch.equal(dense, ref.to(torch.float32).to(torch.bfloat16).to(torch.float64))
    # The prepared form, read back with exact arithmetic in the original k order.
    assert torch.equal(reference_weight(p), packed.dequantize(torch.float64))


def _weight_with_exact_zeros(zero_format: str) -> tuple:
    """K=64 x N=8, one group per 32 rows. Every row k = 5 (mod 8) has q == zero in every column;
    the scales are ones whose old fold (Z = -(16 + zero) * scale rounded to fp16) left a residue
    at q == zero. v1 zeros include 16 (stored 15: the v1 encoding of an asymmetric zero of 0)."""
    K, N, gs = 64, 8, 32
    G = K // gs
    scales = torch.tensor([[0.0123, 0.0456, 0.00789, 0.1011, 0.02347, 0.3131, 0.0577, 1.7071],
                           [0.0311, 0.0079, 0.2222, 0.0042, 0.0999, 0.0137, 0.6543, 0.0101]])
    low = 1 if zero_format == "v1" else 0
    zeros = torch.tensor([[low, 3, 8, 15, 16 if zero_format == "v1" else 15, 9, 2, 7],
                          [12, low, 5, 8, 11, 14, 16 if zero_format == "v1" else 0, 1]], dtype=torch.int32)
    q = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(11), dtype=torch.int32)
    k = torch.arange(K)
    g = k // gs
    exact = k % 8 == 5
    q[:, exact] = zeros[g[exact]].t().clamp(max=15)  # q == zero (zero 16 cannot be a q)
    packed = pack_weight(q, scales, zeros, bits=4, group_size=gs, sym=False, zero_format=zero_format)
    assert G == 2
    return packed, exact


@pytest.mark.parametrize("zero_format", ["v1", "v2"])
@pytest.mark.parametrize("act_dtype", [torch.float16, torch.bfloat16])
def test_q_equal_to_zero_is_exactly_zero_so_inf_inputs_give_nan(act_dtype, zero_format):
    """docs/DESIGN.md §5 (NaN/Inf propagate as IEEE says): W = s * (q - z) is exactly 0 where
    q == z, so an infinite activation there makes NaN in the float64 reference; the kernel must
    decode exactly 0 too (the fp16 fold with Z = -(16 + zero) * scale rounded left a tiny residue
    and gave inf, measured on an H200). The kernel model gives NaN exactly where the reference
    does, through the gemm kernel and the dequantize kernel."""
    packed, exact = _weight_with_exact_zeros(zero_format)
    K, N = packed.in_features, packed.out_features
    ref_w = packed.dequantize(torch.float64)
    z = packed.zeros()
    hit = packed.unpack_qweight().to(torch.int32) == z[torch.arange(K) // 32]   # [K, N]: q == zero
    assert bool(hit[exact].sum() >= 7 * 8) and bool((ref_w[hit] == 0).all())
    # The data exercises the old defect: its fp16 fold decoded q == zero to a nonzero.
    s = packed.scales.to(torch.float64)
    old_S, old_Z = layout.round_to_fp16(16 * s), layout.round_to_fp16(-(16 + z.to(torch.float64)) * s)
    old_zero_w = layout.round_to_fp16((1 + z.clamp(max=15).to(torch.float64) / 16) * old_S + old_Z)
    assert bool((old_zero_w[z <= 15] != 0).any())

    p = prepare(packed, CPU, act_dtype)
    vals, m = model.decode(p.q, p.sz, p.group_rows)
    w = vals if m is None else vals * m[_sorted_g(p)]
    assert bool((w[:K][hit] == 0).all())
    assert bool((model.dequantize(p.q, p.sz, p.group_rows)[:K][hit] == 0).all())

    x = random_activations(4, K, dtype=act_dtype, seed=4)
    rows = exact.nonzero().flatten().tolist()
    x[0, rows[0]] = float("inf")
    x[1, rows[-1]] = float("-inf")
    x[2, 0] = float("nan")
    ref = reference_matmul(x, packed)
    assert bool(torch.isnan(ref[0]).any()) and bool(torch.isnan(ref[1]).any())
    for y in (model.simulate_gemm(x, p.q, p.sz, p.perm, p.group_rows, None, splits=2),
              model.dequantize(p.q, p.sz, p.group_rows)[:K].T.matmul(x.to(torch.float64).T).T):
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), (y, ref)
        assert torch.equal(torch.isinf(y), torch.isinf(ref))
        check = check_close(y, ref, reference_bound(x, packed, ref), act_dtype)
        assert check.ok, check.message


@pytest.mark.parametrize("act_dtype", [torch.float16, torch.bfloat16])
def test_degenerate_and_extreme_scales_decode_exactly(act_dtype):
    """Scales whose 16 * scale is zero, subnormal in fp16, negative or just below the fold's
    2^15 limit: the pivot is clamped to 2^-14 (so x stays a normal fp16) and M = S / P stays
    exact, so every weight is still (q - zero) * scale exactly; a zero scale with an infinite
    activation gives NaN in every column that has it, as the reference does."""
    N, K = 8, 32
    scales = torch.tensor([[0.0, 2.0**-24, 3 * 2.0**-20, -0.0123, 2.0**-18, 2047.0, -1500.0, 6.1e-5]])
    zeros = torch.tensor([[8, 0, 15, 3, 7, 8, 4, 12]], dtype=torch.int32)
    q = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    packed = pack_weight(q, scales, zeros, bits=4, group_size=-1, sym=False, zero_format="v2")
    p = prepare(packed, CPU, act_dtype)
    ref = packed.dequantize(torch.float64)
    vals, m = model.decode(p.q, p.sz, p.group_rows)
    w = vals if m is None else vals * m[_sorted_g(p)]
    rounded = ref.to(torch.float32).to(torch.float64)
    assert torch.equal(w[:K], ref if m is not None else rounded)
    assert torch.equal(reference_weight(p), ref)
    if act_dtype == torch.float16:
        S, _ = layout.unfold_scales(p.sz)
        assert layout.pivots(S).min() == 2.0**-14 and layout.pivots(S).max() == 2.0**14
    x = random_activations(2, K, dtype=act_dtype, seed=8)
    x[0, 3] = float("inf")
    y = model.simulate_gemm(x, p.q, p.sz, None, p.group_rows, None, splits=1)
    ref_y = reference_matmul(x, packed)
    assert bool(torch.isnan(y[0, 0])) and bool(torch.isnan(ref_y[0, 0]))
    check = check_close(y, ref_y, reference_bound(x, packed, ref_y), act_dtype)
    assert check.ok, check.message


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
    """fp16 layers need |16 * scale| < 2^15 (the pivot and the v1 zero's X0 = 2P in fp16);
    bf16 layers fold in fp32 and take any fp16 scale."""
    from gptq_core.errors import NotSupportedError

    with pytest.raises(NotSupportedError, match="largest scale 2048 reaches it"):
        layout.fold_scales(torch.full((1, 4), 2048.0), torch.full((1, 4), 8), torch.float16)
    sz = layout.fold_scales(torch.full((1, 4), 2047.0), torch.full((1, 4), 16), torch.float16)
    assert bool(torch.isfinite(sz).all())
    sz = layout.fold_scales(torch.full((1, 4), 3000.0), torch.full((1, 4), 8), torch.bfloat16)
    assert sz.dtype == torch.float32


def test_fold_rejects_zeros_that_are_not_4_bit():
    from gptq_core.errors import FormatError

    with pytest.raises(FormatError, match=r"zero points in 0..16, got 0..17"):
        layout.fold_scales(torch.full((1, 4), 0.5), torch.tensor([[0, 17, 3, 4]]), torch.float16)


def test_bf16_fold_rejects_scales_it_cannot_hold_exactly():
    """Z = -(16 + zero) * scale must be exact in fp32 for the fma to give exactly 0 at q == zero:
    true for fp16 scales (PackedWeight's), not for an arbitrary float32 one."""
    from gptq_core.errors import NotSupportedError

    with pytest.raises(NotSupportedError, match="exact in float32"):
        layout.fold_scales(torch.full((1, 4), 0.1, dtype=torch.float64), torch.full((1, 4), 3), torch.bfloat16)
