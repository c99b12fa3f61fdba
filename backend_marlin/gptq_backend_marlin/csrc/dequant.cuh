// Dequantization: the activation types' bit tricks, the tile layout's geometry, the per-word
// decoding of the main loop, and the kernel that turns a whole layer into a dense weight for
// cuBLAS (the large-M path and the dense cache).
//
// The exponent trick: (0x6400 | nibble) is the fp16 number 1024 + nibble, so one lop3 and one
// subtraction give an exact integer; one multiply applies the group's scale. bf16 uses 0x4300
// (128 + nibble). 8-bit bf16 goes through fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "marlin.h"
#include "ptx.cuh"

namespace gptq_marlin {

// The warp tile of layout.py for BITS-bit weights.
template <int BITS>
struct Layout {
  static constexpr int kWarpTileBytes = kTileK * kWarpN * BITS / 8;  // 1024 | 2048
  static constexpr int kChunks = kWarpTileBytes / 512;               // 2 | 4
  static constexpr int kStepsPerChunk = 4 / kChunks;                 // 2 | 1
};

// ---------------------------------------------------------------------------------------------
// Activation types.
template <typename T>
struct Act;

template <>
struct Act<half> {
  using T2 = half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both halves
  static __device__ __forceinline__ float to_float(half x) { return __half2float(x); }
  static __device__ __forceinline__ half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ T2 pack(float lo, float hi) { return __floats2half2_rn(lo, hi); }
  static __device__ __forceinline__ T2 splat(half x) { return __half2half2(x); }
  static constexpr float kMagicValue = 1024.0f;
};

template <>
struct Act<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in both halves
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ T2 pack(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
  static __device__ __forceinline__ T2 splat(__nv_bfloat16 x) { return __bfloat162bfloat162(x); }
  static constexpr float kMagicValue = 128.0f;
};

template <typename T2>
__device__ __forceinline__ uint32_t as_u32(T2 x) {
  return *reinterpret_cast<uint32_t*>(&x);
}
template <typename T2>
__device__ __forceinline__ T2 as_t2(uint32_t x) {
  return *reinterpret_cast<T2*>(&x);
}

// ---------------------------------------------------------------------------------------------
// Decoding.
// `off` is (magic + zero point), `sc` the scale, both splatted to a pair.
template <typename T>
struct Group {
  typename Act<T>::T2 sc;
  typename Act<T>::T2 off;
  typename Act<T>::T2 off16;  // -(magic / 16 + zero): fp16 4-bit high fields
  float scf;  // the scale and zero as floats (8-bit bf16 path only)
  float zf;
};

// One 4-bit word -> b0, b1 of fragment 0 (b[0], b[1]) and of fragment 1 (b[2], b[3]).
// Word fields (nibbles) i and i+4 become one pair; see layout.py.
template <typename T>
__device__ __forceinline__ void dequant4(uint32_t q, const Group<T>& g0, const Group<T>& g1,
                                         uint32_t (&b)[4]) {
  using T2 = typename Act<T>::T2;
  constexpr uint32_t kLo = 0x000f000fu;
  if constexpr (Act<T>::kMagic == 0x64006400u) {
    // fp16: (0x6400 | n) = 1024 + n and (0x6400 | n << 4) = 1024 + 16 n; the second is scaled
    // by 1/16 in an exact fma. Both give n - zero exactly.
    constexpr uint32_t kHi = 0x00f000f0u;
    const uint32_t q8 = q >> 8;
    const T2 v0 = as_t2<T2>(and_or(q, kLo, Act<T>::kMagic));
    const T2 v1 = as_t2<T2>(and_or(q, kHi, Act<T>::kMagic));
    const T2 v2 = as_t2<T2>(and_or(q8, kLo, Act<T>::kMagic));
    const T2 v3 = as_t2<T2>(and_or(q8, kHi, Act<T>::kMagic));
    const T2 sixteenth = __float2half2_rn(0.0625f);
    b[0] = as_u32(__hmul2(__hsub2(v0, g0.off), g0.sc));
    b[1] = as_u32(__hmul2(__hfma2(v1, sixteenth, g0.off16), g0.sc));
    b[2] = as_u32(__hmul2(__hsub2(v2, g1.off), g1.sc));
    b[3] = as_u32(__hmul2(__hfma2(v3, sixteenth, g1.off16), g1.sc));
  } else {
    // bf16 has 7 mantissa bits: 128 + n only, so every field is shifted down first.
    const T2 v0 = as_t2<T2>(and_or(q, kLo, Act<T>::kMagic));
    const T2 v1 = as_t2<T2>(and_or(q >> 4, kLo, Act<T>::kMagic));
    const T2 v2 = as_t2<T2>(and_or(q >> 8, kLo, Act<T>::kMagic));
    const T2 v3 = as_t2<T2>(and_or(q >> 12, kLo, Act<T>::kMagic));
    b[0] = as_u32(__hmul2(__hsub2(v0, g0.off), g0.sc));
    b[1] = as_u32(__hmul2(__hsub2(v1, g0.off), g0.sc));
    b[2] = as_u32(__hmul2(__hsub2(v2, g1.off), g1.sc));
    b[3] = as_u32(__hmul2(__hsub2(v3, g1.off), g1.sc));
  }
}

// One 8-bit word (bytes a0, a2, a1, a3) -> b0, b1 of one fragment.
template <typename T>
__device__ __forceinline__ void dequant8(uint32_t q, const Group<T>& g, uint32_t (&b)[2]) {
  using T2 = typename Act<T>::T2;
  if constexpr (sizeof(T) == 2 && Act<T>::kMagic == 0x64006400u) {
    const T2 v0 = as_t2<T2>(__byte_perm(q, 0x64646464u, 0x4240));
    const T2 v1 = as_t2<T2>(__byte_perm(q, 0x64646464u, 0x4341));
    b[0] = as_u32(__hmul2(__hsub2(v0, g.off), g.sc));
    b[1] = as_u32(__hmul2(__hsub2(v1, g.off), g.sc));
  } else {
    // bf16 has 7 mantissa bits, too few for 128 + byte: build exact floats 2^23 + byte.
    const float base = 8388608.0f + g.zf;
    const float f0 = __int_as_float(__byte_perm(q, 0x4B000000u, 0x7540)) - base;
    const float f1 = __int_as_float(__byte_perm(q, 0x4B000000u, 0x7541)) - base;
    const float f2 = __int_as_float(__byte_perm(q, 0x4B000000u, 0x7542)) - base;
    const float f3 = __int_as_float(__byte_perm(q, 0x4B000000u, 0x7543)) - base;
    b[0] = as_u32(Act<T>::pack(f0 * g.scf, f2 * g.scf));
    b[1] = as_u32(Act<T>::pack(f1 * g.scf, f3 * g.scf));
  }
}

// Scales and zero points of one group row for lane group `g`: 4 columns (subtiles 0..3).
template <typename T, int BITS, bool HAS_ZEROS>
__device__ __forceinline__ void load_groups(Group<T> (&out)[4], const uint8_t* scales_row,
                                            const uint8_t* zeros_row, int g) {
  using A = Act<T>;
  const uint2 sv = *reinterpret_cast<const uint2*>(scales_row + g * 8);
  const T* s = reinterpret_cast<const T*>(&sv);
  uint2 zv = make_uint2(0, 0);
  if constexpr (HAS_ZEROS) zv = *reinterpret_cast<const uint2*>(zeros_row + g * 8);
  const T* z = reinterpret_cast<const T*>(&zv);
  constexpr float kSymZero = float(1 << (BITS - 1));
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const float zf = HAS_ZEROS ? A::to_float(z[j]) : kSymZero;
    out[j].sc = A::splat(s[j]);
    // Exact: small integers.
    out[j].off = A::splat(A::from_float(A::kMagicValue + zf));
    out[j].off16 = A::splat(A::from_float(-(A::kMagicValue / 16.0f + zf)));
    out[j].scf = A::to_float(s[j]);
    out[j].zf = zf;
  }
}

