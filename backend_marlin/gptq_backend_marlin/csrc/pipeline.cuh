// The main loop of the Marlin-class int4/int8 x fp16/bf16 GEMM: y[m, n] = sum_k a[m, k] * W[k, n]
// (+ bias[n]); one kernel template per kind of kernels.h.
//
// * Weights arrive in the tile layout of layout.py: each lane's 16-byte shared-memory load is
//   its mma.sync B fragments for one chunk, no shuffles.
// * One block (8 warps) owns a 256-column tile; warp w owns its 32 columns over all k, so no
//   reduction inside the block. Each pipeline stage holds 64 k rows of weights, activations
//   (swizzled for conflict-free ldmatrix), scales and zero points, moved by cp.async, the
//   weights with an L2 evict-first policy. Stages<>::value stages are in flight.
// * Dequantization in registers (dequant.cuh).
// * mma.sync m16n8k16 with fp32 accumulators.
// * Striped (stream-K) partition: the n_tiles * k_tiles iterations of a slice are cut into
//   `workers` equal contiguous ranges, one per block, so every multiprocessor streams the
//   same number of bytes whatever the shape. A block tile that several blocks share is
//   reduced through fp32 slots: the last block to finish it (a counter) sums the slots in
//   worker order (deterministic), adds the bias and writes the output, then clears the counter
//   (epilogue.cuh). Slots and counters are the caller's workspace (workspace.py).
// * Rows beyond 64 run as more slices; block b serves slice b % slices, so the blocks that
//   read the same weights run together and share them through L2.
#pragma once
#include <cstdint>

#include "epilogue.cuh"
#include "kernels.h"
#include "marlin.h"
#include "ptx.cuh"
#include "stage.cuh"

