// The decode kernel: y[m, n] = sum_k x[m, k] * W[k, n] for up to 8 * MT rows per slice.
//
// Grid: (blocks of 64 columns, splits of K, 16-row slices). Each of the block's 4 warps owns a
// strip of 16 columns and walks the split's units (layout.py): 16-byte loads, 4 units in flight
// per lane, dequantized in registers (dequant.cuh) into the A operand of one mma per step and
// 8-row tile; the activations of the split are staged once per block in shared memory (act-order
// columns gathered through perm there, channels past K zero-filled), laid out so each lane's B
// fragments are one 8-byte load. Sums of one group are scaled in fp32 when the group ends
// (scales read one group ahead). With several splits every block writes fp32 partials; the last
// block of a column (an atomic counter) adds them in split order, deterministically, adds the
// bias, writes y and sets the counter back to zero for the next call (and graph replay).
#pragma once

#include <climits>

#include "common.cuh"
#include "dequant.cuh"

namespace gptq_cuda {

constexpr int kDepth = 4;  // units in flight per lane

// Where channel j (0..15) of a step sits in shared memory (layout.py x_slot): lane t's B
// fragments, channels 2t, 2t+1, 2t+8, 2t+9, become four adjacent values.
__device__ __forceinline__ int x_slot(int j) { return 4 * ((j & 7) >> 1) + (j & 1) + 2 * (j >> 3); }

template <int DT>
__device__ __forceinline__ void stage_x(const GemvArgs& args, typename Act<DT>::T* xs, int m0, int rows,
                                        int k_begin, int span) {
  using T = typename Act<DT>::T;
  const T* x = static_cast<const T*>(args.x);
  const T zero = Act<DT>::from_float(0.0f);
  if (args.x_vector) {
    // 8 channels per thread and iteration: one 16-byte load, four 4-byte stores.
    const int chunks = span / 8;
    for (int r = 0; r < rows; ++r) {
      const T* row = x + static_cast<size_t>(m0 + r) * args.k;
      T* dst = xs + r * args.x_stride;
      for (int c = threadIdx.x; c < chunks; c += kThreads) {
        const int k = k_begin + 8 * c;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (k < args.k) v = *reinterpret_cast<const uint4*>(row + k);  // k % 8 == 0 == K % 8
        const int base = 16 * (c >> 1) + 2 * (c & 1);
        const uint32_t vs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) *reinterpret_cast<uint32_t*>(dst + base + 4 * j) = vs[j];
      }
    }
  } else {
    for (int r = 0; r < rows; ++r) {
      const T* row = x + static_cast<size_t>(m0 + r) * args.k;
      T* dst = xs + r * args.x_stride;
      for (int i = threadIdx.x; i < span; i += kThreads) {
        const int k = k_begin + i;
        T v = zero;
        if (k < args.k) v = row[args.perm ? args.perm[k] : k];
        dst[(i & ~15) + x_slot(i & 15)] = v;
      }
    }
  }
}

