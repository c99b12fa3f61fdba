"""The tile layout: repacking is invertible and matches what the kernel decodes (CPU only)."""

from __future__ import annotations

import random

import pytest
import torch

from gptq_core.errors import FormatError, NotSupportedError
from gptq_core.testing import random_activations, random_packed
from gptq_backend_marlin import layout
from gptq_backend_marlin.prepare import prepare, reference_weight

import marlin_kernel_model as km

SHAPES = [(64, 32), (128, 288), (192, 512), (320, 96)]  # partial and whole 256-column tiles


@pytest.mark.parametrize("bits", layout.LAYOUT_BITS)
@pytest.mark.parametrize("K,N", SHAPES)
def test_repack_then_unrepack_is_identity(bits, K, N):
    g = torch.Generator().manual_seed(K * N + bits)
    q = torch.randint(0, 2**bits, (K, N), generator=g)
    tiles = layout.repack(q, bits)
    assert tiles.dtype == torch.int32 and tiles.numel() == K * N * bits // 32
    assert torch.equal(layout.unrepack(tiles, bits, K, N).long(), q)


def test_every_value_lands_in_exactly_one_field():
    for bits in layout.LAYOUT_BITS:
        table = layout.fragment_table(bits).reshape(-1)
        assert torch.equal(table.sort().values, torch.arange(layout.TILE_K * layout.WARP_N))


def test_column_permutation_is_invertible_and_groups_lane_columns():
    t = torch.arange(2 * 64).view(2, 64)
    p = layout.permute_columns(t)
    assert torch.equal(layout.unpermute_columns(p), t)
    # lane group g reads 4 consecutive entries: columns g, g+8, g+16, g+24 of its 32-block
    assert p[0, 4 * 3:4 * 3 + 4].tolist() == [3, 11, 19, 27]
    assert p[1, 32 + 4 * 7:32 + 4 * 7 + 4].tolist() == [64 + 32 + 7 + 8 * j for j in range(4)]


@pytest.mark.parametrize("K,N", [(100, 32), (64, 48)])
def test_repack_rejects_shapes_the_tiles_cannot_hold(K, N):
    with pytest.raises(FormatError, match="K % 64"):
        layout.repack(torch.zeros(K, N, dtype=torch.int64), 4)


CASES = [  # bits, group size, sym, act-order, activation dtype
    (4, 128, True, False, torch.float16),
    (4, 32, False, True, torch.float16),
    (4, -1, True, True, torch.bfloat16),
    (4, 64, False, False, torch.bfloat16),
    (8, 128, True, True, torch.float16),
    (8, 32, False, False, torch.bfloat16),
    (8, -1, False, True, torch.bfloat16),
    (8, 256, True, False, torch.float16),
]


@pytest.mark.parametrize("bits,gs,sym,act,dtype", CASES)
def test_kernel_decode_matches_the_weight_bit_for_bit(bits, gs, sym, act, dtype):
    """The kernel's exponent-trick decode of each lane's registers, placed by the mma B
    fragment layout, gives round((q - z) * s) exactly, in the act-order-sorted k order."""
    K, N = (256 if gs == 256 else 128), 288
    packed = random_packed(bits, gs, sym, act, K, N, seed=bits * 1000 + K + (gs % 97))
    prepared = prepare(packed, torch.device("cpu"), dtype)
    got = km.decode_weight(prepared, dtype)
    q = packed.unpack_qweight().double()
    g = packed.g_idx.long()
    want = ((q - packed.zeros().double()[g]) * packed.scales.to(dtype).double()[g]).to(dtype).double()
    if prepared.perm is not None:
        want = want[prepared.perm]
    assert torch.equal(got, want)
    assert (prepared.perm is not None) == (act and gs != -1 and K > gs)
    assert (prepared.zeros is None) == sym


def test_prepare_is_inverted_by_reference_weight():
    packed = random_packed(4, 64, False, True, 192, 96, seed=5)
    prepared = prepare(packed, torch.device("cpu"), torch.float16)
    assert torch.equal(reference_weight(prepared), packed.dequantize(torch.float64))


def test_prepare_leaves_the_packed_weight_untouched():
    packed = random_packed(4, 32, False, True, 128, 64, seed=9)
    before = [t.clone() for t in (packed.qweight, packed.qzeros, packed.scales, packed.g_idx)]
    prepare(packed, torch.device("cpu"), torch.bfloat16)
    after = (packed.qweight, packed.qzeros, packed.scales, packed.g_idx)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_unequal_act_order_groups_are_rejected_with_a_reason():
    packed = random_packed(4, 64, True, True, 128, 64, seed=3)
    g_idx = packed.g_idx.clone()
    g_idx[g_idx == 0] = 1  # group 0 empty, group 1 twice as large
    g_idx[0] = 0
    with pytest.raises(NotSupportedError, match="exactly group_size=64"):
        prepare(packed.replace(g_idx=g_idx), torch.device("cpu"), torch.float16)


