// Dequantization in registers: one lane's A fragments of one step, from the words of its unit
// (layout.py), by the magic-number trick. Every constant is exact and checked at compile time;
// every intermediate is a small integer, so the result q - z is exact in fp16 and bf16 alike
// (the group scale is applied later, in fp32: gemv.cuh).
//
// A field of F bits at bit `pos` of both 16-bit halves, or-ed into the exponent pattern of
// M = 1024 (fp16) or 128 (bf16), reads as the pair M + q * 2^pos as long as the field lies in
// the mantissa (pos + F <= 10 fp16, 7 bf16); fma(that, 2^-pos, -M * 2^-pos - zc) is q - zc.
// Fields are read in windows of mantissa / F fields: one shift per window, one LOP3 and one
// HFMA2 per pair of weights. 8-bit fp16 uses PRMT to place bytes under 0x64; 8-bit bf16 (whose
// 7-bit mantissa cannot hold a byte) goes through fp32 (2^23 + q), two FADDs and a pack.
#pragma once

#include "common.cuh"

namespace gptq_cuda {

constexpr double pow2(int e) { return e >= 0 ? static_cast<double>(1u << e) : 1.0 / static_cast<double>(1u << -e); }

// (a & MASK) | BITS in one LOP3 (left to the compiler it becomes two: LOP3 takes one immediate).
template <uint32_t MASK, uint32_t BITS>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "n"(MASK), "n"(BITS));
  return d;
}

// Fields of F bits per shift window, and the shift and position of field I.
template <int DT, int F>
struct Window {
  static constexpr int kPer = Act<DT>::kMantissa / F;
  static constexpr int shift(int i) { return (i / kPer) * kPer * F; }
  static constexpr int pos(int i) { return (i % kPer) * F; }
};

// The pair M + q * 2^pos of field I (F bits) of both halves of w.
template <int DT, int F, int I>
__device__ __forceinline__ uint32_t magic_field(uint32_t w) {
  constexpr int s = Window<DT, F>::shift(I);
  constexpr int p = Window<DT, F>::pos(I);
  constexpr uint32_t mask = ((1u << F) - 1u) << p;
  constexpr uint32_t magic = Act<DT>::pair(Act<DT>::kMagic);
  return and_or<mask * 0x10001u, magic>(w >> s);
}

// q - zc of field I of a 2- or 4-bit word.
template <int DT, int F, int I, int ZC>
__device__ __forceinline__ uint32_t low_value(uint32_t w) {
  constexpr int p = Window<DT, F>::pos(I);
  constexpr double M = Act<DT>::kMagic;
  constexpr double c = -M * pow2(-p) - ZC;
  static_assert(is_exact(c, Act<DT>::kMantissa), "inexact dequantization constant");
  return fma2<DT>(magic_field<DT, F, I>(w), Act<DT>::pair(pow2(-p)), Act<DT>::pair(c));
}

// q - zc of a 3-bit value: low two bits field I of wl (2-bit plane), third bit field J of wh.
template <int DT, int I, int J, int ZC>
__device__ __forceinline__ uint32_t three_bit_value(uint32_t wl, uint32_t wh) {
  constexpr int pl = Window<DT, 2>::pos(I);
  constexpr int ph = Window<DT, 1>::pos(J);
  constexpr double M = Act<DT>::kMagic;
  // t1 = 4 * hi - M * 2^-pl - zc; then t = (M + lo * 2^pl) * 2^-pl + t1 = lo + 4 * hi - zc.
  constexpr double c = -M * pow2(2 - ph) - M * pow2(-pl) - ZC;
  static_assert(is_exact(c, Act<DT>::kMantissa), "inexact dequantization constant");
  static_assert(is_exact(pow2(2 - ph), Act<DT>::kMantissa), "inexact dequantization constant");
  const uint32_t t1 = fma2<DT>(magic_field<DT, 1, J>(wh), Act<DT>::pair(pow2(2 - ph)), Act<DT>::pair(c));
  return fma2<DT>(magic_field<DT, 2, I>(wl), Act<DT>::pair(pow2(-pl)), t1);
}

// q - zc of byte pair I (bytes I and 2 + I: the low and high half's field I) of an 8-bit word.
template <int DT, int I, int ZC>
__device__ __forceinline__ uint32_t byte_value(uint32_t w) {
  if constexpr (DT == kF16) {
    // 0x64 above each byte: 1024 + q in each half.
    const uint32_t m = __byte_perm(w, 0x64646464u, 0x4040u + 0x0101u * I + 0x0200u);
    return fma2<DT>(m, Act<DT>::pair(1.0), Act<DT>::pair(-1024.0 - ZC));
  } else {
    // 0x4B0000qq is the float 2^23 + q.
    const float lo = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540u + I)) - (8388608.0f + ZC);
    const float hi = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7542u + I)) - (8388608.0f + ZC);
    uint32_t d = 0;
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#endif
    return d;
  }
}

// The four A registers of step S (0 .. unit_steps - 1) of a unit: register r holds the pair
// p = 4 * S + r, in word p / P at field p % P (P fields per half). `z2` holds the lane's two
// columns' zero points as pairs (asymmetric layers; symmetric ones fold 2^(bits-1) into the
// constants instead).
template <int BITS, int DT, bool ZEROS, int S>
__device__ __forceinline__ void dequant_step(const uint32_t (&wl)[4], const uint32_t (&wh)[2],
                                             const uint32_t (&z2)[2], uint32_t (&a)[4]) {
  constexpr int ZC = ZEROS ? 0 : (1 << (BITS - 1));
  static_for<4>([&](auto rc) {
    constexpr int r = decltype(rc)::value;
    constexpr int p = 4 * S + r;
    uint32_t v;
    if constexpr (BITS == 8) {
      v = byte_value<DT, p % 2, ZC>(wl[p / 2]);
    } else if constexpr (BITS == 3) {
      v = three_bit_value<DT, p % 8, p % 16, ZC>(wl[p / 8], wh[p / 16]);
    } else {
      constexpr int P = 16 / BITS;
      v = low_value<DT, BITS, p % P, ZC>(wl[p / P]);
    }
    if constexpr (ZEROS) v = sub2<DT>(v, z2[r & 1]);
    a[r] = v;
  });
}

}  // namespace gptq_cuda
