// The Hopper 4-bit GEMM main loop: Y^T[N, M] = W^T[N, K] . X^T[K, M] with wgmma.
//
// Swapped operands (NOTES/hopper-wgmma.md): the weights are wgmma's A operand, dequantized
// into registers (each warp of a warpgroup holds 16 of the 64 rows, in mma.m16n8k16's A
// fragment layout); the activations are the B operand, read by the tensor cores from shared
// memory where X's [M, K] row-major tile is already K-major (wgmma's plain B layout), stored
// with the 128-byte swizzle. wgmma's N is the token tile BM (16 .. 128).
//
// A block is two warpgroups (128 output columns) x BM tokens; its k range (all of K, or one
// split of it: whole stages) streams through a multi-stage cp.async ring. A stage is kSub 64-k
// tiles (stage.h: 2 for BM <= 64, i.e. 128 k and eight wgmma k16 steps per stage, round 3; 1 for
// BM 128): per 64-k tile the X sub-tile (BM x 128 bytes, swizzled), the weight tile (4 KiB:
// thread t's 16 bytes are its four k16 steps' A fragments) and two rows of scales (and zero
// points) for k offsets 0 and 32 (group sizes that are multiples of 32). Dequantization of the
// next k16 step overlaps the running wgmma (commit / wait_group 1). The epilogue stages the fp32
// tile in shared memory and writes 16-byte rows: fp16/bf16 Y, or fp32 partial sums for the
// split-K reduction.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "hopper.h"
#include "stage.h"
#include "wgmma.cuh"

