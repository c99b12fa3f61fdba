"""The Hopper (sm_90a) GEMM's layout and build, checked without a GPU.

* repack / unrepack are exact inverses;
* what each thread decodes from its words (a bit-level model of kernel.cuh's dequant4) is the
  dense weight at the positions PTX's mma.m16n8k16 A-fragment table names, for the rows the
  wgmma warpgroup layout gives each warp, with the scale rows the kernel stages (k offsets 0
  and 32 of each 64-k tile) for every supported group size;
* the stage geometry kernel.cuh uses (csrc/stage.h, compiled on the host with g++): 128-k stages
  (two 64-k tiles, eight k16 steps) at BM <= 64 and round 2's 64-k stages at BM 128, every
  copy landing once, wgmma's B reads through the 128-byte swizzle naming the X elements of each
  k16 step, the ring depths keeping round 2's blocks per SM, and a CPU emulation of the kernel's
  data flow with those tables (copies, zero fill, swizzle, words, scale rows, split-K) equal to
  the float64 product; split-K ranges are whole stages the launcher accepts;
* the sources compile for sm_90a with HGMMA in every GEMM kernel and no local memory.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from gptq_backend_marlin.hopper import build, layout, ops
from gptq_core.errors import FormatError, NotSupportedError
from gptq_core.sass import TORCH_NVCC_DEFINES, cuobjdump, kernels, opcode
from gptq_core.testing import random_packed

import hopper_kernel_model as hm

NVCC = shutil.which("nvcc")
CXX = shutil.which("g++")
TOKEN_TILES = (16, 32, 64, 128)
#: blocks per SM that round 2 had (and round 3 must keep): NOTES/hopper-wgmma.md
ROUND2_BLOCKS = {16: 3, 32: 3, 64: 2, 128: 2}
SMEM_PER_SM = 228 * 1024  #: H100 / H200; 1 KiB of it is reserved per resident block
#: K values of the models in view; 11008 = 86 x 128, 4160 = 65 x 64 (a trailing 64-k half stage)
KS = (4096, 8192, 14336, 11008, 28672, 4160, 320, 192, 64)


@pytest.mark.parametrize("K,N", [(64, 128), (192, 256), (512, 384)])
def test_repack_unrepack_are_exact_inverses(K, N):
    g = torch.Generator().manual_seed(K * N)
    q = torch.randint(0, 16, (K, N), generator=g, dtype=torch.int32)
    tiles = layout.repack(q)
    assert tiles.dtype == torch.int32 and tiles.numel() == K * N // 8
    assert torch.equal(layout.unrepack(tiles, K, N), q.to(torch.uint8))
    # every nibble lands once: a one-hot weight moves exactly one bit pattern
    flat = layout.fragment_table().reshape(-1)
    assert torch.equal(flat.sort().values, torch.arange(64 * 128))


def test_repack_rejects_shapes_the_tiles_cannot_hold():
    with pytest.raises(FormatError, match="N % 128"):
        layout.repack(torch.zeros(64, 96, dtype=torch.int32))
    with pytest.raises(FormatError, match="K % 64"):
        layout.repack(torch.zeros(96, 128, dtype=torch.int32))


def _a_fragment_positions(tid: int) -> list[list[tuple[tuple[int, int], tuple[int, int]]]]:
    """PTX ISA, wgmma A from registers (m64nNk16, f16): warp w of the warpgroup holds rows
    16w..16w+15, laid out as mma.m16n8k16's A: a0,a1 (g, 2t..2t+1), a2,a3 (g+8, 2t..),
    a4,a5 (g, 2t+8..), a6,a7 (g+8, 2t+8..) with g = lane / 4, t = lane % 4. Registers are
    pairs (a0a1 = reg 0, ...). Written out here independently of layout.py."""
    wg, warp, lane = tid // 128, (tid // 32) % 4, tid % 32
    g, t = lane // 4, lane % 4
    base = 64 * wg + 16 * warp
    regs = [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]
    return [[((base + r, 16 * j + c), (base + r, 16 * j + c + 1)) for r, c in regs] for j in range(4)]


@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("bf16", [False, True])
def test_each_thread_decodes_its_a_fragments(group_size, bf16):
    K, N = 256, 256
    packed = random_packed(bits=4, group_size=group_size, sym=group_size != 64, in_features=K, out_features=N, seed=3)
    q = packed.unpack_qweight().to(torch.int32)
    z = packed.zeros().to(torch.float64)
    s = packed.scales.to(torch.float64)
    dense = packed.dequantize(torch.float64)  # [K, N]
    tiles = layout.repack(q)
    gs = K if group_size == -1 else group_size
    rng = torch.Generator().manual_seed(1)
    threads = torch.randint(0, 256, (24,), generator=rng).tolist() + [0, 31, 127, 128, 255]
    for block in range(N // layout.BN):
        for kt in range(K // layout.TILE_K):
            k0 = kt * layout.TILE_K
            rows = [k0 // gs, (k0 + 32) // gs]  # the two scale rows kernel.cuh stages
            for tid in threads:
                got = hm.thread_fragments(tiles, K, N, block, kt, tid, z[rows], s[rows], bf16)
                want = _a_fragment_positions(tid)
                for j in range(4):
                    for i in range(4):
                        (n0, k_lo), (_, k_hi) = want[j][i]
                        n = block * layout.BN + n0
                        expect = (float(dense[k0 + k_lo, n]), float(dense[k0 + k_hi, n]))
                        assert got[j][i] == expect, (group_size, block, kt, tid, j, i, got[j][i], expect)


def test_decode_word_is_exact_on_every_nibble():
    """All 16 nibble values in every field, zero points 1..16: the fp16 1/16 fma path and the
    bf16 shifted path give q - z exactly (scale 1)."""
    for bf16 in (False, True):
        for z in (1, 8, 16):
            for v in range(16):
                word = int(sum(((v + p) % 16) << (4 * p) for p in range(8)))
                regs = hm.decode_word(word, (z, z), (1.0, 1.0), bf16)
                for i in range(4):
                    assert regs[i] == (float((v + i) % 16 - z), float((v + i + 4) % 16 - z))


def test_prepare_on_cpu_keeps_the_ints_sorts_act_order_and_drops_sym_zeros():
    packed = random_packed(bits=4, group_size=128, sym=True, desc_act=True, in_features=512, out_features=256, seed=2)
    p = ops.prepare(packed, "cpu", torch.float16)
    assert p.zeros is None and p.perm is not None and p.group_size == 128
    q = packed.unpack_qweight()
    assert torch.equal(layout.unrepack(p.tiles, 512, 256), q[p.perm])
    assert torch.equal(packed.g_idx[p.perm].long(), torch.arange(512) // 128)
    asym = ops.prepare(random_packed(bits=4, group_size=-1, sym=False, in_features=256, out_features=128, seed=4), "cpu", torch.bfloat16)
    assert asym.zeros is not None and asym.zeros.dtype == torch.bfloat16 and asym.group_size == 256
    with pytest.raises(NotSupportedError, match="4-bit"):
        ops.prepare(random_packed(bits=8, group_size=128, in_features=256, out_features=128), "cpu")
    with pytest.raises(NotSupportedError, match="multiple of 32"):
        ops.prepare(random_packed(bits=4, group_size=16, in_features=256, out_features=128), "cpu")


def test_token_tiles_and_split_plan():
    assert [ops.token_tile(m) for m in (1, 16, 17, 48, 128, 129, 256, 257, 4096)] == [16, 16, 32, 64, 128, 128, 128, 128, 128]
    assert [ops.stage_tiles(bm) for bm in TOKEN_TILES] == [2, 2, 2, 1]
    # the large prefill fills 132 SMs many times over: no split
    assert ops.plan_splits(4096, 28672, 8192, 128, 132) == 1
    # a small layer at M = 16 has 32 column blocks: split K to reach the SMs
    s = ops.plan_splits(16, 4096, 4096, 16, 132)
    assert 2 <= s <= 8
    # 4096x14336 has 112 column blocks: with 3 blocks per SM (BM 16) the plan must split K,
    # and counting block slots never splits less than counting SMs at small M
    assert ops.plan_splits(16, 14336, 4096, 16, 132, blocks_per_sm=3) >= 2
    assert ops.plan_splits(16, 14336, 4096, 16, 132, blocks_per_sm=3) >= ops.plan_splits(16, 14336, 4096, 16, 132)
    # the measured cases keep round 2's k per split (H200 run of round 2: 3 and 5 splits of
    # 22 and 26 64-k tiles; now 11 and 13 128-k stages)
    assert ops.plan_splits(16, 14336, 4096, 16, 132, blocks_per_sm=3) == 3
    assert ops.plan_splits(16, 28672, 8192, 16, 132, blocks_per_sm=3) == 5
    for m, n, k in ((16, 28672, 8192), (256, 4096, 14336), (64, 14336, 4096), (16, 4096, 11008), (32, 4096, 4160)):
        for occ in (1, 2, 3):
            bm = ops.token_tile(m)
            s = ops.plan_splits(m, n, k, bm, 132, occ)
            st = ops.k_stages(k, bm)
            assert 1 <= s <= ops.MAX_SPLITS
            assert ops.split_count(k, bm, s) == s, "the plan is a count the kernel launches as is"
            per = -(-st // s)
            assert s == 1 or per * ops.stage_tiles(bm) >= ops.MIN_SPLIT_TILES


@pytest.mark.parametrize("k", KS)
def test_split_ranges_are_whole_stages_covering_k(k):
    for bm in TOKEN_TILES:
        step = 64 * ops.stage_tiles(bm)
        assert ops.k_stages(k, bm) == -(-k // step)
        for want in range(1, 25):
            s = ops.split_count(k, bm, want)
            assert 1 <= s <= max(1, min(want, ops.k_stages(k, bm)))
            ranges = hm.split_ranges(k, bm, s)
            assert len(ranges) == s and ranges[0][0] == 0 and ranges[-1][1] == k
            for (b0, e0), (b1, _) in zip(ranges, ranges[1:]):
                assert e0 == b1
            for b, e in ranges:
                assert b < e, (k, bm, want, ranges)  # no empty split
                assert b % step == 0 and (e % step == 0 or e == k), (k, bm, ranges)
    # 11008 is 86 stages of 128: no half stage; 4160 ends with one
    assert ops.k_stages(11008, 16) == 86 and ops.k_stages(4160, 16) == 33 and 4160 % 128 == 64


# --- the stage geometry (csrc/stage.h on the host) ---------------------------------------------

@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    if CXX is None:
        pytest.skip("g++ not found: stage.h's tables cannot be compiled on the host")
    return hm.stage_tables(tmp_path_factory.mktemp("hopper_stage"), CXX, kts=sorted({k // 64 for k in KS}))


def _smem_blocks(smem: int) -> int:
    return SMEM_PER_SM // (smem + 1024)


def test_stage_shape_per_token_tile(stage):
    tabs = stage["tiles"]
    assert sorted(tabs) == list(TOKEN_TILES)
    for bm, g in tabs.items():
        sub = 2 if bm <= 64 else 1  # round 3: 128-k stages for the small tiles only
        assert g["sub"] == g["stage_tiles"] == ops.stage_tiles(bm) == sub
        assert g["steps"] == 4 * sub and g["rows"] == 2 * sub and g["x_chunks"] == sub * bm * 8
        assert g["x_tile"] == bm * 128 and g["x_bytes"] == sub * bm * 128 and g["w_bytes"] == sub * 4096
        assert g["s_bytes"] == 2 * sub * 256 and g["stage_bytes"] == g["x_bytes"] + g["w_bytes"] + 2 * g["s_bytes"]
        assert g["x_tile"] % 1024 == 0 and g["stage_bytes"] % 1024 == 0  # swizzle atoms stay aligned
        assert g["load_ahead"] == g["stages"] - 2 >= 1
        assert g["smem"] == max(g["stages"] * g["stage_bytes"], g["out_bytes"]) + 1024 <= 227 * 1024
        assert g["out_bytes"] == bm * 132 * 4
        # the ring keeps round 2's blocks per SM (shared memory), the register cap agrees
        assert _smem_blocks(g["smem"]) >= ROUND2_BLOCKS[bm], (bm, g["smem"])
        assert g["min_blocks"] == min(ROUND2_BLOCKS[bm], 3)
    # the depths and sizes this round settled on (NOTES/hopper-wgmma.md, round 3)
    assert {bm: (g["stages"], g["smem"]) for bm, g in tabs.items()} == {
        16: (5, 72704), 32: (4, 74752), 64: (4, 107520), 128: (5, 108544)}


def test_stage_copies_land_once(stage):
    for bm, g in stage["tiles"].items():
        sub, rows = g["sub"], g["rows"]
        # X: every (token row, 8-wide k chunk of the stage) once, 16-byte slots tiling the X area
        assert sorted((r, k) for _, r, k, _ in g["x"]) == [(r, k) for r in range(bm) for k in range(0, 64 * sub, 8)]
        assert sorted(d for d, *_ in g["x"]) == list(range(0, g["x_bytes"], 16))
        for d, r, k, h in g["x"]:
            assert h == k // 64 and d // g["x_tile"] == h  # sub-tile h holds the k offsets 64 h ..
            assert (d % g["x_tile"]) // 128 == r  # row r at 128 r of its sub-tile ...
            assert (d % 128) // 16 == ((k % 64) // 8) ^ (r % 8)  # ... its chunks swizzled by hand
        # weights: tile h of stage s is layout.py's tile sub s + h; 16 bytes per thread in order
        assert [t for _, _, t in g["tile_of"]] == [s_ * sub + h for s_, h, _ in g["tile_of"]]
        assert sorted(d for _, _, d, _ in g["w"]) == list(range(g["x_bytes"], g["x_bytes"] + g["w_bytes"], 16))
        assert all(d == g["x_bytes"] + 4096 * h + 16 * t and src == 256 * h + t for h, t, d, src in g["w"])
        # scales (which 0) and zero points (which 1): rows at k offsets 0, 32 (, 64, 96)
        seen = sorted((w, r, ch) for _, w, r, ch, _, _ in g["s"])
        assert seen == [(w, r, ch) for w in range(2) for r in range(rows) for ch in range(16)]
        assert [t for t, w, *_ in g["s"] if w == 0] == list(range(16 * rows))  # sym: the first 16 x rows threads
        assert all(sk == 32 * r for _, _, r, _, sk, _ in g["s"])
        base = g["x_bytes"] + g["w_bytes"]
        assert g["s_base"] == [base, base + g["s_bytes"]]
        assert sorted(d for *_, d in g["s"]) == list(range(base, g["stage_bytes"], 16))
        assert all(d == g["s_base"][w] + 256 * r + 16 * ch for _, w, r, ch, _, d in g["s"])
        # step j reads the scale row of its k offsets 16 j .. 16 j + 15 (group sizes % 32 == 0)
        assert [32 * r <= 16 * j < 32 * r + 32 for j, r in enumerate(g["s_row_of_step"])] == [True] * g["steps"]


def test_wgmma_b_operand_reads_each_steps_x_through_the_swizzle(stage):
    """Fill the X sub-tiles as load_stage does with (token, k) tags, read them back as wgmma's
    B operand does for each k16 step (descriptor start x_step(j), 8-row groups 1024 bytes apart
    (SBO), rows 128 bytes apart, then the 128-byte swizzle): token n, k offset 16 j + kk."""
    for bm, g in stage["tiles"].items():
        cells = {}
        for d, r, k, _ in g["x"]:
            for e in range(8):
                cells[d + 2 * e] = (r, k + e)
        assert len(cells) == g["x_bytes"] // 2
        for j, start in enumerate(g["x_step"]):
            assert start % 32 == 0 and (start % 128) // 32 == j % 4  # +32 bytes per k16 step
            for n in range(bm):
                for kk in range(16):
                    addr = hm.swizzle128(start + (n // 8) * 1024 + (n % 8) * 128 + 2 * kk)
                    assert cells[addr] == (n, 16 * j + kk), (bm, j, n, kk, cells[addr])


def _reference(prepared, x):
    """x @ W in float64 from the prepared (sorted) tensors: the layout's ints, the scales and
    zeros in the activation dtype, group k // group_size after the act-order sort."""
    K, N = prepared.in_features, prepared.out_features
    q = layout.unrepack(prepared.tiles, K, N).to(torch.float64)
    grp = torch.arange(K) // prepared.group_size
    s = prepared.scales.to(torch.float64)[grp]
    z = prepared.zeros.to(torch.float64)[grp] if prepared.zeros is not None else 8.0
    xs = x if prepared.perm is None else x.index_select(1, prepared.perm)
    return (xs.to(torch.float64) @ ((q - z) * s)).numpy()