def test_fp32_activations_are_rejected():
    packed = random_packed(4, 64, True, False, 128, 64, seed=3)
    with pytest.raises(NotSupportedError, match="float16 or bfloat16"):
        prepare(packed, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("K,N,workers", [(128, 288, 1), (128, 288, 3), (320, 544, 7), (320, 544, 13),
                                         (64, 32, 1), (512, 256, 5), (256, 512, 8)])
def test_striped_partition_and_slot_reduction_cover_every_product_once(K, N, workers):
    """The kernel's stream-K bookkeeping, simulated with blocks finishing in random order."""
    g = torch.Generator().manual_seed(K + N + workers)
    x = torch.randn(3, K, generator=g, dtype=torch.float64)
    W = torch.randn(K, N, generator=g, dtype=torch.float64)
    order = list(range(workers))
    random.Random(workers).shuffle(order)
    got, stats = km.simulate_gemm(x, W, workers, order)
    torch.testing.assert_close(got, x @ W, rtol=1e-12, atol=1e-12)
    n_tiles, k_tiles = -(-(N // 32) // 8), K // 64
    assert stats["direct"] + stats["finalized"] == n_tiles
    if workers > 1 and k_tiles > 1 and n_tiles * k_tiles % workers:
        assert stats["partial"] > 0


def test_model_decode_times_activations_matches_reference():
    """End to end on the CPU: decoded weight x activations vs the float64 reference."""
    packed = random_packed(4, 128, True, True, 256, 288, seed=11)
    prepared = prepare(packed, torch.device("cpu"), torch.float16)
    x = random_activations(5, 256, dtype=torch.float16, seed=2)
    W = km.decode_weight(prepared, torch.float16)
    xs = x.double()[:, prepared.perm] if prepared.perm is not None else x.double()
    got, _ = km.simulate_gemm(xs, W, workers=3)
    ref = x.double() @ packed.dequantize(torch.float64)
    assert ((got - ref).norm() / ref.norm()).item() < 2e-3


@pytest.mark.parametrize("m_blocks", [1, 2, 3, 4])
def test_v3_finalizer_covers_every_valid_slot_element_once(m_blocks):
    """The unrolled (v3) stream-K finalizer: thread t, unrolled slot u reads the float4 at
    e = (u * 256 + t) * 4 of the row-major [rows][256] slot when e < rows * 256 and its column
    is < n_cols. Every valid element is summed exactly once and nothing past the slot is read."""
    threads, tile_n, slot_floats = 256, 256, 4 * 8 * 4 * 32 * 4  # marlin.h: kSlotFloats
    for rows in range(1, m_blocks * 16 + 1):
        need = -(-rows * tile_n // (threads * 4))
        # the kernel's choice of finalize_tile<T, E, CB>
        if need <= 1:
            k_e, k_cb = 1, 16
        elif need <= 2:
            k_e, k_cb = 2, 8
        elif m_blocks == 1 or need <= 4:
            k_e, k_cb = 4, 4
        elif m_blocks == 2:
            k_e, k_cb = 8, 1
        elif need <= 8:
            k_e, k_cb = 8, 2
        else:
            k_e, k_cb = 16, 1
        assert k_e >= need and k_e * k_cb <= 16
        for n_cols in range(32, 257, 32):
            seen = torch.zeros(rows * tile_n, dtype=torch.int64)
            for t in range(threads):
                c4 = (t * 4) % tile_n
                for u in range(k_e):
                    e = (u * threads + t) * 4
                    if c4 < n_cols and e < rows * tile_n:  # the loads issued
                        assert c4 == e % tile_n and e + 4 <= m_blocks * 16 * tile_n <= slot_floats
                        seen[e:e + 4] += 1
            want = (torch.arange(rows * tile_n) % tile_n < n_cols).long()
            assert torch.equal(seen, want), (rows, n_cols)


@pytest.mark.parametrize("group_shift", [-1, 6, 7, 8])
@pytest.mark.parametrize("workers", [1, 3, 7, 10, 20])
def test_scalefold_schedule_matches_the_scaled_product(group_shift, workers):
    """The scale-fold kernels' fold points (group ends inside a tile, every tile end, FRESH
    restarts) give x @ (U * scale) on a stream-K partition whose segments start mid-group."""
    K, N, M = 640, 320, 3  # 10 k tiles, 2 n tiles (the second partial): 20 iterations
    g = torch.Generator().manual_seed(group_shift + 100 * workers)
    U = torch.randint(-8, 8, (K, N), generator=g).double()
    G = 1 if group_shift < 0 else -(-K // (1 << group_shift))
    S = torch.rand(G, N, generator=g, dtype=torch.float64) + 0.5
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    rows = torch.zeros(K, dtype=torch.long) if group_shift < 0 else torch.arange(K) >> group_shift
    want = x @ (U * S[rows])
    got = km.simulate_gemm_scalefold(x, U, S, group_shift, workers)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-9), (got - want).abs().max()
