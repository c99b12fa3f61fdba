// Turning the shuffled words of layout.py into weights, two at a time.
//
// A 32-bit word holds 8 four-bit values: 4 k rows x 2 columns. Pair i (k row i of the word, the
// two columns as the low and high half) sits at the bits that a right rotation by kRot[i] moves
// to 6-9 (low) and 22-25 (high). One mask-and-or (LOP3) with a power of two P puts q under P's
// exponent: the half2 (P (1 + q_lo/16), P (1 + q_hi/16)).
//
// fp16 layers (docs/DESIGN.md §2: W = s * (q - z), and q == z must give exactly 0, so that an
// infinite activation times it is NaN as in the reference): layout.py stores per group and
// column S = 16 * scale and -X0 = -P (1 + zero/16), where P = 2^e is S's exponent (at least
// 2^-14, fp16's smallest normal, so that x is normal). The kernel derives P and M = S / P
// (exact: S's significand) once per group segment (unfold_f16), decodes d = x - X0 with one
// HADD2 (exact: both are multiples of P/16 in [P, 2P], so d = P (q - zero)/16 with no rounding,
// and d is +-0 exactly when q == zero), accumulates d * a, and scales the column's sum by M in
// fp32 when it folds it (FFMA in place of FADD): d * M = (q - zero) * scale with no rounding.
// The half2 sums are the weighted sums divided by M, which is in [1, 2) wherever S is a normal
// fp16, so their fp16 range is at least what it was when the decoded weight was the product.
//
// bf16 layers use the same words: a rotation 3 bits further puts the value at the top of
// bf16's 7-bit mantissa (0x3F80 | q << 3 is 1 + q/16), and the arithmetic runs in fp32:
// w = fmaf(x, S, Z) with S = 16 * scale and Z = -(16 + zero) * scale, both exact in fp32 for
// fp16 scales (16 significant bits at most), so x == X0 gives exactly 0 there too.
#pragma once
#include <cstdint>

#include "portable.cuh"

namespace gptq_exllama {

constexpr uint32_t kF16Mask = 0x03C003C0u;
constexpr uint32_t kF16Exponent = 0x7C007C00u;  // the exponent fields of a half2
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

// Halves (P_lo (1 + q_lo / 16), P_hi (1 + q_hi / 16)) of pair I, fp16; `pivot` holds the two
// powers of two P (exponent bits only, unfold_f16).
template <int I>
__device__ __forceinline__ uint32_t pair_f16(uint32_t w, uint32_t pivot) {
  constexpr int r[4] = {0, 4, 8, 28};  // layout.py FIELD_ROTATIONS
  return and_or(rotr<r[I]>(w), kF16Mask, pivot);
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

// fp16x2 add and multiply (AMD: v_pk_add_f16 / v_pk_mul_f16). The explicit .rn keeps ptxas
// from contracting them with a neighbouring multiply or add into an fma.
__device__ __forceinline__ uint32_t hadd2(uint32_t a, uint32_t b) {
#if GPTQ_HIP
  return hip::bits_of(__hadd2(hip::as_half2(a), hip::as_half2(b)));
#else
  uint32_t d;
  asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
#endif
}

__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
#if GPTQ_HIP
  return hip::bits_of(__hmul2(hip::as_half2(a), hip::as_half2(b)));
#else
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
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

// The power of two P of each half of a folded scale pair S: S's exponent bits, raised to 2^-14
// (0x0400) where S is subnormal or zero. Bit 15 of a half of (E + 0x7C00) is set exactly when
// its exponent field E is nonzero (E <= 0x7C00: no carry into the other half).
__device__ __forceinline__ uint32_t pivot_f16(uint32_t s2) {
  const uint32_t e = s2 & kF16Exponent;
  return e | (~((e + kF16Exponent) >> 5) & 0x04000400u);
}

// One group's constants for one column quad, as the fp16 kernels use them: the pivots of the
// two column pairs (the LOP3's or-operand), -X0 of each pair (the HADD2's), and the four
// column factors M = S / P in fp32 (the fold's FFMA). 0x7800 - bits(2^e) are the bits of
// 2^-e (e <= 14: layout.py keeps |S| < 2^15), so M = S * 2^-e is one exact HMUL2 per pair.
struct F16Group {
  uint32_t pivot[2], neg_x0[2];
  float m[4];
};

__device__ __forceinline__ F16Group unfold_f16(const uint4 sz) {  // S01, -X0 01, S23, -X0 23
  F16Group g;
  g.pivot[0] = pivot_f16(sz.x);
  g.pivot[1] = pivot_f16(sz.z);
  g.neg_x0[0] = sz.y;
  g.neg_x0[1] = sz.w;
  const uint32_t m01 = hmul2(sz.x, 0x78007800u - g.pivot[0]);
  const uint32_t m23 = hmul2(sz.z, 0x78007800u - g.pivot[1]);
  g.m[0] = f16_lo(m01);
  g.m[1] = f16_hi(m01);
  g.m[2] = f16_lo(m23);
  g.m[3] = f16_hi(m23);
  return g;
}

}  // namespace gptq_exllama
