// One pipeline stage: its shared-memory layout and depth, and one warp's work on it (64 k rows x
// 32 columns: ldmatrix of the activations, dequantization of the weights, mma.sync).
#pragma once
#include <cstdint>

#include "dequant.cuh"
#include "marlin.h"
#include "ptx.cuh"

namespace gptq_marlin {

// Pipeline depth: more stages where few rows leave shared memory to spare (small M is
// bandwidth-bound and wants bytes in flight); two blocks per SM must still fit. KT = 64-row k
// tiles per stage (2: the wide kernels, 4-bit): at 1-2 row blocks the same bytes in flight in
// half as many stages.
template <int BITS, int M_BLOCKS, int KT = 1>
struct Stages {
  static constexpr int value = KT == 1 ? (BITS == 4 ? (M_BLOCKS == 1 ? 8 : M_BLOCKS == 2 ? 6 : 5)
                                                    : (M_BLOCKS == 1 ? 5 : 4))
                               // wide (4-bit): 3-4 row blocks run one block per SM
                               // (registers), so 5 stages of 32-36 KB still fit
                               : KT == 2 ? (M_BLOCKS == 1 ? 4 : M_BLOCKS == 2 ? 3 : 5)
                                         // KT = 4 (1-2 row blocks): double buffering
                                         : 2;
  static_assert(value >= 2, "the pipeline needs two stages");
};

// PAD_A (the TMA variant): activation rows arrive by one bulk copy each, so they cannot be
// XOR-swizzled; a 16-byte pad per row (144-byte stride) keeps ldmatrix conflict-free instead.
// A stage of KT k tiles is KT sub-stages of this layout, one after the other.
template <int BITS, int M_BLOCKS, bool PAD_A = false, int KT = 1>
struct Smem {
  static constexpr int kB = kWarps * Layout<BITS>::kWarpTileBytes;
  static constexpr int kARow = kTileK * 2 + (PAD_A ? 16 : 0);  // bytes per activation row
  static constexpr int kA = M_BLOCKS * 16 * kARow;
  static constexpr int kS = 2 * kTileN * 2;  // two group rows (group size 32) of one tile
  static constexpr int kSub = kB + kA + 2 * kS;  // one 64-row k tile: scales, then zero points
  static constexpr int kStage = KT * kSub;
  static constexpr int kTotal = kStage * Stages<BITS, M_BLOCKS, KT>::value;
};

// ---------------------------------------------------------------------------------------------
// One pipeline stage of one warp: 64 k rows x 32 columns into acc.
// PAD_A: the TMA variant's activation rows (padded, not swizzled; see Smem).
// SWAP (4-bit, one row block, at most 8 rows): the weights are the mma's A operand and the
// activations its B operand, so one m16n8k16 covers 16 output columns x 8 rows instead of 8
// columns x 16 rows: half the mmas. The dequantized registers of subtiles 2i and 2i+1 are
// already the A fragment of output columns 16i..16i+15 (b0 of 2i, b0 of 2i+1, b1 of 2i, b1 of
// 2i+1), so the layout does not change. acc[0][i] (i = 0, 1) then holds, for lane (g, t),
// columns 16i + g and 16i + 8 + g of rows 2t and 2t + 1 (see store_tile_swap).
template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS, bool PAD_A = false, bool SWAP = false>
__device__ __forceinline__ void compute_stage(float (&acc)[M_BLOCKS][4][4], const uint8_t* stage,
                                              int warp, int lane, bool two_group_rows) {
  static_assert(!SWAP || (BITS == 4 && M_BLOCKS == 1), "the swapped mma: 4-bit, one row block");
  using L = Layout<BITS>;
  using S = Smem<BITS, M_BLOCKS, PAD_A>;
  const uint8_t* sb = stage + warp * L::kWarpTileBytes;
  const uint8_t* sa = stage + S::kB;
  const uint8_t* ss = sa + S::kA;
  const int g = lane >> 2;

  // Group rows: row 0 covers k 0..31 (steps 0, 1), row 1 k 32..63 (steps 2, 3); with one
  // group row per stage, both read row 0.
  Group<T> grp[2][4];
  const int col = warp * 64;  // byte offset of this warp's 32 columns in a row of scales
  load_groups<T, BITS, HAS_ZEROS>(grp[0], ss + col, ss + S::kS + col, g);
  const int row1 = two_group_rows ? 512 : 0;
  load_groups<T, BITS, HAS_ZEROS>(grp[1], ss + row1 + col, ss + S::kS + row1 + col, g);

  if constexpr (SWAP) {
#pragma unroll
    for (int c = 0; c < L::kChunks; c++) {
      const int4 q4 = *reinterpret_cast<const int4*>(sb + c * 512 + lane * 16);
      // Rows 0..7 of the chunk's 32 k (4 units of 8): register q = unit 4c + q, so steps 2c and
      // 2c + 1 take (x[0], x[1]) and (x[2], x[3]) as their B fragments.
      uint32_t x[4];
      {
        const int row = lane & 7, unit = 4 * c + (lane >> 3);
        if constexpr (PAD_A)
          ldmatrix_x4(x, sa + row * S::kARow + (unit << 4));
        else
          ldmatrix_x4(x, sa + row * 128 + ((unit ^ (row & 7)) << 4));
      }
      const uint32_t words[4] = {static_cast<uint32_t>(q4.x), static_cast<uint32_t>(q4.y),
                                 static_cast<uint32_t>(q4.z), static_cast<uint32_t>(q4.w)};
      uint32_t b[4][4];
#pragma unroll
      for (int j = 0; j < 4; j++) dequant4<T>(words[j], grp[c][j], grp[c][j], b[j]);
#pragma unroll
      for (int i = 0; i < 2; i++) {
        const uint32_t w0[4] = {b[2 * i][0], b[2 * i + 1][0], b[2 * i][1], b[2 * i + 1][1]};
        const uint32_t w1[4] = {b[2 * i][2], b[2 * i + 1][2], b[2 * i][3], b[2 * i + 1][3]};
        mma<T>(acc[0][i], w0, x[0], x[1]);
        mma<T>(acc[0][i], w1, x[2], x[3]);
      }
    }
  } else {
#pragma unroll
    for (int c = 0; c < L::kChunks; c++) {
      const int4 q4 = *reinterpret_cast<const int4*>(sb + c * 512 + lane * 16);
      uint32_t a[L::kStepsPerChunk][M_BLOCKS][4];
#pragma unroll
      for (int h = 0; h < L::kStepsPerChunk; h++) {
        const int step = c * L::kStepsPerChunk + h;
#pragma unroll
        for (int mb = 0; mb < M_BLOCKS; mb++) {
          const int row = mb * 16 + (lane & 15);
          const int unit = 2 * step + (lane >> 4);  // 16-byte unit of the 128-byte row
          if constexpr (PAD_A)
            ldmatrix_x4(a[h][mb], sa + row * S::kARow + (unit << 4));
          else
            ldmatrix_x4(a[h][mb], sa + row * 128 + ((unit ^ (row & 7)) << 4));
        }
      }
      const uint32_t words[4] = {static_cast<uint32_t>(q4.x), static_cast<uint32_t>(q4.y),
                                 static_cast<uint32_t>(q4.z), static_cast<uint32_t>(q4.w)};
#pragma unroll
      for (int j = 0; j < 4; j++) {
        if constexpr (BITS == 4) {
          uint32_t b[4];
          // Both steps of a 4-bit chunk lie in the same 32-row half of the stage.
          dequant4<T>(words[j], grp[c][j], grp[c][j], b);
#pragma unroll
          for (int mb = 0; mb < M_BLOCKS; mb++) {
            mma<T>(acc[mb][j], a[0][mb], b[0], b[1]);
            mma<T>(acc[mb][j], a[1][mb], b[2], b[3]);
          }
        } else {
          uint32_t b[2];
          dequant8<T>(words[j], grp[c >> 1][j], b);
#pragma unroll
          for (int mb = 0; mb < M_BLOCKS; mb++) mma<T>(acc[mb][j], a[0][mb], b[0], b[1]);
        }
      }
    }
  }
}

}  // namespace gptq_marlin