// ALIGNED: every group ends at the end of a unit (group size a multiple of the unit, or one
// group), so the group-end test runs once per unit instead of once per step.
template <int BITS, int DT, int MT, bool ZEROS, bool ALIGNED>
__global__ void __launch_bounds__(kThreads, 5) gemv_kernel(const GemvArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  if constexpr (DT == kBF16) return;  // no bf16 mma below sm_80 (refused by the probe)
  else {
#endif
  using T = typename Act<DT>::T;
  extern __shared__ uint4 smem[];
  T* xs = reinterpret_cast<T*>(smem);
  constexpr int US = unit_steps(BITS);
  constexpr int UK = unit_k(BITS);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int block_n = blockIdx.x, split = blockIdx.y, slice = blockIdx.z;
  const int strip = block_n * kWarps + warp;
  const bool active = strip < args.strips;  // warp-uniform
  const int u_begin = split * args.units_per_split;
  const int n_units = max(0, min(args.units, u_begin + args.units_per_split) - u_begin);
  const int m0 = slice * 8 * MT;
  const int rows = min(8 * MT, args.m - m0);

  // The first units' weights are requested before the activations are staged.
  const size_t unit_base = (static_cast<size_t>(strip) * args.units + u_begin) * 32 + lane;
  const uint32_t* wq = args.qweight + unit_base * 4;
  const uint32_t* wqh = BITS == 3 ? args.qhigh + unit_base * 2 : nullptr;
  uint4 buf[kDepth];
  uint2 hbuf[kDepth];
  static_for<kDepth>([&](auto dc) {
    constexpr int d = decltype(dc)::value;
    if (active && d < n_units) {
      buf[d] = load_stream16(wq + d * 128);
      if constexpr (BITS == 3) hbuf[d] = load_stream8(wqh + d * 64);
    }
  });

  stage_x<DT>(args, xs, m0, rows, u_begin * UK, n_units * UK);
  __syncthreads();

  // Output columns of this lane (rows g and g + 8 of the A tile) and the B rows it reads.
  const int col_a = strip * kStripN + g, col_b = col_a + 8;
  const T* xrow[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) xrow[mt] = xs + min(g + 8 * mt, max(rows, 1) - 1) * args.x_stride + 4 * t;

  float total[MT][4], acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) total[mt][i] = acc[mt][i] = 0.0f;

  if (active && n_units > 0) {
    const half* sc = static_cast<const half*>(args.scales);
    const T* zp = static_cast<const T*>(args.zeros);
    const int gsteps = args.group_steps;
    int step = u_begin * US;
    int group = gsteps ? step / gsteps : 0;
    int bound = gsteps ? (group + 1) * gsteps : INT_MAX;
    auto load_scales = [&](int grp, float& sa, float& sb) {
      grp = min(grp, args.groups_pad - 1);
      sa = __half2float(sc[static_cast<size_t>(grp) * args.n_pad + col_a]);
      sb = __half2float(sc[static_cast<size_t>(grp) * args.n_pad + col_b]);
    };
    auto load_zeros = [&](int grp, uint32_t (&z)[2]) {
      if constexpr (ZEROS) {
        grp = min(grp, args.groups_pad - 1);
        const T za = zp[static_cast<size_t>(grp) * args.n_pad + col_a];
        const T zb = zp[static_cast<size_t>(grp) * args.n_pad + col_b];
        const uint32_t ua = *reinterpret_cast<const uint16_t*>(&za);
        const uint32_t ub = *reinterpret_cast<const uint16_t*>(&zb);
        z[0] = ua * 0x10001u;
        z[1] = ub * 0x10001u;
      }
    };
    float sa, sb, sa_next, sb_next;
    uint32_t z2[2] = {0, 0}, z2_next[2] = {0, 0};
    load_scales(group, sa, sb);
    load_scales(group + 1, sa_next, sb_next);
    load_zeros(group, z2);
    load_zeros(group + 1, z2_next);

    // The group ends: scale its sums into the totals, move to the next group's scales (and
    // zero points) and request the one after.
    auto next_group = [&]() {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        total[mt][0] = fmaf(acc[mt][0], sa, total[mt][0]);
        total[mt][1] = fmaf(acc[mt][1], sa, total[mt][1]);
        total[mt][2] = fmaf(acc[mt][2], sb, total[mt][2]);
        total[mt][3] = fmaf(acc[mt][3], sb, total[mt][3]);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][i] = 0.0f;
      }
      sa = sa_next; sb = sb_next;
      if constexpr (ZEROS) { z2[0] = z2_next[0]; z2[1] = z2_next[1]; }
      ++group;
      bound += gsteps;
      load_scales(group + 1, sa_next, sb_next);
      load_zeros(group + 1, z2_next);
    };

    int local_step = 0;  // steps since the split began: the activations' offset
    const uint32_t* wnext = wq + kDepth * 128;
    const uint32_t* whnext = BITS == 3 ? wqh + kDepth * 64 : nullptr;
    for (int u = 0; u < n_units; u += kDepth) {
      static_for<kDepth>([&](auto dc) {
        constexpr int d = decltype(dc)::value;
        if (u + d < n_units) {
          uint32_t wl[4] = {buf[d].x, buf[d].y, buf[d].z, buf[d].w};
          uint32_t wh[2] = {0, 0};
          if constexpr (BITS == 3) { wh[0] = hbuf[d].x; wh[1] = hbuf[d].y; }
          if (u + d + kDepth < n_units) {
            buf[d] = load_stream16(wnext);
            if constexpr (BITS == 3) hbuf[d] = load_stream8(whnext);
          }
          wnext += 128;  // the unit kDepth ahead of the next one
          if constexpr (BITS == 3) whnext += 64;
          static_for<US>([&](auto sc_) {
            constexpr int s = decltype(sc_)::value;
            uint32_t a[4];
            dequant_step<BITS, DT, ZEROS, s>(wl, wh, z2, a);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              const uint2 b = *reinterpret_cast<const uint2*>(xrow[mt] + 16 * (local_step + s));
              mma_step<DT>(acc[mt], a, b.x, b.y);
            }
            if constexpr (!ALIGNED) {
              if (step + s + 1 == bound) next_group();  // warp-uniform: a group ends with this step
            }
          });
          if constexpr (ALIGNED) {
            if (step + US == bound) next_group();  // warp-uniform: a group ends with this unit
          }
          step += US;
          local_step += US;
        }
      });
    }
    next_group();  // the split's last (partial) group; the scales it requests are not used
  }

  // Epilogue. c0, c1: column col_a, rows 2t, 2t + 1 of the tile; c2, c3: column col_b.
  T* y = static_cast<T*>(args.y);
  const half* bias = static_cast<const half*>(args.bias);
  if (args.splits == 1) {
    if (!active) return;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = 8 * mt + 2 * t + (i & 1);
        const int col = i < 2 ? col_a : col_b;
        if (row < rows && col < args.n) {
          const float b = bias ? __half2float(bias[col]) : 0.0f;
          y[static_cast<size_t>(m0 + row) * args.n + col] = Act<DT>::from_float(total[mt][i] + b);
        }
      }
    return;
  }
  constexpr int R = 8 * MT;
  float* part = args.partials + (static_cast<size_t>(slice) * args.splits + split) * R * args.n_pad;
  if (active) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = 8 * mt + 2 * t + (i & 1);
        if (row < rows) part[static_cast<size_t>(row) * args.n_pad + (i < 2 ? col_a : col_b)] = total[mt][i];
      }
  }
  __threadfence();
  __syncthreads();
  __shared__ int last;
  int* counter = args.counters + slice * gridDim.x + block_n;
  if (threadIdx.x == 0) last = atomicAdd(counter, 1) == args.splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const float* slab = args.partials + static_cast<size_t>(slice) * args.splits * R * args.n_pad;
  for (int i = threadIdx.x; i < rows * kCtaN; i += kThreads) {
    const int row = i / kCtaN, col = block_n * kCtaN + i % kCtaN;
    if (col >= args.n) continue;
    float sum = 0.0f;
    for (int s = 0; s < args.splits; ++s)  // split order: the same sum on every call
      sum += __ldcg(slab + (static_cast<size_t>(s) * R + row) * args.n_pad + col);
    if (bias) sum += __half2float(bias[col]);
    y[static_cast<size_t>(m0 + row) * args.n + col] = Act<DT>::from_float(sum);
  }
  if (threadIdx.x == 0) *counter = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  }
#endif
}

}  // namespace gptq_cuda
