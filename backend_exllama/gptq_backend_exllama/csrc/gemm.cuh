// The ExLlama-style kernel: one thread per 4 output columns, weights decoded in registers by
// one mask and one add (fp16) or fma (bf16) per pair (qdq4.cuh), implicit split-K over
// blockIdx.z with an fp32 atomic reduction that the last block of each column block finishes
// (docs/DESIGN.md §11: the workspace belongs to the prepared weight, every call leaves it at
// zero).
//
// Grid: x = chunks of 8 activation rows (fastest, so the chunks of one weight tile run
// together and share it through L2), y = column blocks of 512, z = k splits.
#pragma once
#include <cstdint>
#include <type_traits>

#include "exllama.h"
#include "qdq4.cuh"

namespace gptq_exllama {

// Staged activations: fp16 as a duplicated half2 (a, a) so one HFMA2 multiplies a pair of
// columns; bf16 as fp32.
template <int DT>
using Staged = typename std::conditional<DT == kF16, uint32_t, float>::type;

template <bool STREAM>
__device__ __forceinline__ uint4 load_weights(const uint4* p) {
  // Weights are read once per call at one row chunk: stream them (evict first, no cache-policy
  // register: docs/DESIGN.md §8 on createpolicy under CUDA 13); several chunks re-read them.
#if GPTQ_HIP
  if constexpr (STREAM) return hip::load_streaming(p);
  else return __ldg(p);
#else
  if constexpr (STREAM) return __ldcs(p);
  else return __ldg(p);
#endif
}

// Activation rows [m0, m0 + rows) x sorted k rows [ks, ke) into shared memory, through the
// act-order permutation (the gather happens here, once per block, never per weight).
template <int DT, int ROWS>
__device__ __forceinline__ void stage_activations(Staged<DT> (*stage)[kStageK], const GemmArgs& a,
                                                  int m0, int rows, int ks, int ke) {
  const uint16_t* x = static_cast<const uint16_t*>(a.a);
  for (int idx = threadIdx.x; idx < ROWS * kStageK; idx += kThreads) {
    const int m = idx / kStageK, kk = idx % kStageK, k = ks + kk;
    uint32_t bits = 0;
    if (m < rows && k < ke && k < a.k) {
      const int col = a.perm != nullptr ? __ldg(a.perm + k) : k;
      bits = x[static_cast<size_t>(m0 + m) * a.k + col];
    }
    if constexpr (DT == kF16) stage[m][kk] = bits | (bits << 16);
    else stage[m][kk] = __uint_as_float(bits << 16);
  }
}

// STEPS 16-byte loads (8 k rows each) of one thread's column quad, then their dot products with
// every staged row; fp16 partial sums of d * a (d = x - X0, qdq4.cuh) stay in half2 for the
// STEPS * 8 rows, then go to fp32 scaled by the column's M (one FFMA each, as an FADD was).
template <int ROWS, bool STREAM, int STEPS>
__device__ __forceinline__ void step_f16(const uint4* qp, int quads, int k, int kk0,
                                         const uint32_t (*stage)[kStageK], const F16Group& gc,
                                         float (&acc)[ROWS][4]) {
  uint4 w[STEPS];
  // k >= 0: the unsigned division is one shift (the signed one cost ptxas 4 instructions more).
  const unsigned r0 = static_cast<unsigned>(k) / kStepK;
#pragma unroll
  for (int s = 0; s < STEPS; s++) w[s] = load_weights<STREAM>(qp + static_cast<size_t>(r0 + s) * quads);
  uint32_t h[ROWS][2];
#pragma unroll
  for (int m = 0; m < ROWS; m++) h[m][0] = h[m][1] = 0u;
#pragma unroll
  for (int s = 0; s < STEPS; s++) {
#pragma unroll
    for (int hk = 0; hk < 2; hk++) {  // words 2hk, 2hk+1: k rows 4hk..4hk+3, column pairs 0, 1
      const uint32_t w0 = hk ? w[s].z : w[s].x, w1 = hk ? w[s].w : w[s].y;
      uint32_t dq[2][4];
      dq[0][0] = hadd2(pair_f16<0>(w0, gc.pivot[0]), gc.neg_x0[0]);
      dq[0][1] = hadd2(pair_f16<1>(w0, gc.pivot[0]), gc.neg_x0[0]);
      dq[0][2] = hadd2(pair_f16<2>(w0, gc.pivot[0]), gc.neg_x0[0]);
      dq[0][3] = hadd2(pair_f16<3>(w0, gc.pivot[0]), gc.neg_x0[0]);
      dq[1][0] = hadd2(pair_f16<0>(w1, gc.pivot[1]), gc.neg_x0[1]);
      dq[1][1] = hadd2(pair_f16<1>(w1, gc.pivot[1]), gc.neg_x0[1]);
      dq[1][2] = hadd2(pair_f16<2>(w1, gc.pivot[1]), gc.neg_x0[1]);
      dq[1][3] = hadd2(pair_f16<3>(w1, gc.pivot[1]), gc.neg_x0[1]);
#pragma unroll
      for (int m = 0; m < ROWS; m++) {
        const uint4 a4 = *reinterpret_cast<const uint4*>(&stage[m][kk0 + 8 * s + 4 * hk]);
        const uint32_t a[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
          h[m][0] = hfma2(dq[0][i], a[i], h[m][0]);
          h[m][1] = hfma2(dq[1][i], a[i], h[m][1]);
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < ROWS; m++) {
    acc[m][0] = fmaf(f16_lo(h[m][0]), gc.m[0], acc[m][0]);
    acc[m][1] = fmaf(f16_hi(h[m][0]), gc.m[1], acc[m][1]);
    acc[m][2] = fmaf(f16_lo(h[m][1]), gc.m[2], acc[m][2]);
    acc[m][3] = fmaf(f16_hi(h[m][1]), gc.m[3], acc[m][3]);
  }
}

// The same for bf16 activations: the pairs become fp32 and everything after is fp32.
template <int ROWS, bool STREAM, int STEPS>
__device__ __forceinline__ void step_bf16(const uint4* qp, int quads, int k, int kk0,
                                          const float (*stage)[kStageK], const float4 s4,
                                          const float4 z4, float (&acc)[ROWS][4]) {
  uint4 w[STEPS];
  // k >= 0: the unsigned division is one shift (the signed one cost ptxas 4 instructions more).
  const unsigned r0 = static_cast<unsigned>(k) / kStepK;
#pragma unroll
  for (int s = 0; s < STEPS; s++) w[s] = load_weights<STREAM>(qp + static_cast<size_t>(r0 + s) * quads);
#pragma unroll
  for (int s = 0; s < STEPS; s++) {
#pragma unroll
    for (int hk = 0; hk < 2; hk++) {
      const uint32_t w0 = hk ? w[s].z : w[s].x, w1 = hk ? w[s].w : w[s].y;
      float dq[4][4];  // [column][k row]
#pragma unroll
      for (int p = 0; p < 2; p++) {
        const uint32_t word = p ? w1 : w0;
        const uint32_t x[4] = {pair_bf16<0>(word), pair_bf16<1>(word), pair_bf16<2>(word),
                               pair_bf16<3>(word)};
        const float s_lo = p ? s4.z : s4.x, s_hi = p ? s4.w : s4.y;
        const float z_lo = p ? z4.z : z4.x, z_hi = p ? z4.w : z4.y;
#pragma unroll
        for (int i = 0; i < 4; i++) {
          dq[2 * p][i] = fmaf(bf16_lo(x[i]), s_lo, z_lo);
          dq[2 * p + 1][i] = fmaf(bf16_hi(x[i]), s_hi, z_hi);
        }
      }
#pragma unroll
      for (int m = 0; m < ROWS; m++) {
        const float4 a4 = *reinterpret_cast<const float4*>(&stage[m][kk0 + 8 * s + 4 * hk]);
        const float a[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
#pragma unroll
          for (int c = 0; c < 4; c++) acc[m][c] = fmaf(dq[c][i], a[i], acc[m][c]);
        }
      }
    }
  }
}

template <int DT>
__device__ __forceinline__ void store_quad(void* c, const void* bias, size_t at, int col,
                                           const float (&v)[4]) {
  float b[4] = {0.f, 0.f, 0.f, 0.f};
  const uint16_t* bb = static_cast<const uint16_t*>(bias);
  uint16_t out[4];
#pragma unroll
  for (int j = 0; j < 4; j++) {
    if (bb != nullptr) b[j] = DT == kF16 ? f16_bits_to_f32(bb[col + j]) : __uint_as_float(uint32_t(bb[col + j]) << 16);
    out[j] = DT == kF16 ? f32_to_f16_bits(v[j] + b[j]) : f32_to_bf16_bits(v[j] + b[j]);
  }
  *reinterpret_cast<uint2*>(static_cast<uint16_t*>(c) + at) =
      make_uint2(out[0] | (uint32_t(out[1]) << 16), out[2] | (uint32_t(out[3]) << 16));
}

template <int DT, int ROWS, bool STREAM>
__global__ void __launch_bounds__(kThreads, kMinBlocks) gemm_kernel(const GemmArgs args) {
  __shared__ __align__(16) Staged<DT> stage[ROWS][kStageK];
  __shared__ int last;
  const int chunk = blockIdx.x, col_block = blockIdx.y, splits = gridDim.z;
  const int quads = args.n / 4;
  const int quad = col_block * kThreads + threadIdx.x;
  const bool active = quad < quads;
  const int m0 = chunk * kRowsPerChunk;
  const int rows = min(ROWS, args.m - m0);
  const int k_begin = blockIdx.z * args.k_split;
  const int k_end = min(k_begin + args.k_split, args.k_pad);
  const uint4* qp = args.q + quad;

  float acc[ROWS][4];
#pragma unroll
  for (int m = 0; m < ROWS; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;

  for (int ks = k_begin; ks < k_end; ks += kStageK) {
    const int ke = min(ks + kStageK, k_end);
    __syncthreads();  // the previous stage has been read
    stage_activations<DT, ROWS>(stage, args, m0, rows, ks, ke);
    __syncthreads();
    if (!active) continue;
    int k = ks;
    while (k < ke) {  // one group segment at a time: its folded constants load once
      const int g = k / args.group_size;
      const int seg_end = min((g + 1) * args.group_size, ke);
      if constexpr (DT == kF16) {
        const F16Group gc =
            unfold_f16(__ldg(static_cast<const uint4*>(args.sz) + static_cast<size_t>(g) * quads + quad));
        for (; k + 4 * kStepK <= seg_end; k += 4 * kStepK)
          step_f16<ROWS, STREAM, 4>(qp, quads, k, k - ks, stage, gc, acc);
        for (; k < seg_end; k += kStepK) step_f16<ROWS, STREAM, 1>(qp, quads, k, k - ks, stage, gc, acc);
      } else {
        const float4* p = static_cast<const float4*>(args.sz) + (static_cast<size_t>(g) * quads + quad) * 2;
        const float4 s4 = __ldg(p), z4 = __ldg(p + 1);
        for (; k + 4 * kStepK <= seg_end; k += 4 * kStepK)
          step_bf16<ROWS, STREAM, 4>(qp, quads, k, k - ks, stage, s4, z4, acc);
        for (; k < seg_end; k += kStepK) step_bf16<ROWS, STREAM, 1>(qp, quads, k, k - ks, stage, s4, z4, acc);
      }
    }
  }

  const size_t base = static_cast<size_t>(m0) * args.n + 4 * static_cast<size_t>(quad);
  if (splits == 1) {
    if (!active) return;
#pragma unroll
    for (int m = 0; m < ROWS; m++)
      if (m < rows) store_quad<DT>(args.c, args.bias, base + static_cast<size_t>(m) * args.n, 4 * quad, acc[m]);
    return;
  }
  // Split-K: add into the fp32 workspace; the last split of this (chunk, column block) writes
  // the output and leaves the workspace and its counter at zero for the next call.
  if (active) {
#pragma unroll
    for (int m = 0; m < ROWS; m++) {
      if (m >= rows) continue;
      float* p = args.acc + base + static_cast<size_t>(m) * args.n;
#if GPTQ_HIP
      // The hardware fp32 atomic add (gfx90a: global_atomic_add_f32) instead of a compare-and-swap
      // loop: valid on the coarse-grained device memory that torch allocates the workspace in.
      unsafeAtomicAdd(p, acc[m][0]);
      unsafeAtomicAdd(p + 1, acc[m][1]);
      unsafeAtomicAdd(p + 2, acc[m][2]);
      unsafeAtomicAdd(p + 3, acc[m][3]);
#elif __CUDA_ARCH__ >= 900
      atomicAdd(reinterpret_cast<float4*>(p), make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
#else
      atomicAdd(p, acc[m][0]);
      atomicAdd(p + 1, acc[m][1]);
      atomicAdd(p + 2, acc[m][2]);
      atomicAdd(p + 3, acc[m][3]);
#endif
    }
  }
  __threadfence();
  __syncthreads();
  int* counter = args.counters + static_cast<size_t>(chunk) * gridDim.y + col_block;
  if (threadIdx.x == 0) last = atomicAdd(counter, 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (active) {
#pragma unroll
    for (int m = 0; m < ROWS; m++) {
      if (m >= rows) continue;
      float4* p = reinterpret_cast<float4*>(args.acc + base + static_cast<size_t>(m) * args.n);
#if GPTQ_HIP
      // The __threadfence above is an acquire at device scope on AMD (it invalidates the
      // compute unit's L1), so plain accesses see the other splits' atomics in L2.
      const float4 s = *p;
      *p = make_float4(0.f, 0.f, 0.f, 0.f);
#else
      const float4 s = __ldcg(p);
      __stcg(p, make_float4(0.f, 0.f, 0.f, 0.f));
#endif
      const float v[4] = {s.x, s.y, s.z, s.w};
      store_quad<DT>(args.c, args.bias, base + static_cast<size_t>(m) * args.n, 4 * quad, v);
    }
  }
  if (threadIdx.x == 0) *counter = 0;
}

// The layer as a dense [k_pad, n] weight in the sorted k order, by the kernel's own arithmetic
// (the dequantize + cuBLAS path above the policy's break-even). fp16: d * M rounded once, so
// every weight is (q - zero) * scale correctly rounded and q == zero writes exactly 0.
template <int DT>
__global__ void __launch_bounds__(256) dequant_kernel(const DequantArgs args) {
  const int quads = args.n / 4;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (idx >= static_cast<int64_t>(args.k_pad / kStepK) * quads) return;
  const int r = static_cast<int>(idx / quads), quad = static_cast<int>(idx % quads);
  const uint4 w = args.q[idx];
  const int g = r * kStepK / args.group_size;
  uint16_t* out = static_cast<uint16_t*>(args.out);
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int hk = 0; hk < 2; hk++) {
    uint32_t v[4][2];  // [k row][column pair] as two 16-bit values
    if constexpr (DT == kF16) {
      const uint4 sz = __ldg(static_cast<const uint4*>(args.sz) + static_cast<size_t>(g) * quads + quad);
#pragma unroll
      for (int p = 0; p < 2; p++) {
        const uint32_t word = words[2 * hk + p];
        const uint32_t S = p ? sz.z : sz.x, neg_x0 = p ? sz.w : sz.y;
        const uint32_t pivot = pivot_f16(S);
        const uint32_t M = hmul2(S, 0x78007800u - pivot);  // S / P, exact (unfold_f16)
        v[0][p] = hmul2(hadd2(pair_f16<0>(word, pivot), neg_x0), M);
        v[1][p] = hmul2(hadd2(pair_f16<1>(word, pivot), neg_x0), M);
        v[2][p] = hmul2(hadd2(pair_f16<2>(word, pivot), neg_x0), M);
        v[3][p] = hmul2(hadd2(pair_f16<3>(word, pivot), neg_x0), M);
      }
    } else {
      const float4* sp = static_cast<const float4*>(args.sz) + (static_cast<size_t>(g) * quads + quad) * 2;
      const float4 s4 = __ldg(sp), z4 = __ldg(sp + 1);
#pragma unroll
      for (int p = 0; p < 2; p++) {
        const uint32_t word = words[2 * hk + p];
        const uint32_t x[4] = {pair_bf16<0>(word), pair_bf16<1>(word), pair_bf16<2>(word),
                               pair_bf16<3>(word)};
        const float s_lo = p ? s4.z : s4.x, s_hi = p ? s4.w : s4.y;
        const float z_lo = p ? z4.z : z4.x, z_hi = p ? z4.w : z4.y;
#pragma unroll
        for (int i = 0; i < 4; i++)
          v[i][p] = f32_to_bf16_bits(fmaf(bf16_lo(x[i]), s_lo, z_lo)) |
                    (uint32_t(f32_to_bf16_bits(fmaf(bf16_hi(x[i]), s_hi, z_hi))) << 16);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const size_t row = static_cast<size_t>(r) * kStepK + 4 * hk + i;
      *reinterpret_cast<uint2*>(out + row * args.n + 4 * static_cast<size_t>(quad)) = make_uint2(v[i][0], v[i][1]);
    }
  }
}

using GemmFn = void (*)(GemmArgs);

template <int DT, bool STREAM>
GemmFn gemm_fn(int rows) {
  switch (rows) {
    case 1: return gemm_kernel<DT, 1, STREAM>;
    case 2: return gemm_kernel<DT, 2, STREAM>;
    case 3: return gemm_kernel<DT, 3, STREAM>;
    case 4: return gemm_kernel<DT, 4, STREAM>;
    case 5: return gemm_kernel<DT, 5, STREAM>;
    case 6: return gemm_kernel<DT, 6, STREAM>;
    case 7: return gemm_kernel<DT, 7, STREAM>;
    default: return gemm_kernel<DT, 8, STREAM>;
  }
}

// Rows 1..8 in one chunk stream the weights; more rows run as chunks of 8 that re-read them
// from L2 (only the 8-row kernel is built without streaming).
template <int DT>
GemmFn select_gemm(int rows, bool stream) {
  return stream ? gemm_fn<DT, true>(rows) : gemm_kernel<DT, 8, false>;
}

template <int DT>
cudaError_t occupancy_t(int rows, bool stream, int* blocks) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, select_gemm<DT>(rows, stream), kThreads, 0);
}

template <int DT>
cudaError_t launch_t(const GemmArgs& args, int splits, cudaStream_t stream) {
  const int chunks = (args.m + kRowsPerChunk - 1) / kRowsPerChunk;
  const int rows = chunks == 1 ? args.m : kRowsPerChunk;
  const dim3 grid(chunks, (args.n / 4 + kThreads - 1) / kThreads, splits);
  select_gemm<DT>(rows, chunks == 1)<<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <int DT>
cudaError_t dequant_t(const DequantArgs& args, cudaStream_t stream) {
  const int64_t threads = static_cast<int64_t>(args.k_pad / kStepK) * (args.n / 4);
  if (threads == 0) return cudaSuccess;
  dequant_kernel<DT><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace gptq_exllama
