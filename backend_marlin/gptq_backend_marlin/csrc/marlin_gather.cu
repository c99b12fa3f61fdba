// Activation-column gather for act-order layers: out[r, c] = x[r, perm[c]] (one launch).
//
// Replaces at::index_select(x, 1, perm) in front of the GEMM: each thread owns 8 consecutive
// output columns (one 16-byte store per row when K % 8 == 0), loads their 8 perm entries once
// and reuses them for kGatherRows rows, with all 8 x kGatherRows gathered 2-byte loads issued
// before the first store. Blocks are small (64 threads up to M = 16) so that M = 1 still
// spreads over K / 512 SMs; above that 128 threads, so fewer blocks re-read each row from L2
// (a block's 512-1024 random columns touch most 32-byte sectors of its rows anyway).
// An index outside [0, K) yields NaN (the host checks shapes, not values).
#include <cstdint>

#include "marlin.h"

namespace gptq_marlin {
namespace {

constexpr int kGatherThreadsSmall = 64;   // M <= kGatherSmallM
constexpr int kGatherThreadsLarge = 128;
constexpr int kGatherSmallM = 16;
constexpr int kGatherCols = 8;  // columns per thread: one 16-byte store
constexpr int kGatherRows = 4;  // rows per thread (perm entries reused)
constexpr int kMaxGridY = 65535;

template <typename Idx>
__global__ void __launch_bounds__(kGatherThreadsLarge)
gather_cols_kernel(const uint16_t* __restrict__ x, const Idx* __restrict__ perm,
                   uint16_t* __restrict__ out, int m, int k, uint16_t nan_bits) {
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * kGatherCols;
  if (c0 >= k) return;
  int idx[kGatherCols];
#pragma unroll
  for (int j = 0; j < kGatherCols; j++) {
    const int c = c0 + j;
    const long long p = c < k ? static_cast<long long>(__ldg(perm + c)) : 0;
    idx[j] = (p >= 0 && p < k) ? static_cast<int>(p) : -1;
  }
  const bool vec = (k % kGatherCols == 0);  // then every row's chunk is 16-byte aligned
  for (int row0 = blockIdx.y * kGatherRows; row0 < m; row0 += gridDim.y * kGatherRows) {
    // Branch-free: rows past m re-read row m - 1 and bad indices read column 0 (both valid
    // addresses, never stored / replaced by NaN), so all loads are issued back to back.
    uint16_t v[kGatherRows][kGatherCols];
#pragma unroll
    for (int r = 0; r < kGatherRows; r++) {
      const uint16_t* xr = x + static_cast<size_t>(min(row0 + r, m - 1)) * k;
#pragma unroll
      for (int j = 0; j < kGatherCols; j++) v[r][j] = __ldg(xr + max(idx[j], 0));
    }
#pragma unroll
    for (int j = 0; j < kGatherCols; j++)
      if (idx[j] < 0) {
#pragma unroll
        for (int r = 0; r < kGatherRows; r++) v[r][j] = nan_bits;
      }
#pragma unroll
    for (int r = 0; r < kGatherRows; r++) {
      if (row0 + r >= m) break;
      uint16_t* o = out + static_cast<size_t>(row0 + r) * k + c0;
      if (vec) {
        uint4 w;
        w.x = v[r][0] | (static_cast<uint32_t>(v[r][1]) << 16);
        w.y = v[r][2] | (static_cast<uint32_t>(v[r][3]) << 16);
        w.z = v[r][4] | (static_cast<uint32_t>(v[r][5]) << 16);
        w.w = v[r][6] | (static_cast<uint32_t>(v[r][7]) << 16);
        *reinterpret_cast<uint4*>(o) = w;
      } else {
#pragma unroll
        for (int j = 0; j < kGatherCols; j++)
          if (c0 + j < k) o[j] = v[r][j];
      }
    }
  }
}

}  // namespace

cudaError_t gather_cols_launch(const void* x, const void* perm, bool perm_int64, void* out,
                               int m, int k, unsigned short nan_bits, cudaStream_t stream) {
  if (m <= 0 || k <= 0) return cudaSuccess;
  const int chunks = (k + kGatherCols - 1) / kGatherCols;
  const int row_groups = (m + kGatherRows - 1) / kGatherRows;
  const int threads = m <= kGatherSmallM ? kGatherThreadsSmall : kGatherThreadsLarge;
  const dim3 grid((chunks + threads - 1) / threads,
                  row_groups < kMaxGridY ? row_groups : kMaxGridY);
  const auto* xs = static_cast<const uint16_t*>(x);
  auto* os = static_cast<uint16_t*>(out);
  if (perm_int64)
    gather_cols_kernel<long long><<<grid, threads, 0, stream>>>(
        xs, static_cast<const long long*>(perm), os, m, k, nan_bits);
  else
    gather_cols_kernel<int><<<grid, threads, 0, stream>>>(
        xs, static_cast<const int*>(perm), os, m, k, nan_bits);
  return cudaGetLastError();
}

}  // namespace gptq_marlin