namespace gptq_marlin {

// The main kernel's body, the three axes of kernels.h as template parameters:
// TMA (bulk copies): warp 0 moves each stage with bulk copies that complete on the stage's
// mbarrier (one for the weights, one per scale / zero-point row, one per valid activation row)
// instead of every thread issuing 16-byte cp.async copies with their address arithmetic.
// KT (64-row k tiles per stage, 2 or 4 for the wide kernels, 4-bit): the wait, the block
// barrier, the copy bookkeeping and the loop control are paid once per stage, and a warp has
// KT tiles of independent loads and mmas between barriers (the kernel is latency-bound at
// small M: NOTES/perf-marlin.md, "What limits small M"). Iterations, tiles, counters and the
// stream-K split all count stages, so K must be a multiple of 64 * KT.
// SWAP: the swapped mma at up to 8 rows (compute_stage), on the wide pipelines.
template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS, bool TMA = false, int KT = 1,
          bool SWAP = false>
__device__ __forceinline__ void gemm_body(const GemmArgs& p) {
  static_assert(KT == 1 || !TMA, "wide stages run on the cp.async pipeline only");
  using L = Layout<BITS>;
  using S = Smem<BITS, M_BLOCKS, TMA, KT>;
  constexpr int kStages = Stages<BITS, M_BLOCKS, KT>::value;
  constexpr int kBRounds = S::kB / 16 / kThreads;                   // 16-byte weight copies
  constexpr int kAUnits = M_BLOCKS * 16 * 8;                        // 16-byte activation units
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int s_last;
  __shared__ __align__(8) uint64_t bars[TMA ? kStages : 1];  // TMA: one mbarrier per stage

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int slice = blockIdx.x % p.slices;
  const int worker = blockIdx.x / p.slices;
  const int k_tiles = p.k / (kTileK * KT);  // stages per column of tiles
  const int nb32 = p.n / kWarpN;
  const int n_tiles = (nb32 + kWarps - 1) / kWarps;
  const long long total = static_cast<long long>(n_tiles) * k_tiles;
  const long long it0 = worker * total / p.workers;
  const long long it1 = (worker + 1) * total / p.workers;
  const int n_iters = static_cast<int>(it1 - it0);
  const int row0 = slice * M_BLOCKS * 16;  // slices > 1 only at the largest M_BLOCKS
  const bool two_group_rows = p.group_shift == 5;
  const uint64_t policy = l2_policy(p.evict_first != 0);
  const uint8_t* b_base = static_cast<const uint8_t*>(p.b);

  // Per-thread copy assignments, fixed for the whole kernel.
  const int a_row = tid >> 3, a_unit = tid & 7;  // activation unit (rounds of 256 threads)
  const int s_row = tid >> 5, s_unit = tid & 31;  // scale unit (threads 0..63)

  // The fetch cursor: next iteration (f_nt, f_kt) into stage f_stage. Pointers step by a
  // constant within a column and are recomputed only when the column changes.
  int f_nt = static_cast<int>(it0 / k_tiles), f_kt = static_cast<int>(it0 % k_tiles);
  int f_stage = 0;
  int f_nw = 0, f_b_units = 0;
  size_t f_b_step = 0;
  const uint8_t* f_b = nullptr;
  auto f_column = [&]() {
    f_nw = min(kWarps, nb32 - f_nt * kWarps);
    f_b_units = f_nw * (L::kWarpTileBytes / 16);
    f_b_step = static_cast<size_t>(f_nw) * L::kWarpTileBytes;
    f_b = b_base + static_cast<size_t>(f_nt) * k_tiles * KT * kWarps * L::kWarpTileBytes +
          f_kt * KT * f_b_step + (TMA ? 0 : tid * 16);  // TMA: the tile's first byte
  };
  f_column();

  // TMA: every stage is n_copies bulk copies: the weights, the scale (and zero-point) rows, and
  // one per valid activation row of this slice. Copy j is issued by lane 0 of warp j % 8, which
  // first adds the copy's bytes to the stage's mbarrier and arrives (so each byte count is
  // announced before its copy can land); the phase completes after n_copies arrivals and all
  // bytes. Activation rows past the valid ones are never copied: zeroed once here, per stage.
  const int a_rows = min(M_BLOCKS * 16, p.m - row0);
  const int s_copies = (two_group_rows ? 2 : 1) * (HAS_ZEROS ? 2 : 1);
  const int n_copies = 1 + s_copies + a_rows;
  if constexpr (TMA) {
    if (tid == 0)
#pragma unroll
      for (int s = 0; s < kStages; s++) mbar_init(&bars[s], n_copies);
    const int per_stage = (M_BLOCKS * 16 - a_rows) * (S::kARow / 16);
    for (int u = tid; u < kStages * per_stage; u += kThreads) {
      const int s = u / per_stage, r = u - s * per_stage;
      *reinterpret_cast<uint4*>(smem + s * S::kStage + S::kB + a_rows * S::kARow + r * 16) =
          make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
  }
  // Step the fetch cursor to the next stage.
  auto advance = [&]() {
    if (++f_stage == kStages) f_stage = 0;
    if (++f_kt == k_tiles) {
      f_kt = 0;
      f_nt++;
      f_column();
    } else {
      f_b += KT * f_b_step;
    }
  };
  auto fetch_tma = [&]() {
    uint8_t* st = smem + f_stage * S::kStage;
    uint64_t* bar = &bars[f_stage];
#pragma unroll 1
    for (int j = warp; j < n_copies; j += kWarps) {
      if (lane != 0) continue;
      if (j == 0) {
        const uint32_t bytes = static_cast<uint32_t>(f_b_units) * 16;
        mbar_expect(bar, bytes);
        bulk_copy_policy(st, f_b, bytes, bar, policy);
      } else if (j <= s_copies) {
        // Scale rows first (j = 1, 2 with group size 32), then the zero-point rows.
        const int r = HAS_ZEROS ? (j - 1) % (s_copies / 2) : j - 1;
        const bool zero_row = HAS_ZEROS && j > s_copies / 2;
        const int g = (p.group_shift < 0 ? 0 : (f_kt * kTileK) >> p.group_shift) + r;
        const size_t off = (static_cast<size_t>(g) * p.n + static_cast<size_t>(f_nt) * kTileN) * 2;
        const uint32_t bytes = static_cast<uint32_t>(f_nw) * kWarpN * 2;
        mbar_expect(bar, bytes);
        bulk_copy(st + S::kB + S::kA + (zero_row ? S::kS : 0) + r * 512,
                  static_cast<const uint8_t*>(zero_row ? p.zeros : p.scales) + off, bytes, bar);
      } else {
        const int r = j - 1 - s_copies;
        mbar_expect(bar, kTileK * 2);
        bulk_copy(st + S::kB + r * S::kARow,
                  static_cast<const T*>(p.a) + static_cast<size_t>(row0 + r) * p.k + f_kt * kTileK,
                  kTileK * 2, bar);
      }
    }
    advance();
  };
  auto fetch_cp = [&]() {
#pragma unroll
    for (int h = 0; h < KT; h++) {
      uint8_t* st = smem + f_stage * S::kStage + h * S::kSub;
      const uint8_t* fb = f_b + h * f_b_step;
      const int kt64 = f_kt * KT + h;  // the 64-row k tile of this sub-stage
#pragma unroll
      for (int r = 0; r < kBRounds; r++) {
        if (r * kThreads + tid < f_b_units) {
          // ptxas 13.0 gave some variants an odd uniform register pair for the cache-policy
          // descriptor of LDGSTS (illegal instruction on sm_90): 8-bit copies and those of the
          // wide kernels above one row block go without the hint (test_marlin_compile checks
          // every build for odd descriptors).
          if constexpr (BITS == 4 && !(KT >= 2 && M_BLOCKS >= 2))
            cp_async16_policy(st + (r * kThreads + tid) * 16, fb + r * kThreads * 16, policy);
          else
            cp_async16(st + (r * kThreads + tid) * 16, fb + r * kThreads * 16);
        }
      }
      uint8_t* sa = st + S::kB;
#pragma unroll
      for (int r = 0; r < (kAUnits + kThreads - 1) / kThreads; r++) {
        const int row = a_row + r * (kThreads / 8);
        if (kAUnits % kThreads == 0 || row < M_BLOCKS * 16) {
          const int grow = row0 + row;
          const bool ok = grow < p.m;
          const T* src = static_cast<const T*>(p.a) + static_cast<size_t>(ok ? grow : 0) * p.k +
                         kt64 * kTileK + a_unit * 8;
          cp_async16_zfill(sa + row * 128 + ((a_unit ^ (row & 7)) << 4), src, ok);
        }
      }
      if (tid < 64 && (s_row == 0 || two_group_rows) && s_unit < f_nw * 4) {
        const int g = (p.group_shift < 0 ? 0 : (kt64 * kTileK) >> p.group_shift) + s_row;
        const size_t off =
            (static_cast<size_t>(g) * p.n + static_cast<size_t>(f_nt) * kTileN) * 2 + s_unit * 16;
        uint8_t* ss = sa + S::kA + s_row * 512 + s_unit * 16;
        cp_async16(ss, static_cast<const uint8_t*>(p.scales) + off);
        if constexpr (HAS_ZEROS) cp_async16(ss + S::kS, static_cast<const uint8_t*>(p.zeros) + off);
      }
    }
    advance();
  };

  float acc[M_BLOCKS][4][4];
  zero_acc(acc);
  auto fetch = [&]() {
    if constexpr (TMA)
      fetch_tma();
    else
      fetch_cp();
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; s++) {
    if (s < n_iters) fetch();
    if constexpr (!TMA) cp_async_commit();
  }

  int nt = static_cast<int>(it0 / k_tiles), kt = static_cast<int>(it0 % k_tiles), stage = 0;
  uint32_t phase = 0;  // TMA: parity of the current pass over the stages
  int seg_first = 0;  // iteration at which the current block tile began
  int to_finalize = 0;  // shared tiles this block arrived at last: 1 its first tile, 2 its last
  for (int i = 0; i < n_iters; i++) {
    if constexpr (TMA)
      mbar_wait(&bars[stage], phase);
    else
      cp_async_wait<kStages - 2>();
    __syncthreads();
    if (i + kStages - 1 < n_iters) fetch();
    if constexpr (!TMA) cp_async_commit();

    const bool warp_ok = nt * kWarps + warp < nb32;
    if (warp_ok) {
#pragma unroll
      for (int h = 0; h < KT; h++)
        compute_stage<BITS, T, M_BLOCKS, HAS_ZEROS, TMA, SWAP>(
            acc, smem + stage * S::kStage + h * S::kSub, warp, lane, two_group_rows);
    }
    const int cur_nt = nt, cur_kt = kt;
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
    if (++kt == k_tiles) {
      kt = 0;
      nt++;
    }
    if (cur_kt != k_tiles - 1 && i != n_iters - 1) continue;

    // ------------------------------------------------------------ end of a block tile
    const int kt_first = cur_kt - (i - seg_first);
    const int col0 = cur_nt * kTileN + warp * kWarpN;
    if (kt_first == 0 && cur_kt == k_tiles - 1) {
      if constexpr (SWAP) {
        if (warp_ok) store_tile_swap<T>(acc, p, row0, col0, lane);
      } else {
        if (warp_ok) store_tile<T, M_BLOCKS>(acc, p, row0, col0, lane);
      }
    } else {
      // Shared tile: park the partial sums of the valid rows in this worker's slot (0: its
      // first tile, 1: its last), row-major [rows][kTileN] fp32; the last contributor to
      // arrive adds all slots up in worker order (deterministic).
      const int rows = min(M_BLOCKS * 16, p.m - row0);
      float* slot = p.slots + (static_cast<size_t>(slice * p.workers + worker) * 2 +
                               (seg_first == 0 ? 0 : 1)) *
                                  kSlotFloats;
      if (warp_ok && SWAP) {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
          for (int h = 0; h < 2; h++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
              const int r = 2 * t + e, c = warp * kWarpN + 16 * i + 8 * h + g;
              if (r < rows) slot[r * kTileN + c] = acc[0][i][2 * h + e];
            }
      } else if (warp_ok) {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int mb = 0; mb < M_BLOCKS; mb++)
#pragma unroll
          for (int j = 0; j < 4; j++) {
            const int r = mb * 16 + g, c = warp * kWarpN + j * 8 + 2 * t;
            if (r < rows)
              *reinterpret_cast<float2*>(slot + r * kTileN + c) =
                  make_float2(acc[mb][j][0], acc[mb][j][1]);
            if (r + 8 < rows)
              *reinterpret_cast<float2*>(slot + (r + 8) * kTileN + c) =
                  make_float2(acc[mb][j][2], acc[mb][j][3]);
          }
      }
      __threadfence();
      __syncthreads();
      int* counter = p.counters + slice * n_tiles + cur_nt;
      if (tid == 0) {
        const int add = cur_kt - kt_first + 1;
        s_last = (atomicAdd(counter, add) + add == k_tiles);
      }
      __syncthreads();
      // The last contributor sums the tile, after its main loop (see finalize_shared_tile).
      if (s_last) to_finalize |= seg_first == 0 ? 1 : 2;
    }
    zero_acc(acc);
    seg_first = i + 1;
  }
  if constexpr (!TMA) cp_async_wait<0>();
  // Out of the main loop, so that its registers do not meet the finalizer's loads in flight.
  if (to_finalize & 1)
    finalize_shared_tile<T, M_BLOCKS>(p, static_cast<int>(it0 / k_tiles), slice, k_tiles, n_tiles, tid);
  if (to_finalize & 2)
    finalize_shared_tile<T, M_BLOCKS>(p, static_cast<int>((it1 - 1) / k_tiles), slice, k_tiles, n_tiles, tid);
}

// The GEMM kernel of kind KIND: its row of kernel_traits (kernels.h) picks the copy engine,
// the stage depth and the mma orientation of gemm_body. Up to 2 row blocks, two blocks per SM.
template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS, int KIND>
__global__ void __launch_bounds__(kThreads, M_BLOCKS <= 2 ? 2 : 1) gemm_kernel(const GemmArgs p) {
  constexpr KernelTraits kTraits = kernel_traits(KIND);
  gemm_body<BITS, T, M_BLOCKS, HAS_ZEROS, kTraits.copy == CopyEngine::kBulk, kTraits.stage_tiles,
            kTraits.swap>(p);
}

}  // namespace gptq_marlin