# (token tile, K, M, group size, sym, dtype, act-order, requested splits): the 128-k stages
# (K = 384: whole stages; 320: a trailing 64-k half stage), rows beyond M, split-K on stage
# boundaries, asymmetric zeros, g32 / g64 / g-1, bf16, act-order; and BM 128 (64-k stages),
# M beyond 128 tiled over 128-row tiles (what token_tile picks).
EMULATED = [
    (16, 384, 16, 128, True, torch.float16, False, 1),
    (16, 384, 16, 128, True, torch.float16, False, 3),
    (16, 320, 5, 64, False, torch.float16, False, 2),
    (16, 320, 9, 32, True, torch.bfloat16, False, 3),
    (32, 320, 20, -1, True, torch.float16, False, 1),
    (32, 512, 32, 32, False, torch.bfloat16, True, 2),
    (64, 320, 40, 32, True, torch.float16, True, 2),
    (64, 448, 64, 128, False, torch.bfloat16, False, 1),
    (128, 320, 100, 64, False, torch.float16, False, 2),
    (128, 192, 200, 64, False, torch.float16, False, 1),
    (128, 192, 130, 32, True, torch.bfloat16, False, 1),
]


@pytest.mark.parametrize("bm,K,M,group_size,sym,dtype,act,want", EMULATED)
def test_kernel_emulation_equals_float64(stage, bm, K, M, group_size, sym, dtype, act, want):
    assert ops.token_tile(M) == bm
    packed = random_packed(bits=4, group_size=group_size, sym=sym, desc_act=act, in_features=K, out_features=256,
                           seed=K + M)
    p = ops.prepare(packed, "cpu", dtype)
    assert (p.zeros is None) == sym and (p.perm is not None) == act
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
    xs = x if p.perm is None else x.index_select(1, p.perm)
    splits = ops.split_count(K, bm, want)
    assert splits == want  # the cases ask for counts the kernel launches as they are
    y = hm.emulate_gemm(stage["tiles"][bm], xs, p.tiles, p.scales, p.zeros, p.group_size, splits)
    ref = _reference(p, x)
    err = float(abs(y - ref).max() / abs(ref).max())
    assert err < 1e-12, (bm, K, M, splits, err)


