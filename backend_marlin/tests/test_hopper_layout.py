"""The Hopper (sm_90a) GEMM's layout and build, checked without a GPU.

* repack / unrepack are exact inverses;
* what each thread decodes from its words (a bit-level model of kernel.cuh's dequant4) is the
  dense weight at the positions PTX's mma.m16n8k16 A-fragment table names, for the rows the
  wgmma warpgroup layout gives each warp, with the scale rows the kernel stages (k offsets 0
  and 32 of each 64-k tile) for every supported group size;
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
    assert [ops.token_tile(m) for m in (1, 16, 17, 48, 128, 129, 256, 257, 4096)] == [16, 16, 32, 64, 128, 256, 256, 256, 256]
    # the large prefill fills 132 SMs many times over: no split
    assert ops.plan_splits(4096, 28672, 8192, 256, 132) == 1
    # a small layer at M = 16 has 32 column blocks: split K to reach the SMs
    s = ops.plan_splits(16, 4096, 4096, 16, 132)
    assert 2 <= s <= 8
    # 4096x14336 has 112 column blocks: with 3 blocks per SM (BM 16) the plan must split K,
    # and counting block slots never splits less than counting SMs at small M
    assert ops.plan_splits(16, 14336, 4096, 16, 132, blocks_per_sm=3) >= 2
    assert ops.plan_splits(16, 14336, 4096, 16, 132, blocks_per_sm=3) >= ops.plan_splits(16, 14336, 4096, 16, 132)
    for m, n, k in ((16, 28672, 8192), (256, 4096, 14336), (64, 14336, 4096)):
        s = ops.plan_splits(m, n, k, ops.token_tile(m), 132)
        kt = k // 64
        assert 1 <= s <= ops.MAX_SPLITS and (s == 1 or -(-kt // s) >= ops.MIN_SPLIT_TILES)


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


def test_sources_compile_for_sm90a_without_local_memory(compiled):
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
            assert len(gemms) == 10, f"{stem}: {len(gemms)} GEMM kernels (5 token tiles x sym/asym)"
            for name, regs in re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", log, re.S):
                m = GEMM.search(name)
                if m and int(m.group(2)) <= 128:  # two blocks of 256 threads per SM
                    assert int(regs) <= 128, f"{stem}: {name} uses {regs} registers"


def test_every_gemm_kernel_issues_hgmma_of_its_token_tile(compiled):
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found: compiled, but the SASS checks were skipped")
    for stem in ("hopper_f16", "hopper_bf16"):
        code, _, obj = compiled[stem]
        assert code == 0
        sass = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, timeout=300).stdout
        found = {n: ins for n, ins in kernels(sass).items() if GEMM.search(n)}
        assert len(found) == 10
        for name, ins in found.items():
            bm = int(GEMM.search(name).group(2))
            ops_ = [opcode(t) for _, t in ins]
            hgmma = [t for _, t in ins if opcode(t) == "HGMMA"]
            assert len(hgmma) == 4, f"{stem}: {name}: {len(hgmma)} HGMMA (one per k16 step)"
            assert all(f"64x{bm}x16.F32" in t for t in hgmma), f"{stem}: {name}: {hgmma[0]}"
            if stem == "hopper_bf16":
                assert all("BF16" in t for t in hgmma), f"{stem}: {name}: {hgmma[0]}"
            assert "LDL" not in ops_ and "STL" not in ops_, f"{stem}: {name} touches local memory"
            assert "LDGSTS" in ops_ and "FENCE" in ops_, f"{stem}: {name}: no cp.async ring / proxy fence"
