// The epilogue: accumulators to the output (a block tile one worker computed whole), or to the
// worker's fp32 slot, and the stream-K finalizer that sums a shared tile's slots.
#pragma once
#include <cstdint>

#include "dequant.cuh"
#include "marlin.h"

namespace gptq_marlin {

// acc (+ bias) -> output rows row0.. of columns of this warp, for rows < m.
template <typename T, int M_BLOCKS>
__device__ __forceinline__ void store_tile(const float (&acc)[M_BLOCKS][4][4], const GemmArgs& p,
                                           int row0, int col0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  T* out = static_cast<T*>(p.c);
  const half* bias = static_cast<const half*>(p.bias);
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const int col = col0 + j * 8 + 2 * t;
    float b0 = 0.f, b1 = 0.f;
    if (bias != nullptr) {
      b0 = __half2float(bias[col]);
      b1 = __half2float(bias[col + 1]);
    }
#pragma unroll
    for (int mb = 0; mb < M_BLOCKS; mb++) {
      const int r = row0 + mb * 16 + g;
      if (r < p.m) {
        *reinterpret_cast<typename Act<T>::T2*>(out + static_cast<size_t>(r) * p.n + col) =
            Act<T>::pack(acc[mb][j][0] + b0, acc[mb][j][1] + b1);
      }
      if (r + 8 < p.m) {
        *reinterpret_cast<typename Act<T>::T2*>(out + static_cast<size_t>(r + 8) * p.n + col) =
            Act<T>::pack(acc[mb][j][2] + b0, acc[mb][j][3] + b1);
      }
    }
  }
}

// The swapped accumulators (compute_stage's SWAP) (+ bias) -> output rows row0 + 2t, + 1 of
// columns col0 + 16i + g (+ 8), for rows < m.
template <typename T>
__device__ __forceinline__ void store_tile_swap(const float (&acc)[1][4][4], const GemmArgs& p,
                                                int row0, int col0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  T* out = static_cast<T*>(p.c);
  const half* bias = static_cast<const half*>(p.bias);
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int col = col0 + 16 * i + 8 * h + g;
      const float b = bias != nullptr ? __half2float(bias[col]) : 0.f;
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int r = row0 + 2 * t + e;
        if (r < p.m) out[static_cast<size_t>(r) * p.n + col] = Act<T>::from_float(acc[0][i][2 * h + e] + b);
      }
    }
}

template <int M_BLOCKS>
__device__ __forceinline__ void zero_acc(float (&acc)[M_BLOCKS][4][4]) {
#pragma unroll
  for (int mb = 0; mb < M_BLOCKS; mb++)
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[mb][j][e] = 0.f;
}

// The stream-K finalizer of one block tile: the sum, in worker order, of the fp32 slots
// `first` (the first contributor) and others + w * stride for w in (w_lo, w_hi], row-major
// [rows][kTileN]; `limit` = rows * kTileN. Thread tid owns the float4 at e = (u * kThreads +
// tid) * 4 for u < E (predicated: e < limit and its column < n_cols, given as col_ok); CB
// contributors are loaded per batch, so E * CB independent 16-byte L2 loads are in flight and
// a tile costs 1 + ceil((C - 1) / CB) round trips.
template <typename T, int E, int CB>
__device__ __forceinline__ void finalize_tile(const float* first, const float* others,
                                              size_t stride, int w_lo, int w_hi, int limit,
                                              int tid, bool col_ok, float4 b4, T* dst, int n) {
  float4 sum[E];
#pragma unroll
  for (int u = 0; u < E; u++) {
    const int e = (u * kThreads + tid) * 4;
    sum[u] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (col_ok && e < limit) sum[u] = __ldcg(reinterpret_cast<const float4*>(first + e));
  }
  for (int w = w_lo + 1; w <= w_hi; w += CB) {
    float4 v[CB][E];
#pragma unroll
    for (int b = 0; b < CB; b++)
#pragma unroll
      for (int u = 0; u < E; u++) {
        const int e = (u * kThreads + tid) * 4;
        v[b][u] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (col_ok && e < limit && w + b <= w_hi)
          v[b][u] = __ldcg(reinterpret_cast<const float4*>(others + static_cast<size_t>(w + b) * stride + e));
      }
#pragma unroll
    for (int b = 0; b < CB; b++)
#pragma unroll
      for (int u = 0; u < E; u++) {
        if (w + b <= w_hi) {
          sum[u].x += v[b][u].x;
          sum[u].y += v[b][u].y;
          sum[u].z += v[b][u].z;
          sum[u].w += v[b][u].w;
        }
      }
  }
#pragma unroll
  for (int u = 0; u < E; u++) {
    const int e = (u * kThreads + tid) * 4;
    if (!col_ok || e >= limit) continue;
    const float4 s4 = make_float4(sum[u].x + b4.x, sum[u].y + b4.y, sum[u].z + b4.z, sum[u].w + b4.w);
    uint2 packed;
    packed.x = as_u32(Act<T>::pack(s4.x, s4.y));
    packed.y = as_u32(Act<T>::pack(s4.z, s4.w));
    *reinterpret_cast<uint2*>(dst + static_cast<size_t>(e / kTileN) * n) = packed;
  }
}

