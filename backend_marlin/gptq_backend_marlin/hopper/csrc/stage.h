// The Hopper GEMM's pipeline-stage geometry: what one cp.async stage holds, where each copy
// lands in shared memory and where each k16 step's operands are read, the ring depth and the
// split-K partition. Plain C++ (no CUDA headers), so that kernel.cuh uses it on the device and
// the CPU tests compile the very same functions with g++ and check them against layout.py and a
// model of the 128-byte swizzle (backend_marlin/tests/test_hopper_layout.py).
//
// Round 3 (NOTES/hopper-wgmma.md): a stage carries kSub 64-k tiles, 2 for the token tiles
// BM <= 64 (128 k per stage: the cp.async wait, proxy fence and barrier come once per 128 k and
// the stage issues eight wgmma k16 steps), 1 for BM 128 (round 2's 64-k stages).
#pragma once

#ifdef __CUDACC__
#define GPTQ_HOPPER_HD __host__ __device__ __forceinline__
#else
#define GPTQ_HOPPER_HD inline
#endif

namespace gptq_hopper {

constexpr int kThreads = 256;  // two consumer warpgroups
constexpr int kBN = 128;       // output columns per block (64 per warpgroup: one wgmma M)
constexpr int kBK = 64;        // k per weight tile (layout.py's TILE_K: 4 wgmma k16 steps)
constexpr int kTileBytes = kBN * kBK / 2;  // 4 KiB of 4-bit weights per (column block, k tile)

// 64-k tiles per pipeline stage for token tile BM (ops.stage_tiles mirrors it).
GPTQ_HOPPER_HD constexpr int stage_tiles(int bm) { return bm <= 64 ? 2 : 1; }
GPTQ_HOPPER_HD constexpr int log2_exact(int v) { return v <= 1 ? 0 : 1 + log2_exact(v / 2); }

// Ring depth per token tile: the most stages that keep round 2's blocks per SM (BM 16 / 32: 3,
// 64 / 128: 2) at 228 KiB of shared memory per SM, 1 KiB of it reserved per block.
//   BM  16: 14 KiB stages x 5 + 1 KiB alignment = 72704 B -> 3 blocks (73728 x 3 <= 233472)
//   BM  32: 18 KiB stages x 4 + 1 KiB            = 74752 B -> 3 blocks
//   BM  64: 26 KiB stages x 4 + 1 KiB            = 107520 B -> 2 blocks
//   BM 128: 21 KiB stages x 5 + 1 KiB (round 2)  = 108544 B -> 2 blocks
GPTQ_HOPPER_HD constexpr int ring_stages(int bm) {
  return bm <= 16 ? 5 : (bm <= 32 ? 4 : (bm <= 64 ? 4 : 5));
}

template <int BM>
struct Cfg {
  static constexpr int kSub = stage_tiles(BM);   // 64-k tiles per stage
  static constexpr int kStageK = kSub * kBK;     // k per stage
  static constexpr int kSteps = 4 * kSub;        // wgmma k16 steps per stage
  static constexpr int kRows = 2 * kSub;         // scale rows per stage: k offsets 0, 32 (, 64, 96)
  // kLoadAhead = kStages - 2 stages are in flight: one slot is being read, one still feeds the
  // previous stage's last wgmma.
  static constexpr int kStages = ring_stages(BM);
  static constexpr int kLoadAhead = kStages - 2;
  static constexpr int kXTile = BM * 128;        // one 64-k X sub-tile: BM rows of 64 halves
  static constexpr int kXBytes = kSub * kXTile;  // the sub-tiles one after the other
  static constexpr int kWBytes = kSub * kTileBytes;
  static constexpr int kSBytes = kRows * kBN * 2;  // one operand's rows (scales, or zeros)
  static constexpr int kStageBytes = kXBytes + kWBytes + 2 * kSBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kOutStride = kBN + 4;  // floats: conflict-free fragment stores
  static constexpr int kOutBytes = BM * kOutStride * 4;
  static constexpr int kSmem = (kPipeBytes > kOutBytes ? kPipeBytes : kOutBytes) + 1024;
  // __launch_bounds__ minimum blocks per SM: the register cap (65536 / (256 x kMinBlocks),
  // in steps of 8 per thread) that keeps the shared-memory occupancy above: 80 at BM <= 32.
  static constexpr int kMinBlocks = BM <= 32 ? 3 : 2;
  static constexpr int kXChunks = kSub * BM * 8;  // 16-byte X copies per stage
  static constexpr int kLogBM = log2_exact(BM);
  static constexpr int kLogSThreads = log2_exact(16 * kRows);  // threads per scale operand