def test_kernel_emulation_fails_on_index_errors(stage):
    """The emulation is sensitive to each index it takes from stage.h: the round-2 descriptor
    offsets for steps 4..7 (no second sub-tile), the scale rows of the first half, a stage
    that copies its first weight tile twice, and an unswizzled X copy all give wrong products."""
    bm, K, M = 16, 384, 16
    packed = random_packed(bits=4, group_size=32, sym=False, in_features=K, out_features=128, seed=9)
    p = ops.prepare(packed, "cpu", torch.float16)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(9)).to(torch.float16)
    ref = _reference(p, x)
    good = stage["tiles"][bm]

    def err(geom):
        y = hm.emulate_gemm(geom, x, p.tiles, p.scales, p.zeros, p.group_size, 1)
        return float(abs(y - ref).max() / abs(ref).max())

    assert err(good) < 1e-12
    wrong = [
        dict(good, x_step=[32 * (j % 4) for j in range(8)]),
        dict(good, s_row_of_step=[(j >> 1) % 2 for j in range(8)]),
        dict(good, w=[[h, t, d, t] for h, t, d, _ in good["w"]]),  # both halves copy the first tile
        dict(good, x=[[(d // 128) * 128 + (((k % 64) // 8) << 4), r, k, h] for d, r, k, h in good["x"]]),
    ]
    for geom in wrong:
        assert err(geom) > 1e-3


def test_split_partition_is_what_the_launcher_accepts(stage):
    """launch_one (kernel.cuh) takes ``stages_per_split`` and rejects a count whose last split
    would be empty; ops.split_count / split_ranges must agree with stage.h's arithmetic."""
    table = {(kt, sub, s): (ks, per) for kt, sub, s, ks, per in stage["splits"]}
    for k in KS:
        kt = k // 64
        for bm in TOKEN_TILES:
            sub = ops.stage_tiles(bm)
            for want in range(1, 25):
                s = ops.split_count(k, bm, want)
                ks, per = table[(kt, sub, s)]
                assert ks == ops.k_stages(k, bm)
                assert -(-ks // per) == s, (k, bm, want, s)  # the launcher's check passes
                got = [(z * per * sub * 64, min(k, (z + 1) * per * sub * 64)) for z in range(s)]
                assert got == hm.split_ranges(k, bm, s)


# --- the sm_90a build ---------------------------------------------------------------------------

GEMM = re.compile(r"hopper_gemm_kernelI(\w+?)Li(\d+)ELb(\d)E")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA toolkit is not installed")
    out = tmp_path_factory.mktemp("hopper_sm90a")
    results = {}
    for path in build.sources():
        if path.suffix != ".cu":
            continue
        cmd = [NVCC, *build.ARCH_FLAGS, "-O3", "-std=c++17", *TORCH_NVCC_DEFINES, "-Xptxas", "-v",
               "-c", str(path), "-o", str(out / (path.stem + ".o"))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        results[path.stem] = (proc.returncode, proc.stdout + proc.stderr, out / (path.stem + ".o"))
    return results


def test_sources_compile_for_sm90a_without_local_memory(compiled, stage):
    assert set(compiled) == {"hopper_f16", "hopper_bf16", "hopper_reduce"}
    for stem, (code, log, _) in compiled.items():
        assert code == 0, f"{stem} failed:\n{log[-3000:]}"
        assert "warning" not in log.lower(), f"{stem}:\n{log[-3000:]}"
        entries = re.findall(r"Compiling entry function '(\w+)'.*?\n\s*(\d+) bytes stack frame, (\d+) bytes spill "
                             r"stores, (\d+) bytes spill loads", log, re.S)
        assert entries, f"{stem}: no kernels"
        for name, frame, st, ld in entries:
            assert (frame, st, ld) == ("0", "0", "0"), f"{stem}: {name} uses local memory"
        if stem != "hopper_reduce":
            gemms = [n for n, *_ in entries if GEMM.search(n)]
            assert len(gemms) == 8, f"{stem}: {len(gemms)} GEMM kernels (4 token tiles x sym/asym)"
            regs_of = {n: int(r) for n, r in re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", log, re.S)}
            assert set(gemms) <= set(regs_of)
            for name in gemms:
                bm, regs = int(GEMM.search(name).group(2)), regs_of[name]
                # blocks per SM: registers (allocated per warp in steps of 8 per thread) and the
                # dynamic shared memory of stage.h both keep round 2's count
                by_regs = 65536 // (-(-regs // 8) * 8 * 256)
                blocks = min(by_regs, _smem_blocks(stage["tiles"][bm]["smem"]))
                assert blocks >= ROUND2_BLOCKS[bm], f"{stem}: {name}: {regs} registers, {blocks} blocks per SM"


def test_every_gemm_kernel_issues_hgmma_of_its_token_tile(compiled):
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found: compiled, but the SASS checks were skipped")
    for stem in ("hopper_f16", "hopper_bf16"):
        code, _, obj = compiled[stem]
        assert code == 0
        sass = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, timeout=300).stdout
        found = {n: ins for n, ins in kernels(sass).items() if GEMM.search(n)}
        assert len(found) == 8
        for name, ins in found.items():
            bm = int(GEMM.search(name).group(2))
            steps = 8 if bm <= 64 else 4  # 128-k stages (round 3) at BM <= 64
            ops_ = [opcode(t) for _, t in ins]
            hgmma = [t for _, t in ins if opcode(t) == "HGMMA"]
            assert len(hgmma) == steps, f"{stem}: {name}: {len(hgmma)} HGMMA (one per k16 step)"
            # one barrier per stage (plus the epilogue's two); one arrive (wgmma.fence) per step
            # and the waits kernel.cuh writes (steps 2.., the stage end, the epilogue): a wgmma
            # serialised by ptxas would add waits
            full = [re.sub(r"^@!?U?P\w+\s+", "", t) for _, t in ins]  # without predicates
            assert ops_.count("BAR") == 3, f"{stem}: {name}: {ops_.count('BAR')} BAR"
            assert sum(t.startswith("WARPGROUP.ARRIVE") for t in full) == steps, f"{stem}: {name}"
            assert sum(t.startswith("WARPGROUP.DEPBAR") for t in full) == steps, f"{stem}: {name}"
            assert all(f"64x{bm}x16.F32" in t for t in hgmma), f"{stem}: {name}: {hgmma[0]}"
            if stem == "hopper_bf16":
                assert all("BF16" in t for t in hgmma), f"{stem}: {name}: {hgmma[0]}"
            assert "LDL" not in ops_ and "STL" not in ops_, f"{stem}: {name} touches local memory"
            assert "LDGSTS" in ops_ and "FENCE" in ops_, f"{stem}: {name}: no cp.async ring / proxy fence"