// ---------------------------------------------------------------------------------------------
// Tiles -> dense [n, k] weight in the activation dtype (the large-M path feeds it to cuBLAS).
// One warp per warp tile, in storage order; the warp decodes its fragments into shared memory
// ([32 n][64 k], rows padded by 16 bytes: conflict-free) and writes whole 128-byte rows.
template <int BITS, typename T>
__global__ void __launch_bounds__(kThreads) dequant_kernel(const DequantArgs p) {
  using L = Layout<BITS>;
  using T2 = typename Act<T>::T2;
  constexpr int kRow = kTileK + 8;  // padded row of the staging tile, in elements
  __shared__ __align__(16) T stage[kWarps][kWarpN * kRow];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int k_tiles = p.k / kTileK;
  const int nb32 = p.n / kWarpN;
  const long long tile = static_cast<long long>(blockIdx.x) * kWarps + warp;
  if (tile >= static_cast<long long>(nb32) * k_tiles) return;
  const int nt = static_cast<int>(tile / (static_cast<long long>(k_tiles) * kWarps));
  const int nw = min(kWarps, nb32 - nt * kWarps);
  const int rem = static_cast<int>(tile - static_cast<long long>(nt) * k_tiles * kWarps);
  const int kt = rem / nw, wi = rem % nw;
  const int nb = nt * kWarps + wi;
  const int g = lane >> 2, t = lane & 3;
  const uint8_t* src = static_cast<const uint8_t*>(p.b) + tile * L::kWarpTileBytes;

  Group<T> grp[2][4];
  const int g0 = p.group_shift < 0 ? 0 : (kt * kTileK) >> p.group_shift;
  const int g1 = p.group_shift == 5 ? g0 + 1 : g0;
  const size_t col_bytes = static_cast<size_t>(nb) * kWarpN * 2;
  const uint8_t* sc = static_cast<const uint8_t*>(p.scales);
  const uint8_t* zp = static_cast<const uint8_t*>(p.zeros);
  const size_t row_bytes = static_cast<size_t>(p.n) * 2;
  if (zp != nullptr) {
    load_groups<T, BITS, true>(grp[0], sc + g0 * row_bytes + col_bytes, zp + g0 * row_bytes + col_bytes, g);
    load_groups<T, BITS, true>(grp[1], sc + g1 * row_bytes + col_bytes, zp + g1 * row_bytes + col_bytes, g);
  } else {
    load_groups<T, BITS, false>(grp[0], sc + g0 * row_bytes + col_bytes, nullptr, g);
    load_groups<T, BITS, false>(grp[1], sc + g1 * row_bytes + col_bytes, nullptr, g);
  }

  T* st = stage[warp];
#pragma unroll
  for (int c = 0; c < L::kChunks; c++) {
    const int4 q4 = *reinterpret_cast<const int4*>(src + c * 512 + lane * 16);
    const uint32_t words[4] = {static_cast<uint32_t>(q4.x), static_cast<uint32_t>(q4.y),
                               static_cast<uint32_t>(q4.z), static_cast<uint32_t>(q4.w)};
#pragma unroll
    for (int j = 0; j < 4; j++) {
      T* row = st + (8 * j + g) * kRow + 2 * t;
      if constexpr (BITS == 4) {
        uint32_t b[4];
        dequant4<T>(words[j], grp[c][j], grp[c][j], b);
        const int s0 = 2 * c;
        *reinterpret_cast<T2*>(row + 16 * s0) = as_t2<T2>(b[0]);
        *reinterpret_cast<T2*>(row + 16 * s0 + 8) = as_t2<T2>(b[1]);
        *reinterpret_cast<T2*>(row + 16 * (s0 + 1)) = as_t2<T2>(b[2]);
        *reinterpret_cast<T2*>(row + 16 * (s0 + 1) + 8) = as_t2<T2>(b[3]);
      } else {
        uint32_t b[2];
        dequant8<T>(words[j], grp[c >> 1][j], b);
        *reinterpret_cast<T2*>(row + 16 * c) = as_t2<T2>(b[0]);
        *reinterpret_cast<T2*>(row + 16 * c + 8) = as_t2<T2>(b[1]);
      }
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + static_cast<size_t>(nb) * kWarpN * p.k + kt * kTileK;
#pragma unroll
  for (int u = lane; u < kWarpN * 8; u += 32) {  // 8 units of 16 bytes per 64-element row
    const int n = u >> 3, part = u & 7;
    *reinterpret_cast<uint4*>(out + static_cast<size_t>(n) * p.k + part * 8) =
        *reinterpret_cast<const uint4*>(st + n * kRow + part * 8);
  }
}

}  // namespace gptq_marlin