  static_assert((1 << kLogBM) == BM && (16 << log2_exact(kRows)) == 16 * kRows, "powers of two");

  static_assert(kXTile % 1024 == 0, "each swizzled X sub-tile needs 1024-byte alignment");
  static_assert(kStageBytes % 1024 == 0, "the swizzled X tiles need 1024-byte alignment");
  static_assert(kStages >= 3, "the ring keeps one stage for the in-flight wgmma");
  static_assert(kSmem <= 227 * 1024, "over the per-block shared memory limit");
  static_assert(2 * kRows * 16 <= kThreads, "one thread per 16-byte scale / zero chunk");
  static_assert(kXChunks % kThreads == 0, "every thread copies the same number of X chunks");

  // X copy c (0 .. kXChunks - 1): 16 bytes = 8 halves of token row x_row(c) at k offset x_k(c)
  // within the stage, stored at byte x_dst(c) of the stage. Sub-tile h = (c / 8) / BM holds the
  // stage's k offsets 64 h .. 64 h + 63 as round 2's tile does (row r at 128 r, 16-byte chunk
  // ch at (ch ^ (r % 8)) * 16: the 128-byte swizzle; BM is a multiple of 8, so the sub-tile's
  // row r = (c / 8) % BM has the same r % 8 as c / 8).
  static GPTQ_HOPPER_HD int x_dst(int c) { return (c >> 3) * 128 + (((c & 7) ^ ((c >> 3) & 7)) << 4); }
  // (With one tile per stage c / 8 < BM: the plain forms, round 2's code to the instruction.)
  static GPTQ_HOPPER_HD int x_row(int c) { return kSub == 1 ? c >> 3 : (c >> 3) & (BM - 1); }
  static GPTQ_HOPPER_HD int x_half(int c) { return kSub == 1 ? 0 : (c >> 3) >> kLogBM; }
  static GPTQ_HOPPER_HD int x_k(int c) { return x_half(c) * kBK + (c & 7) * 8; }
  // k16 step j's B descriptor start (byte offset in the stage): sub-tile j / 4, +32 bytes per
  // k16 step inside it (the hardware applies the swizzle to the address).
  static GPTQ_HOPPER_HD int x_step(int j) { return (j >> 2) * kXTile + (j & 3) * 32; }
  // Weight tile h of stage s is layout.py's tile kSub s + h of the column block (its int4 index
  // there: w_src); thread tid copies its 16 bytes to w_dst and reads them back as four words,
  // one per k16 step (step j: tile j / 4, word j % 4).
  static GPTQ_HOPPER_HD int tile_of(int s, int h) { return s * kSub + h; }
  static GPTQ_HOPPER_HD int w_src(int kt, int tid) { return kt * kThreads + tid; }
  static GPTQ_HOPPER_HD int w_dst(int h, int tid) { return kXBytes + h * kTileBytes + tid * 16; }
  // Scale (which 0) / zero point (which 1) copies: thread tid < 16 * kRows * (ZP ? 2 : 1)
  // copies chunk ch (8 columns) of row r, the group of the stage's k offset 32 r.
  static GPTQ_HOPPER_HD int s_which(int tid) { return tid >> kLogSThreads; }
  static GPTQ_HOPPER_HD int s_row(int tid) { return (tid >> 4) & (kRows - 1); }
  static GPTQ_HOPPER_HD int s_chunk(int tid) { return tid & 15; }
  static GPTQ_HOPPER_HD int s_k(int r) { return 32 * r; }
  static GPTQ_HOPPER_HD int s_dst(int which, int r, int ch) {
    return kXBytes + kWBytes + which * kSBytes + r * (kBN * 2) + ch * 16;
  }
  // The scale row of k16 step j (k offsets 16 j .. 16 j + 15 inside the stage).
  static GPTQ_HOPPER_HD int s_row_of_step(int j) { return j >> 1; }
};

// Split-K partition: the K / 64 weight tiles form ceil(KT / kSub) stages; a split owns a run of
// whole stages, so split boundaries fall on multiples of 128 k for the small tiles. The last
// stage may hold a single tile (K % 128 == 64 at BM <= 64): its second half is zero-filled.
GPTQ_HOPPER_HD constexpr int k_stages(int KT, int sub) { return (KT + sub - 1) / sub; }
// Stages per split for a requested split count (the kernel's grid.z is ceil(stages / per)).
GPTQ_HOPPER_HD constexpr int stages_per_split(int KT, int sub, int splits) {
  return (k_stages(KT, sub) + splits - 1) / splits;
}

}  // namespace gptq_hopper