namespace gptq_hopper {

// Cfg<BM> (stage geometry, ring depth, shared memory): stage.h.

// --- PTX ---------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool full) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(full ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// cp.async writes through the generic proxy; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;  // (a & b) | c in one lop3
  asm volatile("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Shared-memory matrix descriptor of a K-major tile with the 128-byte swizzle: 8-row groups
// 1024 bytes apart (SBO); the leading offset is unused for this layout. A k16 step inside the
// 64-wide tile advances the start address by 32 bytes (the swizzle is applied to addresses).
__device__ __forceinline__ uint64_t desc_k_major_sw128(uint32_t addr) {
  uint64_t d = static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>(1) << 16;
  d |= static_cast<uint64_t>(1024 >> 4) << 32;
  d |= static_cast<uint64_t>(1) << 62;
  return d;
}

// --- activation types ----------------------------------------------------------------------------
template <typename T>
struct Act;
template <>
struct Act<half> {
  using T2 = half2;
  static constexpr bool kBf16 = false;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024 in both halves
  static __device__ __forceinline__ T2 splat(half v) { return __half2half2(v); }
  static __device__ __forceinline__ T2 num(float v) { return __float2half2_rn(v); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <>
struct Act<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr bool kBf16 = true;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128 in both halves
  static __device__ __forceinline__ T2 splat(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
  static __device__ __forceinline__ T2 num(float v) { return __float2bfloat162_rn(v); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <typename T2>
__device__ __forceinline__ T2 as_t2(uint32_t v) {
  return *reinterpret_cast<T2*>(&v);
}
template <typename T2>
__device__ __forceinline__ uint32_t as_u32(T2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

// One group's constants for this thread's two weight rows (lo: a0/a2, hi: a1/a3).
template <typename T>
struct Group {
  typename Act<T>::T2 sc[2];
  typename Act<T>::T2 off[2];    // magic + zero
  typename Act<T>::T2 off16[2];  // -(magic / 16 + zero): fp16's shifted high fields
};

template <typename T, bool ZP>
__device__ __forceinline__ Group<T> load_group(const T* sc, const T* zp, int row) {
  using A = Act<T>;
  Group<T> g;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    g.sc[h] = A::splat(sc[row + 8 * h]);
    const auto z = ZP ? A::splat(zp[row + 8 * h]) : A::num(8.0f);
    const float magic = A::kBf16 ? 128.0f : 1024.0f;
    g.off[h] = __hadd2(A::num(magic), z);
    g.off16[h] = __hneg2(__hadd2(A::num(magic / 16.0f), z));
  }
  return g;
}

// One 32-bit word = one k16 step's A fragment (a0..a3) for this thread: nibbles i and i+4 are
// register a_i's (low, high) halves (layout.py). a0, a2 are row lo's; a1, a3 row hi's.
template <typename T>
__device__ __forceinline__ void dequant4(uint32_t q, const Group<T>& g, uint32_t (&a)[4]) {
  using A = Act<T>;
  using T2 = typename A::T2;
  constexpr uint32_t kLo = 0x000f000fu;
  if constexpr (!A::kBf16) {
    constexpr uint32_t kHi = 0x00f000f0u;
    const uint32_t q8 = q >> 8;
    const T2 v0 = as_t2<T2>(and_or(q, kLo, A::kMagic));
    const T2 v1 = as_t2<T2>(and_or(q, kHi, A::kMagic));
    const T2 v2 = as_t2<T2>(and_or(q8, kLo, A::kMagic));
    const T2 v3 = as_t2<T2>(and_or(q8, kHi, A::kMagic));
    const T2 sixteenth = A::num(0.0625f);
    a[0] = as_u32(__hmul2(__hsub2(v0, g.off[0]), g.sc[0]));
    a[1] = as_u32(__hmul2(__hfma2(v1, sixteenth, g.off16[1]), g.sc[1]));
    a[2] = as_u32(__hmul2(__hsub2(v2, g.off[0]), g.sc[0]));
    a[3] = as_u32(__hmul2(__hfma2(v3, sixteenth, g.off16[1]), g.sc[1]));
  } else {
    const T2 v0 = as_t2<T2>(and_or(q, kLo, A::kMagic));
    const T2 v1 = as_t2<T2>(and_or(q >> 4, kLo, A::kMagic));
    const T2 v2 = as_t2<T2>(and_or(q >> 8, kLo, A::kMagic));
    const T2 v3 = as_t2<T2>(and_or(q >> 12, kLo, A::kMagic));
    a[0] = as_u32(__hmul2(__hsub2(v0, g.off[0]), g.sc[0]));
    a[1] = as_u32(__hmul2(__hsub2(v1, g.off[1]), g.sc[1]));
    a[2] = as_u32(__hmul2(__hsub2(v2, g.off[0]), g.sc[0]));
    a[3] = as_u32(__hmul2(__hsub2(v3, g.off[1]), g.sc[1]));
  }
}

// --- the kernel ----------------------------------------------------------------------------------
template <typename T, int BM, bool ZP>
__global__ void __launch_bounds__(kThreads, Cfg<BM>::kMinBlocks)
    hopper_gemm_kernel(const T* __restrict__ x, const int4* __restrict__ w, const T* __restrict__ scales,
                       const T* __restrict__ zeros, T* __restrict__ y, float* __restrict__ ws, int M,
                       int N, int K, int group_size, int stages_per_split) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Cfg<BM>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);

  const int tid = threadIdx.x;
  const int n0 = blockIdx.x * kBN;
  const int m0 = blockIdx.y * BM;
  const int split = blockIdx.z;
  const int KT = K / kBK;                     // 64-k weight tiles
  const int KS = k_stages(KT, C::kSub);        // stages (the last one may hold a single tile)
  const int s_begin = split * stages_per_split;
  const int s_end = min(KS, s_begin + stages_per_split);
  const int nst = max(0, s_end - s_begin);
  const int4* wblk = w + static_cast<size_t>(blockIdx.x) * KT * kThreads;

  // Stage s = weight tiles kSub s .. kSub s + kSub - 1. A tile beyond K (the second half of the
  // last stage when K % 128 == 64 at kSub 2) is zero-filled: X, weights, scales and zeros of 0,
  // so its wgmmas add exact zeros (the dequantized weights are finite: (1024 - z) * 0).
  auto load_stage = [&](int slot, int s) {
    const uint32_t st = base + slot * C::kStageBytes;
    const int kt0 = C::tile_of(s, 0);
    const int k0 = kt0 * kBK;
#pragma unroll
    for (int i = 0; i < C::kXChunks / kThreads; ++i) {  // a fixed count: no runtime trip count
      const int c = tid + i * kThreads;
      const int r = C::x_row(c);
      const int kk = k0 + C::x_k(c);
      const bool ok = m0 + r < M && (C::kSub == 1 || kk < K);
      const T* src = x + static_cast<size_t>(ok ? m0 + r : 0) * K + (C::kSub == 1 || ok ? kk : 0);
      cp_async16(st + C::x_dst(c), src, ok);  // rows >= M (and a tile beyond K) are zero
    }
#pragma unroll
    for (int h = 0; h < C::kSub; ++h) {
      const bool ok = C::kSub == 1 || kt0 + h < KT;
      cp_async16(st + C::w_dst(h, tid), ok ? wblk + C::w_src(kt0 + h, tid) : w, ok);
    }
    if (tid < (ZP ? 2 : 1) * 16 * C::kRows) {
      const int which = C::s_which(tid), r = C::s_row(tid), ch = C::s_chunk(tid);
      const int kk = k0 + C::s_k(r);
      const bool ok = C::kSub == 1 || kk < K;
      const T* src = ok ? (which ? zeros : scales) + static_cast<size_t>(kk / group_size) * N + n0 + ch * 8 : scales;
      cp_async16(st + C::s_dst(which, r, ch), src, ok);
    }
  };

  float acc[BM / 2];
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) acc[i] = 0.0f;

#pragma unroll
  for (int s = 0; s < C::kLoadAhead; ++s) {
    if (s < nst) load_stage(s, s_begin + s);
    cp_async_commit();
  }

  const int lane = tid & 31;
  const int row = (tid >> 7) * 64 + ((tid >> 5) & 3) * 16 + (lane >> 2);  // row lo; hi = row + 8
  using MMA = Wgmma<BM, Act<T>::kBf16>;

  // Stage t's slot is refilled with stage t + kStages only after the barrier of iteration t + 2:
  // by then every warpgroup has waited out all but the newest wgmma group, which belongs to
  // stage t + 1, so stage t's X tiles are no longer read (the stage-end bubble of v1 is gone: the
  // last wgmma of a stage runs across the barrier and the next stage's first dequantization).
  // The wgmma groups in flight: at a stage's start only the previous stage's last; steps 0 and
  // 1 are issued without waiting (three groups), every later step first retires all but the
  // newest (wait_group 1), and so does the stage end.
  for (int t = 0; t < nst; ++t) {
    cp_async_wait<C::kLoadAhead - 1>();
    fence_proxy_async();
    __syncthreads();  // stage t is in; every warpgroup's wgmmas of stage t - 2 are finished
    {
      const int nt = t + C::kLoadAhead;
      if (nt < nst) load_stage(nt % C::kStages, s_begin + nt);
      cp_async_commit();
    }
    const int slot = t % C::kStages;
    const uint8_t* st = smem + slot * C::kStageBytes;
    const uint32_t xaddr = base + slot * C::kStageBytes;
    const T* sc = reinterpret_cast<const T*>(st + C::s_dst(0, 0, 0));
    const T* zp = reinterpret_cast<const T*>(st + C::s_dst(1, 0, 0));
    // The first tile's words and scale rows now, a second tile's just before step 3's
    // dequantization (needed from step 4 on, after the wait for step 2's wgmma, which hides
    // the shared-memory latency): the 128-k stage keeps the live registers near round 2's.
    uint4 q[C::kSub];
    Group<T> g[C::kRows];
    q[0] = *reinterpret_cast<const uint4*>(st + C::w_dst(0, tid));
    g[0] = load_group<T, ZP>(sc, zp, row);
    g[1] = load_group<T, ZP>(sc + kBN, zp + kBN, row);
    uint32_t a[C::kSteps][4];
#pragma unroll
    for (int j = 0; j < C::kSteps; ++j) {
      if (j % 4 == 3 && j + 4 < C::kSteps) {
        const int h = j / 4 + 1;
        q[h] = *reinterpret_cast<const uint4*>(st + C::w_dst(h, tid));
        g[2 * h] = load_group<T, ZP>(sc + 2 * h * kBN, zp + 2 * h * kBN, row);
        g[2 * h + 1] = load_group<T, ZP>(sc + (2 * h + 1) * kBN, zp + (2 * h + 1) * kBN, row);
      }
      const uint4& qh = q[j >> 2];
      const uint32_t word = (j & 3) == 0 ? qh.x : ((j & 3) == 1 ? qh.y : ((j & 3) == 2 ? qh.z : qh.w));
      dequant4<T>(word, g[C::s_row_of_step(j)], a[j]);
      if (j >= 2) wgmma_wait<1>();  // retires step j - 2 (and at j = 2 the previous stage's last)
      wgmma_fence();
      MMA::mma(acc, a[j], desc_k_major_sw128(xaddr + C::x_step(j)));
      wgmma_commit();
    }
    wgmma_wait<1>();  // this stage's last wgmma stays in flight; all earlier ones are done
  }

  // Epilogue: fragments -> shared fp32 tile [BM][kOutStride] -> 16-byte row stores.
  wgmma_wait<0>();  // the accumulators are final and no wgmma reads the ring any more
  cp_async_wait<0>();
  __syncthreads();
  float* out = reinterpret_cast<float*>(smem);
  const int t4 = lane & 3;
#pragma unroll
  for (int b = 0; b < BM / 8; ++b) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = 8 * b + 2 * t4 + (e & 1);
      out[m * C::kOutStride + row + 8 * (e >> 1)] = acc[4 * b + e];
    }
  }
  __syncthreads();
  if (ws == nullptr) {
#pragma unroll
    for (int c = tid; c < BM * (kBN / 8); c += kThreads) {
      const int r = c / (kBN / 8), ch = c % (kBN / 8);
      if (m0 + r < M) {
        const float4 f0 = *reinterpret_cast<const float4*>(out + r * C::kOutStride + ch * 8);
        const float4 f1 = *reinterpret_cast<const float4*>(out + r * C::kOutStride + ch * 8 + 4);
        uint4 v;
        v.x = Act<T>::pack(f0.x, f0.y);
        v.y = Act<T>::pack(f0.z, f0.w);
        v.z = Act<T>::pack(f1.x, f1.y);
        v.w = Act<T>::pack(f1.z, f1.w);
        *reinterpret_cast<uint4*>(y + static_cast<size_t>(m0 + r) * N + n0 + ch * 8) = v;
      }
    }
  } else {
    float* dst = ws + static_cast<size_t>(split) * M * N;
#pragma unroll
    for (int c = tid; c < BM * (kBN / 4); c += kThreads) {
      const int r = c / (kBN / 4), ch = c % (kBN / 4);
      if (m0 + r < M) {
        *reinterpret_cast<float4*>(dst + static_cast<size_t>(m0 + r) * N + n0 + ch * 4) =
            *reinterpret_cast<const float4*>(out + r * C::kOutStride + ch * 4);
      }
    }
  }
#else
  __trap();  // built for sm_90a only (build.py); any other target is a build mistake
#endif
}

template <typename T, int BM, bool ZP>
cudaError_t launch_one(const void* x, const void* w, const void* scales, const void* zeros, void* y,
                       float* ws, int M, int N, int K, int group_size, int splits, cudaStream_t stream) {
  auto kernel = hopper_gemm_kernel<T, BM, ZP>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg<BM>::kSmem);
  if (err != cudaSuccess) return err;
  const int KT = K / kBK;
  const int KS = k_stages(KT, Cfg<BM>::kSub);
  const int per_split = stages_per_split(KT, Cfg<BM>::kSub, splits);  // whole stages per split
  if (per_split < 1 || (KS + per_split - 1) / per_split != splits) return cudaErrorInvalidValue;  // ops.py normalises
  dim3 grid(N / kBN, (M + BM - 1) / BM, splits);
  kernel<<<grid, kThreads, Cfg<BM>::kSmem, stream>>>(
      static_cast<const T*>(x), static_cast<const int4*>(w), static_cast<const T*>(scales),
      static_cast<const T*>(zeros), static_cast<T*>(y), splits > 1 ? ws : nullptr, M, N, K, group_size,
      per_split);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const void* x, const void* w, const void* scales, const void* zeros, void* y,
                         float* ws, int M, int N, int K, int group_size, int bm, int splits,
                         cudaStream_t stream) {
  if (M <= 0 || N % kBN || K % kBK || group_size % 32 || splits < 1) return cudaErrorInvalidValue;
  const bool zp = zeros != nullptr;
#define GPTQ_HOPPER_CASE(BM_)                                                                     \
  if (bm == BM_)                                                                                  \
    return zp ? launch_one<T, BM_, true>(x, w, scales, zeros, y, ws, M, N, K, group_size, splits, stream) \
              : launch_one<T, BM_, false>(x, w, scales, zeros, y, ws, M, N, K, group_size, splits, stream);
  GPTQ_HOPPER_CASE(16)
  GPTQ_HOPPER_CASE(32)
  GPTQ_HOPPER_CASE(64)
  GPTQ_HOPPER_CASE(128)
#undef GPTQ_HOPPER_CASE
  return cudaErrorInvalidValue;
}

// How many blocks of one instantiation the runtime fits on an SM (shared memory and registers
// as compiled): ops.py's split plan counts block slots, not SMs (NOTES/hopper-wgmma.md).
template <typename T, int BM, bool ZP>
cudaError_t occupancy_one(int* blocks) {
  auto kernel = hopper_gemm_kernel<T, BM, ZP>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg<BM>::kSmem);
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, kThreads, Cfg<BM>::kSmem);
}

template <typename T>
cudaError_t occupancy_typed(int bm, bool zp, int* blocks) {
#define GPTQ_HOPPER_CASE(BM_) \
  if (bm == BM_) return zp ? occupancy_one<T, BM_, true>(blocks) : occupancy_one<T, BM_, false>(blocks);
  GPTQ_HOPPER_CASE(16)
  GPTQ_HOPPER_CASE(32)
  GPTQ_HOPPER_CASE(64)
  GPTQ_HOPPER_CASE(128)
#undef GPTQ_HOPPER_CASE
  return cudaErrorInvalidValue;
}

}  // namespace gptq_hopper