// A block tile that several workers shared: the last of them to arrive (its counter) sums the
// fp32 slots of all, in worker order (deterministic), adds the bias, writes the output and
// clears the counter. The contributors are the workers whose ranges meet iterations [lo, hi] of
// the tile (worker w starts at floor(w * total / workers)); all but the first start inside the
// tile (slot 0), the first used slot 1 if it started in an earlier tile. The block calls this
// after its main loop: the only tile it can be last for before then is its first one, whose
// other contributors end their ranges there, so this rarely waits on anything.
template <typename T, int M_BLOCKS>
__device__ __forceinline__ void finalize_shared_tile(const GemmArgs& p, int nt, int slice, int k_tiles,
                                                     int n_tiles, int tid) {
  __threadfence();
  const long long total = static_cast<long long>(n_tiles) * k_tiles;
  const int row0 = slice * M_BLOCKS * 16;
  const int rows = min(M_BLOCKS * 16, p.m - row0);
  const int nb32 = p.n / kWarpN;
  const long long lo = static_cast<long long>(nt) * k_tiles, hi = lo + k_tiles - 1;
  const int w_lo = static_cast<int>(((lo + 1) * p.workers + total - 1) / total - 1);
  const int w_hi = static_cast<int>(((hi + 1) * p.workers + total - 1) / total - 1);
  const long long start_lo = static_cast<long long>(w_lo) * total / p.workers;
  const float* first = p.slots + (static_cast<size_t>(slice * p.workers + w_lo) * 2 +
                                  (start_lo < lo ? 1 : 0)) *
                                     kSlotFloats;
  const float* others = p.slots + static_cast<size_t>(slice * p.workers) * 2 * kSlotFloats;
  constexpr size_t kStride = 2 * static_cast<size_t>(kSlotFloats);  // worker to worker
  const int n_cols = min(kWarps, nb32 - nt * kWarps) * kWarpN;
  const half* bias = static_cast<const half*>(p.bias);
  // The shape of finalize_tile (float4 per thread x contributors per batch) is chosen by the
  // rows present, 16 loads in flight whatever M is.
  const int limit = rows * kTileN;
  const int c4 = (tid * 4) % kTileN;  // the same column for every slot of this thread
  const bool col_ok = c4 < n_cols;
  const int col = nt * kTileN + c4;
  float4 b4 = make_float4(0.f, 0.f, 0.f, 0.f);  // the bias is one per column: load once
  if (bias != nullptr && col_ok) {
    b4.x = __half2float(bias[col]);
    b4.y = __half2float(bias[col + 1]);
    b4.z = __half2float(bias[col + 2]);
    b4.w = __half2float(bias[col + 3]);
  }
  T* dst = static_cast<T*>(p.c) + static_cast<size_t>(row0) * p.n + col;
  const int need = (limit + kThreads * 4 - 1) / (kThreads * 4);  // float4 per thread
  if (need <= 1)
    finalize_tile<T, 1, 16>(first, others, kStride, w_lo, w_hi, limit, tid, col_ok, b4, dst, p.n);
  else if (need <= 2)
    finalize_tile<T, 2, 8>(first, others, kStride, w_lo, w_hi, limit, tid, col_ok, b4, dst, p.n);
  else if (M_BLOCKS == 1 || need <= 4)
    finalize_tile<T, 4, 4>(first, others, kStride, w_lo, w_hi, limit, tid, col_ok, b4, dst, p.n);
  else if constexpr (M_BLOCKS >= 2) {
    if (M_BLOCKS == 2)  // 8 in flight: 16 would spill under the 128-register cap
      finalize_tile<T, 8, 1>(first, others, kStride, w_lo, w_hi, limit, tid, col_ok, b4, dst, p.n);
    else if (need <= 8)
      finalize_tile<T, 8, 2>(first, others, kStride, w_lo, w_hi, limit, tid, col_ok, b4, dst, p.n);
    else
      finalize_tile<T, 16, 1>(first, others, kStride, w_lo, w_hi, limit, tid, col_ok, b4, dst, p.n);
  }
  if (tid == 0) p.counters[slice * n_tiles + nt] = 0;
}

}  // namespace gptq_marlin
