// Device-side basics: the activation types, exact compile-time fp16/bf16 constants, PTX wrappers
// (streaming loads, mma.sync) and a compile-time loop.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "cuda_kernels.h"

namespace gptq_cuda {

// Calls f(std::integral_constant<int, I>) for I = 0 .. N-1, so that shifts, masks and register
// indices derived from I are compile-time constants (no local-memory arrays, no run-time shifts).
template <typename F, int... I>
__device__ __forceinline__ void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

// The bits of a value that the format represents exactly (integers and powers of two here):
// 16-bit float with `mant` mantissa bits and `exp` exponent bits.
constexpr uint32_t exact_bits(double v, int mant, int exp) {
  if (v == 0) return 0;
  const uint32_t sign = v < 0 ? 1u : 0u;
  double a = v < 0 ? -v : v;
  int e = 0;
  while (a >= 2.0) { a /= 2.0; ++e; }
  while (a < 1.0) { a *= 2.0; --e; }
  const uint32_t m = static_cast<uint32_t>((a - 1.0) * static_cast<double>(1u << mant));
  const int bias = (1 << (exp - 1)) - 1;
  return (sign << 15) | (static_cast<uint32_t>(e + bias) << mant) | m;
}

// Whether exact_bits represents v exactly (a static_assert guards every constant).
constexpr bool is_exact(double v, int mant) {
  if (v == 0) return true;
  double a = v < 0 ? -v : v;
  while (a >= 2.0) a /= 2.0;
  while (a < 1.0) a *= 2.0;
  const double m = (a - 1.0) * static_cast<double>(1u << mant);
  return m == static_cast<double>(static_cast<uint32_t>(m));
}

template <int DT> struct Act;
template <> struct Act<kF16> {
  using T = half;
  using T2 = half2;
  static constexpr int kMantissa = 10;
  static constexpr double kMagic = 1024.0;  // 0x6400: fp16 of 1024 + (10-bit field)
  static constexpr uint32_t bits(double v) { return exact_bits(v, 10, 5); }
  static constexpr uint32_t pair(double v) { return bits(v) * 0x10001u; }
  __device__ static float to_float(T v) { return __half2float(v); }
  __device__ static T from_float(float v) { return __float2half_rn(v); }
  __device__ static float2 to_float2(uint32_t v) {
    half2 h = *reinterpret_cast<half2*>(&v);
    return __half22float2(h);
  }
};
template <> struct Act<kBF16> {
  using T = __nv_bfloat16;
  using T2 = __nv_bfloat162;
  static constexpr int kMantissa = 7;
  static constexpr double kMagic = 128.0;  // 0x4300: bf16 of 128 + (7-bit field)
  static constexpr uint32_t bits(double v) { return exact_bits(v, 7, 8); }
  static constexpr uint32_t pair(double v) { return bits(v) * 0x10001u; }
  __device__ static float to_float(T v) { return __bfloat162float(v); }
  __device__ static T from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static float2 to_float2(uint32_t v) {
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
  }
};

// a * b + c on two packed 16-bit floats, one rounding (HFMA2).
template <int DT>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  if constexpr (DT == kF16) {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
#else
    d = 0;  // bf16 kernels are refused below sm_80 (build.arch_problem); never reached
#endif
  }
  return d;
}

// a - b on two packed 16-bit floats as b * -1 + a (one HFMA2; exact here: small integers).
template <int DT>
__device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
  return fma2<DT>(b, Act<DT>::pair(-1.0), a);
}

// 16 bytes that are read once per call: not kept in L1.
__device__ __forceinline__ uint4 load_stream16(const uint32_t* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ uint2 load_stream8(const uint32_t* p) {
  uint2 r;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  return r;
}

// c += A * B for one 16 x 16 (A, the weights: 16 columns x 16 channels) by 16 x 8 (B, the
// activations: 16 channels x 8 rows) step, fp32 accumulators; a, b in PTX's fragment layout.
// sm_75 has no m16n8k16: two m16n8k8 over channels 0-7 (a0, a1, b0) and 8-15 (a2, a3, b1).
template <int DT>
__device__ __forceinline__ void mma_step(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (DT == kF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#elif defined(__CUDA_ARCH__)
  if constexpr (DT == kF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[2]), "r"(a[3]), "r"(b1));
  }
#endif
}

}  // namespace gptq_cuda
