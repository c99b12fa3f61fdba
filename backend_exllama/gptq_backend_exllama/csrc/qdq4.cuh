// Turning the shuffled words of layout.py into weights, two at a time.
//
// A 32-bit word holds 8 four-bit values: 4 k rows x 2 columns. Pair i (k row i of the word, the
// two columns as the low and high half) sits at the bits that a right rotation by kRot[i] moves
// to 6-9 (low) and 22-25 (high). One mask-and-or (LOP3) then makes a half2 whose halves are
// 1 + q/16 (0x3C00 | q << 6), and one fused multiply-add with the folded constants
// S = 16 * scale and Z = -(16 + zero) * scale gives (q - zero) * scale: w = x * S + Z.
// With the value at the top of the mantissa the zero term is only (16 + zero) * scale, so its
// fp16 rounding costs at most 1/64 of a quantization step (docs/DESIGN.md §2: W = s * (q - z)).
// bf16 layers use the same words: a rotation 3 bits further puts the value at the top of
// bf16's 7-bit mantissa (0x3F80 | q << 3 is 1 + q/16), and the arithmetic runs in fp32.
#pragma once
#include <cstdint>

#include "portable.cuh"

namespace gptq_exllama {

constexpr uint32_t kF16Mask = 0x03C003C0u;
constexpr uint32_t kF16One = 0x3C003C00u;    // 1.0 in both halves
constexpr uint32_t kBF16Mask = 0x00780078u;
constexpr uint32_t kBF16One = 0x3F803F80u;   // bf16 1.0 in both halves

// (a & b) | c as one LOP3: written in PTX with register operands, since ptxas splits the C++
// form into two LOP3s when both constants are immediates (an instruction holds one). AMD: the
// C++ form, one v_and_or_b32 on gfx10+; on gfx9 (CDNA) a v_and_b32 and a v_or_b32, since a
// VOP3 instruction there holds no 32-bit literal.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
#if GPTQ_HIP
  return (a & b) | c;
#else
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#endif
}

template <int R>
__device__ __forceinline__ uint32_t rotr(uint32_t w) {
  if constexpr (R == 0) return w;
  else return __funnelshift_r(w, w, R);
}

// Halves (1 + q_lo / 16, 1 + q_hi / 16) of pair I, fp16.
template <int I>
__device__ __forceinline__ uint32_t pair_f16(uint32_t w) {
  constexpr int r[4] = {0, 4, 8, 28};  // layout.py FIELD_ROTATIONS
  return and_or(rotr<r[I]>(w), kF16Mask, kF16One);
}

// Halves (1 + q_lo / 16, 1 + q_hi / 16) of pair I, bf16 (the same word, rotated 3 further).
template <int I>
__device__ __forceinline__ uint32_t pair_bf16(uint32_t w) {
  constexpr int r[4] = {3, 7, 11, 31};
  return and_or(rotr<r[I]>(w), kBF16Mask, kBF16One);
}

// Round-to-nearest fp16x2 fma (AMD: v_pk_fma_f16 through HIP's __hfma2).
__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
#if GPTQ_HIP
  return hip::bits_of(__hfma2(hip::as_half2(a), hip::as_half2(b), hip::as_half2(c)));
#else
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#endif
}

__device__ __forceinline__ float f16_lo(uint32_t h2) {
#if GPTQ_HIP
  return __low2float(hip::as_half2(h2));
#else
  float f;
  asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %1;\n cvt.f32.f16 %0, l;\n}" : "=f"(f) : "r"(h2));
  return f;
#endif
}

__device__ __forceinline__ float f16_hi(uint32_t h2) {
#if GPTQ_HIP
  return __high2float(hip::as_half2(h2));
#else
  float f;
  asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %1;\n cvt.f32.f16 %0, h;\n}" : "=f"(f) : "r"(h2));
  return f;
#endif
}

__device__ __forceinline__ float bf16_lo(uint32_t b2) { return __uint_as_float(b2 << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t b2) { return __uint_as_float(b2 & 0xFFFF0000u); }

__device__ __forceinline__ uint16_t f32_to_f16_bits(float f) {
#if GPTQ_HIP
  return __half_as_ushort(__float2half_rn(f));
#else
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#endif
}

// Round to nearest even; NaN stays NaN (quiet).
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float f16_bits_to_f32(uint16_t h) {
#if GPTQ_HIP
  return __half2float(__ushort_as_half(h));
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}

}  // namespace gptq_exllama
