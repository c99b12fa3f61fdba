"""A bit-level model of the Hopper kernel's dequantization (``hopper/csrc/kernel.cuh``'s
``dequant4``), written from the kernel, so that the tests can check it against layout.py's
fragment table and the float64 weight on a CPU (as marlin_kernel_model.py does for marlin).
"""

from __future__ import annotations

import math

import torch
from marlin_kernel_model import _halves

from gptq_backend_marlin.hopper import layout, ops


def decode_word(word: int, zeros: tuple[float, float], scales: tuple[float, float],
                bf16: bool = False) -> list[tuple[float, float]]:
    """A model of kernel.cuh's ``dequant4``, bit for bit up to the final products (taken in
    float64 here): one 32-bit word -> registers a0..a3 as (low, high) values. ``zeros`` and
    ``scales`` are row lo's and row hi's (a0, a2 use row lo; a1, a3 row hi)."""
    word &= 0xFFFFFFFF
    magic = 0x43004300 if bf16 else 0x64006400
    regs = []
    for i in range(4):
        row = i & 1
        if bf16:
            lo, hi = _halves(((word >> (4 * i)) & 0x000F000F) | magic, torch.bfloat16)
            vals = (lo - 128.0 - zeros[row], hi - 128.0 - zeros[row])
        else:
            shifted = word >> (8 * (i >> 1))
            mask = 0x00F000F0 if i & 1 else 0x000F000F
            lo, hi = _halves((shifted & mask) | magic, torch.float16)
            if i & 1:  # 1024 + 16 n, scaled by 1/16 in an exact fma
                vals = (lo / 16 - 64.0 - zeros[row], hi / 16 - 64.0 - zeros[row])
            else:
                vals = (lo - 1024.0 - zeros[row], hi - 1024.0 - zeros[row])
        regs.append((vals[0] * scales[row], vals[1] * scales[row]))
    return regs


