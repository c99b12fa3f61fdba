// The dense weight for dequantize + cuBLAS (large M): W[n, k] in the activation dtype and the
// original k order (act-order rows scattered back through perm, so the activations need no
// permutation), made from the same layout and the same register dequantization as the decode
// kernel, the group scale applied in fp32 and rounded once.
#pragma once

#include "common.cuh"
#include "dequant.cuh"

namespace gptq_cuda {

constexpr int kDequantUnits = 8;  // units per warp and block row of the grid

template <int BITS, int DT, bool ZEROS>
__global__ void __launch_bounds__(kThreads, 4) dequant_kernel(const DequantArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  if constexpr (DT == kBF16) return;
  else {
#endif
  using T = typename Act<DT>::T;
  constexpr int US = unit_steps(BITS);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int strip = blockIdx.x * kWarps + warp;
  if (strip >= args.strips) return;
  const int col_a = strip * kStripN + g, col_b = col_a + 8;
  const half* sc = static_cast<const half*>(args.scales);
  const T* zp = static_cast<const T*>(args.zeros);
  T* w = static_cast<T*>(args.w);
  const int u_end = min(args.units, (blockIdx.y + 1) * kDequantUnits);
  for (int u = blockIdx.y * kDequantUnits; u < u_end; ++u) {
    const size_t base = (static_cast<size_t>(strip) * args.units + u) * 32 + lane;
    const uint4 v = load_stream16(args.qweight + base * 4);
    const uint32_t wl[4] = {v.x, v.y, v.z, v.w};
    uint32_t wh[2] = {0, 0};
    if constexpr (BITS == 3) {
      const uint2 h = load_stream8(args.qhigh + base * 2);
      wh[0] = h.x;
      wh[1] = h.y;
    }
    static_for<US>([&](auto sc_) {
      constexpr int s = decltype(sc_)::value;
      const int step = u * US + s;
      const int grp = args.group_steps ? min(step / args.group_steps, args.groups_pad - 1) : 0;
      const size_t row = static_cast<size_t>(grp) * args.n_pad;
      uint32_t z2[2] = {0, 0};
      if constexpr (ZEROS) {
        const T za = zp[row + col_a], zb = zp[row + col_b];
        z2[0] = *reinterpret_cast<const uint16_t*>(&za) * 0x10001u;
        z2[1] = *reinterpret_cast<const uint16_t*>(&zb) * 0x10001u;
      }
      const float sa = __half2float(sc[row + col_a]), sb = __half2float(sc[row + col_b]);
      uint32_t a[4];
      dequant_step<BITS, DT, ZEROS, s>(wl, wh, z2, a);
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int col = (r & 1) ? col_b : col_a;
        const int k = step * kStepK + 2 * t + 8 * (r >> 1);
        if (col >= args.n) continue;
        const float2 q = Act<DT>::to_float2(a[r]);
        const float s_ = (r & 1) ? sb : sa;
        T* dst = w + static_cast<size_t>(col) * args.k;
        if (k < args.k) dst[args.perm ? args.perm[k] : k] = Act<DT>::from_float(q.x * s_);
        if (k + 1 < args.k) dst[args.perm ? args.perm[k + 1] : k + 1] = Act<DT>::from_float(q.y * s_);
      }
    });
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  }
#endif
}

}  // namespace gptq_cuda