def thread_fragments(tiles: torch.Tensor, K: int, N: int, block: int, kt: int, tid: int,
                     zero: torch.Tensor, scale: torch.Tensor, bf16: bool = False) -> list[list[tuple[float, float]]]:
    """What thread ``tid`` holds for tile (``block``, ``kt``): [4 k16 steps][a0..a3] of (low,
    high) values, decoded by :func:`decode_word` from the repacked words with the zero points
    and scales ([G, N] tensors, ``group_size``-free: the caller passes the rows of the groups
    of k offsets 0 and 32 as [2, N]). The tests compare it with the dense weight at the
    positions PTX's A-fragment table names."""
    words = tiles.reshape(N // layout.BN, K // layout.TILE_K, layout.THREADS, layout.WORDS)[block, kt, tid].to(torch.int64) & 0xFFFFFFFF
    lo, _, _ = layout.thread_rows(tid)
    n_lo = block * layout.BN + lo
    out = []
    for j in range(layout.WORDS):
        r = j >> 1  # the scale row of k offsets 0 (steps 0, 1) and 32 (steps 2, 3)
        z = (float(zero[r, n_lo]), float(zero[r, n_lo + 8]))
        s = (float(scale[r, n_lo]), float(scale[r, n_lo + 8]))
        out.append(decode_word(int(words[j]), z, s, bf16))
    return out


# --- the pipeline stage (round 3: 128-k stages at BM <= 64) ------------------------------------
#
# csrc/stage.h holds the stage geometry kernel.cuh uses: where each cp.async copy of a stage
# lands in shared memory, where each k16 step's operands are read, the ring depth and the split-K
# partition. stage_tables() compiles that very header on the host with g++ and dumps its tables;
# emulate_gemm() then runs the kernel's data flow on a CPU with them: load_stage's copies into a
# byte-exact shared-memory image, wgmma's B reads through the 128-byte swizzle, the A fragments
# decoded by decode_word from the words and scale rows read back, split by split.

STAGE_DUMP = r"""
#include <cstdio>
#include <cstdlib>
#include "stage.h"
using namespace gptq_hopper;

template <int BM>
void dump(const char* sep) {
  using C = Cfg<BM>;
  std::printf("\"%d\": {\"bm\": %d, \"sub\": %d, \"stage_tiles\": %d, \"stages\": %d, \"load_ahead\": %d, "
              "\"steps\": %d, \"rows\": %d, \"x_tile\": %d, \"x_bytes\": %d, \"w_bytes\": %d, \"s_bytes\": %d, "
              "\"stage_bytes\": %d, \"smem\": %d, \"out_bytes\": %d, \"min_blocks\": %d, \"x_chunks\": %d, "
              "\"s_base\": [%d, %d],\n",
              BM, BM, C::kSub, stage_tiles(BM), C::kStages, C::kLoadAhead, C::kSteps, C::kRows, C::kXTile,
              C::kXBytes, C::kWBytes, C::kSBytes, C::kStageBytes, C::kSmem, C::kOutBytes, C::kMinBlocks,
              C::kXChunks, C::s_dst(0, 0, 0), C::s_dst(1, 0, 0));
  std::printf("\"x\": [");
  for (int c = 0; c < C::kXChunks; ++c)
    std::printf("%s[%d, %d, %d, %d]", c ? ", " : "", C::x_dst(c), C::x_row(c), C::x_k(c), C::x_half(c));
  std::printf("],\n\"x_step\": [");
  for (int j = 0; j < C::kSteps; ++j) std::printf("%s%d", j ? ", " : "", C::x_step(j));
  std::printf("],\n\"s_row_of_step\": [");
  for (int j = 0; j < C::kSteps; ++j) std::printf("%s%d", j ? ", " : "", C::s_row_of_step(j));
  std::printf("],\n\"tile_of\": [");
  for (int s = 0; s < 3; ++s)
    for (int h = 0; h < C::kSub; ++h) std::printf("%s[%d, %d, %d]", s + h ? ", " : "", s, h, C::tile_of(s, h));
  std::printf("],\n\"w\": [");
  for (int h = 0; h < C::kSub; ++h)
    for (int t = 0; t < kThreads; ++t)
      std::printf("%s[%d, %d, %d, %d]", h + t ? ", " : "", h, t, C::w_dst(h, t), C::w_src(h, t));
  std::printf("],\n\"s\": [");
  for (int t = 0; t < 2 * 16 * C::kRows; ++t) {
    const int which = C::s_which(t), r = C::s_row(t), ch = C::s_chunk(t);
    std::printf("%s[%d, %d, %d, %d, %d, %d]", t ? ", " : "", t, which, r, ch, C::s_k(r), C::s_dst(which, r, ch));
  }
  std::printf("]}%s\n", sep);
}

int main(int argc, char** argv) {
  std::printf("{\"tiles\": {\n");
  dump<16>(",");
  dump<32>(",");
  dump<64>(",");
  dump<128>("");
  std::printf("},\n\"splits\": [");
  bool first = true;
  for (int a = 1; a < argc; ++a) {
    const int KT = std::atoi(argv[a]);
    for (int sub = 1; sub <= 2; ++sub)
      for (int splits = 1; splits <= 24; ++splits) {
        std::printf("%s[%d, %d, %d, %d, %d]", first ? "" : ", ", KT, sub, splits, k_stages(KT, sub),
                    stages_per_split(KT, sub, splits));
        first = false;
      }
  }
  std::printf("]}\n");
  return 0;
}
"""


def stage_tables(workdir, cxx: str = "g++", kts=(1, 2, 3, 5, 8, 64, 172, 224, 448)) -> dict:
    """Compile csrc/stage.h on the host with STAGE_DUMP and return its tables: ``tiles`` keyed
    by token tile (int), ``splits`` rows (KT, kSub, splits, k_stages, stages_per_split)."""
    import json
    import subprocess
    from pathlib import Path

    from gptq_backend_marlin.hopper import build

    workdir = Path(workdir)
    src, exe = workdir / "stage_dump.cpp", workdir / "stage_dump"
    src.write_text(STAGE_DUMP)
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", str(build.CSRC), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=300)
    out = subprocess.run([str(exe), *map(str, kts)], check=True, capture_output=True, text=True, timeout=60).stdout
    data = json.loads(out)
    data["tiles"] = {int(k): v for k, v in data["tiles"].items()}
    return data


def swizzle128(addr: int):
    """The 128-byte swizzle of wgmma's shared-memory operands (CUTLASS Swizzle<3, 4, 3>): byte
    address bits 4-6 (the 16-byte chunk in a 128-byte row) XOR bits 7-9 (the row in an 8-row,
    1024-byte atom), applied to the address the descriptor and the k16 offset produce. Works on
    ints and numpy arrays; addresses are relative to a 1024-byte aligned stage."""
    return addr ^ (((addr >> 7) & 7) << 4)


def _a_positions() -> list[tuple[int, int, int, int]]:
    """PTX's A fragment of wgmma m64nNk16 from registers (f16 / bf16), per register i of a
    thread: (row offset from the thread's row lo, k of the low half); the high half is k + 1.
    a0: (g, 2t), a1: (g + 8, 2t), a2: (g, 2t + 8), a3: (g + 8, 2t + 8) -- layout.thread_rows
    gives lo = warpgroup/warp base + g."""
    return [(0, 0), (8, 0), (0, 8), (8, 8)]


def _values(bits, dtype: torch.dtype):
    import numpy as np

    arr = np.ascontiguousarray(np.asarray(bits, dtype=np.uint16))
    return torch.from_numpy(arr.view(np.int16)).view(dtype).to(torch.float64).numpy()


def emulate_gemm(geom: dict, x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, group_size: int, splits: int):
    """Y [M, N] (float64 numpy) as the kernel computes it, from stage.h's tables ``geom`` (one
    token tile's entry of :func:`stage_tables`): x [M, K] fp16 / bf16 (act-order already
    applied), the prepared tiles / scales / zeros (None: symmetric, zero 8), ``splits`` as
    launched (the fp32 partials summed in split order as reduce_kernel does). Mirrors
    kernel.cuh's load_stage (zero fill for rows >= M and tiles beyond K), its main loop (step j:
    the word at w_dst(j / 4) + 4 (j % 4), scale row s_row_of_step(j), B at x_step(j) through the
    swizzle) and the split partition of launch_one. Products in float64 (decode_word)."""
    import numpy as np

    bm, sub, steps = geom["bm"], geom["sub"], geom["steps"]
    M, K = x.shape
    G, N = scales.shape
    KT = K // layout.TILE_K
    KS = -(-KT // sub)
    per = -(-KS // splits)
    assert -(-KS // per) == splits, "launch_one would reject this split count"
    bf16 = x.dtype == torch.bfloat16
    xb = x.contiguous().view(torch.int16).numpy().view(np.uint16)
    sb = scales.contiguous().view(torch.int16).numpy().view(np.uint16)
    zb = zeros.contiguous().view(torch.int16).numpy().view(np.uint16) if zeros is not None else None
    words = (tiles.to(torch.int64) & 0xFFFFFFFF).numpy().astype(np.uint32).reshape(N // layout.BN, KT, layout.THREADS, 4)
    w_of = {(h, t): (dst, src) for h, t, dst, src in geom["w"]}
    copiers = [e for e in geom["s"] if e[0] < (2 if zb is not None else 1) * 16 * geom["rows"]]
    # B operand of step j: element (token n, k16 offset kk) at the swizzled address
    n_idx, kk_idx = np.meshgrid(np.arange(bm), np.arange(16), indexing="ij")
    b_addr = [swizzle128(geom["x_step"][j] + (n_idx // 8) * 1024 + (n_idx % 8) * 128 + 2 * kk_idx) for j in range(steps)]
    y = np.zeros((M, N))
    for blk in range(N // layout.BN):
        n0 = blk * layout.BN
        for m0 in range(0, M, bm):
            for z in range(splits):
                acc = np.zeros((layout.BN, bm))
                for s in range(z * per, min(KS, (z + 1) * per)):
                    smem = np.zeros(geom["stage_bytes"] // 2, dtype=np.uint16)
                    kt0 = s * sub
                    k0 = kt0 * layout.TILE_K
                    for dst, r, xk, _ in geom["x"]:
                        k = k0 + xk
                        if m0 + r < M and k < K:
                            smem[dst // 2: dst // 2 + 8] = xb[m0 + r, k: k + 8]
                    for h in range(sub):
                        if kt0 + h < KT:
                            for t in range(layout.THREADS):
                                dst, src = w_of[(h, t)]  # src: w_src(h, t), the int4 from tile kt0
                                w4 = words[blk, kt0 + src // layout.THREADS, src % layout.THREADS]
                                smem[dst // 2: dst // 2 + 8] = w4.view(np.uint16)
                    for _, which, r, ch, sk, dst in copiers:
                        k = k0 + sk
                        if k < K:
                            src = zb if which else sb
                            smem[dst // 2: dst // 2 + 8] = src[k // group_size, n0 + 8 * ch: n0 + 8 * ch + 8]
                    for j in range(steps):
                        B = _values(smem[b_addr[j] // 2], x.dtype)  # [bm, 16]
                        A = np.zeros((layout.BN, 16))
                        r = geom["s_row_of_step"][j]
                        sc = _values(smem[(geom["s_base"][0] + 2 * r * layout.BN) // 2:][: layout.BN], scales.dtype)
                        zp = _values(smem[(geom["s_base"][1] + 2 * r * layout.BN) // 2:][: layout.BN], scales.dtype) \
                            if zb is not None else np.full(layout.BN, 8.0)
                        for t in range(layout.THREADS):
                            dst, _ = w_of[(j >> 2, t)]
                            o = (dst + 4 * (j & 3)) // 2
                            word = int(smem[o]) | (int(smem[o + 1]) << 16)
                            lo, _, tq = layout.thread_rows(t)
                            regs = decode_word(word, (zp[lo], zp[lo + 8]), (sc[lo], sc[lo + 8]), bf16)
                            for (dr, dk), (vlo, vhi) in zip(_a_positions(), regs):
                                A[lo + dr, 2 * tq + dk] = vlo
                                A[lo + dr, 2 * tq + dk + 1] = vhi
                        acc += A @ B.T
                rows = min(bm, M - m0)
                y[m0: m0 + rows, n0: n0 + layout.BN] += acc[:, :rows].T
    return y


def split_ranges(k: int, bm: int, splits: int) -> list[tuple[int, int]]:
    """The k range [begin, end) of each split as the kernel partitions it (``splits`` as
    normalised by ops.split_count): whole stages, so the boundaries of the small tiles fall
    on multiples of 128; the last range ends at K."""
    sub, st = ops.stage_tiles(bm), ops.k_stages(k, bm)
    per = math.ceil(st / splits)
    step = sub * layout.TILE_K
    return [(s * per * step, min(k, (s + 1) * per * step)) for s in range(splits)]
