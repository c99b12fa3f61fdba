// The Marlin-class int4/int8 x fp16/bf16 GEMM: y[m, n] = sum_k a[m, k] * W[k, n] (+ bias[n]).
//
// * Weights arrive in the tile layout of layout.py: each lane's 16-byte shared-memory load is
//   its mma.sync B fragments for one chunk, no shuffles.
// * One block (8 warps) owns a 256-column tile; warp w owns its 32 columns over all k, so no
//   reduction inside the block. Each pipeline stage holds 64 k rows of weights, activations
//   (swizzled for conflict-free ldmatrix), scales and zero points, moved by cp.async, the
//   weights with an L2 evict-first policy. Stages<>::value stages are in flight.
// * Dequantization in registers by the exponent trick: (0x6400 | nibble) is the fp16 number
//   1024 + nibble, so one lop3 and one subtraction give an exact integer; one multiply applies
//   the group's scale. bf16 uses 0x4300 (128 + nibble). 8-bit bf16 goes through fp32.
// * mma.sync m16n8k16 with fp32 accumulators.
// * Striped (stream-K) partition: the n_tiles * k_tiles iterations of a slice are cut into
//   `workers` equal contiguous ranges, one per block, so every multiprocessor streams the
//   same number of bytes whatever the shape. A block tile that several blocks share is
//   reduced through fp32 slots: the last block to finish it (a counter) sums the slots in
//   worker order (deterministic), adds the bias and writes the output, then clears the counter.
// * Rows beyond 64 run as more slices; block b serves slice b % slices, so the blocks that
//   read the same weights run together and share them through L2.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "marlin.h"

namespace gptq_marlin {

template <int BITS>
struct Layout {
  static constexpr int kWarpTileBytes = kTileK * kWarpN * BITS / 8;  // 1024 | 2048
  static constexpr int kChunks = kWarpTileBytes / 512;               // 2 | 4
  static constexpr int kStepsPerChunk = 4 / kChunks;                 // 2 | 1
};

// Pipeline depth: more stages where few rows leave shared memory to spare (small M is
// bandwidth-bound and wants bytes in flight); two blocks per SM must still fit. KT = 64-row k
// tiles per stage (2: the wide kernels, 4-bit): at 1-2 row blocks the same bytes in flight in
// half as many stages.
template <int BITS, int M_BLOCKS, int KT = 1>
struct Stages {
  static constexpr int value = KT == 1 ? (BITS == 4 ? (M_BLOCKS == 1 ? 8 : M_BLOCKS == 2 ? 6 : 5)
                                                    : (M_BLOCKS == 1 ? 5 : 4))
                               // wide (4-bit): 3-4 row blocks run one block per SM
                               // (registers), so 5 stages of 32-36 KB still fit
                               : KT == 2 ? (M_BLOCKS == 1 ? 4 : M_BLOCKS == 2 ? 3 : 5)
                                         // KT = 4 (1-2 row blocks): double buffering
                                         : 2;
  static_assert(value >= 2, "the pipeline needs two stages");
};

// PAD_A (the TMA variant): activation rows arrive by one bulk copy each, so they cannot be
// XOR-swizzled; a 16-byte pad per row (144-byte stride) keeps ldmatrix conflict-free instead.
// A stage of KT k tiles is KT sub-stages of this layout, one after the other.
template <int BITS, int M_BLOCKS, bool PAD_A = false, int KT = 1>
struct Smem {
  static constexpr int kB = kWarps * Layout<BITS>::kWarpTileBytes;
  static constexpr int kARow = kTileK * 2 + (PAD_A ? 16 : 0);  // bytes per activation row
  static constexpr int kA = M_BLOCKS * 16 * kARow;
  static constexpr int kS = 2 * kTileN * 2;  // two group rows (group size 32) of one tile
  static constexpr int kSub = kB + kA + 2 * kS;  // one 64-row k tile: scales, then zero points
  static constexpr int kStage = KT * kSub;
  static constexpr int kTotal = kStage * Stages<BITS, M_BLOCKS, KT>::value;
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
// PTX wrappers.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}

__device__ __forceinline__ void cp_async16_zfill(void* dst, const void* src, bool valid) {
  const int size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(size));
}

__device__ __forceinline__ void cp_async16_policy(void* dst, const void* src, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(
                   smem_addr(dst)),
               "l"(src), "l"(policy));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Hopper bulk copies (the TMA engine without a tensor map) completing on an mbarrier. The host
// launches the kernels that use them only on devices of compute capability >= 9.0; older
// targets compile them to a trap.
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
  __trap();
#endif
}

// The calling thread's arrival, announcing the bytes this phase's copies will deliver.
__device__ __forceinline__ void mbar_expect(uint64_t* bar, uint32_t bytes) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes) : "memory");
#else
  __trap();
#endif
}

// Spin until the phase of the given parity has completed (all its bytes have landed).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#if __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred ready;\n"
      "MARLIN_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 ready, [%0], %1;\n"
      "@!ready bra MARLIN_WAIT;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#if __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void bulk_copy_policy(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                                 uint64_t policy) {
#if __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, "
      "[%3], %4;\n" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ uint64_t l2_policy(bool evict_first) {
  uint64_t policy;
  if (evict_first) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  } else {
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(policy));
  }
  return policy;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma<half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// ---------------------------------------------------------------------------------------------
// Dequantization. `off` is (magic + zero point), `sc` the scale, both splatted to a pair.
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
// One pipeline stage of one warp: 64 k rows x 32 columns into acc.
// PAD_A: the TMA variant's activation rows (padded, not swizzled; see Smem).
// SWAP (4-bit, one row block, at most 8 rows): the weights are the mma's A operand and the
// activations its B operand, so one m16n8k16 covers 16 output columns x 8 rows instead of 8
// columns x 16 rows: half the mmas. The dequantized registers of subtiles 2i and 2i+1 are
// already the A fragment of output columns 16i..16i+15 (b0 of 2i, b0 of 2i+1, b1 of 2i, b1 of
// 2i+1), so the layout does not change. acc[0][i] (i = 0, 1) then holds, for lane (g, t),
// columns 16i + g and 16i + 8 + g of rows 2t and 2t + 1 (see store_tile_swap).
template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS, bool PAD_A = false, bool SWAP = false>
__device__ __forceinline__ void compute_stage(float (&acc)[M_BLOCKS][4][4], const uint8_t* stage,
                                              int warp, int lane, bool two_group_rows) {
  static_assert(!SWAP || (BITS == 4 && M_BLOCKS == 1), "the swapped mma: 4-bit, one row block");
  using L = Layout<BITS>;
  using S = Smem<BITS, M_BLOCKS, PAD_A>;
  const uint8_t* sb = stage + warp * L::kWarpTileBytes;
  const uint8_t* sa = stage + S::kB;
  const uint8_t* ss = sa + S::kA;
  const int g = lane >> 2;

  // Group rows: row 0 covers k 0..31 (steps 0, 1), row 1 k 32..63 (steps 2, 3); with one
  // group row per stage, both read row 0.
  Group<T> grp[2][4];
  const int col = warp * 64;  // byte offset of this warp's 32 columns in a row of scales
  load_groups<T, BITS, HAS_ZEROS>(grp[0], ss + col, ss + S::kS + col, g);
  const int row1 = two_group_rows ? 512 : 0;
  load_groups<T, BITS, HAS_ZEROS>(grp[1], ss + row1 + col, ss + S::kS + row1 + col, g);

  if constexpr (SWAP) {
#pragma unroll
    for (int c = 0; c < L::kChunks; c++) {
      const int4 q4 = *reinterpret_cast<const int4*>(sb + c * 512 + lane * 16);
      // Rows 0..7 of the chunk's 32 k (4 units of 8): register q = unit 4c + q, so steps 2c and
      // 2c + 1 take (x[0], x[1]) and (x[2], x[3]) as their B fragments.
      uint32_t x[4];
      {
        const int row = lane & 7, unit = 4 * c + (lane >> 3);
        if constexpr (PAD_A)
          ldmatrix_x4(x, sa + row * S::kARow + (unit << 4));
        else
          ldmatrix_x4(x, sa + row * 128 + ((unit ^ (row & 7)) << 4));
      }
      const uint32_t words[4] = {static_cast<uint32_t>(q4.x), static_cast<uint32_t>(q4.y),
                                 static_cast<uint32_t>(q4.z), static_cast<uint32_t>(q4.w)};
      uint32_t b[4][4];
#pragma unroll
      for (int j = 0; j < 4; j++) dequant4<T>(words[j], grp[c][j], grp[c][j], b[j]);
#pragma unroll
      for (int i = 0; i < 2; i++) {
        const uint32_t w0[4] = {b[2 * i][0], b[2 * i + 1][0], b[2 * i][1], b[2 * i + 1][1]};
        const uint32_t w1[4] = {b[2 * i][2], b[2 * i + 1][2], b[2 * i][3], b[2 * i + 1][3]};
        mma<T>(acc[0][i], w0, x[0], x[1]);
        mma<T>(acc[0][i], w1, x[2], x[3]);
      }
    }
  } else {
#pragma unroll
    for (int c = 0; c < L::kChunks; c++) {
      const int4 q4 = *reinterpret_cast<const int4*>(sb + c * 512 + lane * 16);
      uint32_t a[L::kStepsPerChunk][M_BLOCKS][4];
#pragma unroll
      for (int h = 0; h < L::kStepsPerChunk; h++) {
        const int step = c * L::kStepsPerChunk + h;
#pragma unroll
        for (int mb = 0; mb < M_BLOCKS; mb++) {
          const int row = mb * 16 + (lane & 15);
          const int unit = 2 * step + (lane >> 4);  // 16-byte unit of the 128-byte row
          if constexpr (PAD_A)
            ldmatrix_x4(a[h][mb], sa + row * S::kARow + (unit << 4));
          else
            ldmatrix_x4(a[h][mb], sa + row * 128 + ((unit ^ (row & 7)) << 4));
        }
      }
      const uint32_t words[4] = {static_cast<uint32_t>(q4.x), static_cast<uint32_t>(q4.y),
                                 static_cast<uint32_t>(q4.z), static_cast<uint32_t>(q4.w)};
#pragma unroll
      for (int j = 0; j < 4; j++) {
        if constexpr (BITS == 4) {
          uint32_t b[4];
          // Both steps of a 4-bit chunk lie in the same 32-row half of the stage.
          dequant4<T>(words[j], grp[c][j], grp[c][j], b);
#pragma unroll
          for (int mb = 0; mb < M_BLOCKS; mb++) {
            mma<T>(acc[mb][j], a[0][mb], b[0], b[1]);
            mma<T>(acc[mb][j], a[1][mb], b[2], b[3]);
          }
        } else {
          uint32_t b[2];
          dequant8<T>(words[j], grp[c >> 1][j], b);
#pragma unroll
          for (int mb = 0; mb < M_BLOCKS; mb++) mma<T>(acc[mb][j], a[0][mb], b[0], b[1]);
        }
      }
    }
  }
}

// acc (+ bias) -> output rows row0.. of columns of this warp, for rows < m.
template <typename T, int M_BLOCKS>
__device__ __forceinline__ void store_tile(const float (&acc)[M_BLOCKS][4][4], const GemmArgs& p,
                                           int row0, int col0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  T* out = static_cast<T*>(p.c);
  const half* bias = static_cast<const half*>(p.bias);
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const int col = col0 + j * 8 + 2 * t;
    float b0 = 0.f, b1 = 0.f;
    if (bias != nullptr) {
      b0 = __half2float(bias[col]);
      b1 = __half2float(bias[col + 1]);
    }
#pragma unroll
    for (int mb = 0; mb < M_BLOCKS; mb++) {
      const int r = row0 + mb * 16 + g;
      if (r < p.m) {
        *reinterpret_cast<typename Act<T>::T2*>(out + static_cast<size_t>(r) * p.n + col) =
            Act<T>::pack(acc[mb][j][0] + b0, acc[mb][j][1] + b1);
      }
      if (r + 8 < p.m) {
        *reinterpret_cast<typename Act<T>::T2*>(out + static_cast<size_t>(r + 8) * p.n + col) =
            Act<T>::pack(acc[mb][j][2] + b0, acc[mb][j][3] + b1);
      }
    }
  }
}

// The swapped accumulators (compute_stage's SWAP) (+ bias) -> output rows row0 + 2t, + 1 of
// columns col0 + 16i + g (+ 8), for rows < m.
template <typename T>
__device__ __forceinline__ void store_tile_swap(const float (&acc)[1][4][4], const GemmArgs& p,
                                                int row0, int col0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  T* out = static_cast<T*>(p.c);
  const half* bias = static_cast<const half*>(p.bias);
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int col = col0 + 16 * i + 8 * h + g;
      const float b = bias != nullptr ? __half2float(bias[col]) : 0.f;
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int r = row0 + 2 * t + e;
        if (r < p.m) out[static_cast<size_t>(r) * p.n + col] = Act<T>::from_float(acc[0][i][2 * h + e] + b);
      }
    }
}

template <int M_BLOCKS>
__device__ __forceinline__ void zero_acc(float (&acc)[M_BLOCKS][4][4]) {
#pragma unroll
  for (int mb = 0; mb < M_BLOCKS; mb++)
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[mb][j][e] = 0.f;
}

// The stream-K finalizer of one block tile: the sum, in worker order, of the fp32 slots
// `first` (the first contributor) and others + w * stride for w in (w_lo, w_hi], row-major
// [rows][kTileN]; `limit` = rows * kTileN. Thread tid owns the float4 at e = (u * kThreads +
// tid) * 4 for u < E (predicated: e < limit and its column < n_cols, given as col_ok); CB
// contributors are loaded per batch, so E * CB independent 16-byte L2 loads are in flight and
// a tile costs 1 + ceil((C - 1) / CB) round trips.
template <typename T, int E, int CB>
__device__ __forceinline__ void finalize_tile(const float* first, const float* others,
                                              size_t stride, int w_lo, int w_hi, int limit,
                                              int tid, bool col_ok, float4 b4, T* dst, int n) {
  float4 sum[E];
#pragma unroll
  for (int u = 0; u < E; u++) {
    const int e = (u * kThreads + tid) * 4;
    sum[u] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (col_ok && e < limit) sum[u] = __ldcg(reinterpret_cast<const float4*>(first + e));
  }
  for (int w = w_lo + 1; w <= w_hi; w += CB) {
    float4 v[CB][E];
#pragma unroll
    for (int b = 0; b < CB; b++)
#pragma unroll
      for (int u = 0; u < E; u++) {
        const int e = (u * kThreads + tid) * 4;
        v[b][u] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (col_ok && e < limit && w + b <= w_hi)
          v[b][u] = __ldcg(reinterpret_cast<const float4*>(others + static_cast<size_t>(w + b) * stride + e));
      }
#pragma unroll
    for (int b = 0; b < CB; b++)
#pragma unroll
      for (int u = 0; u < E; u++) {
        if (w + b <= w_hi) {
          sum[u].x += v[b][u].x;
          sum[u].y += v[b][u].y;
          sum[u].z += v[b][u].z;
          sum[u].w += v[b][u].w;
        }
      }
  }
#pragma unroll
  for (int u = 0; u < E; u++) {
    const int e = (u * kThreads + tid) * 4;
    if (!col_ok || e >= limit) continue;
    const float4 s4 = make_float4(sum[u].x + b4.x, sum[u].y + b4.y, sum[u].z + b4.z, sum[u].w + b4.w);
    uint2 packed;
    packed.x = as_u32(Act<T>::pack(s4.x, s4.y));
    packed.y = as_u32(Act<T>::pack(s4.z, s4.w));
    *reinterpret_cast<uint2*>(dst + static_cast<size_t>(e / kTileN) * n) = packed;
  }
}

// A block tile that several workers shared: the last of them to arrive (its counter) sums the
// fp32 slots of all, in worker order (deterministic), adds the bias, writes the output and
// clears the counter. The contributors are the workers whose ranges meet iterations [lo, hi] of
// the tile (worker w starts at floor(w * total / workers)); all but the first start inside the
// tile (slot 0), the first used slot 1 if it started in an earlier tile. The block calls this
// after its main loop: the only tile it can be last for before then is its first one, whose
// other contributors end their ranges there, so this rarely waits on anything.
template <typename T, int M_BLOCKS>
__device__ __forceinline__ void finalize_shared_tile(const GemmArgs& p, int nt, int slice, int k_tiles,
                                                     int n_tiles, int tid) {
  __threadfence();
  const long long total = static_cast<long long>(n_tiles) * k_tiles;
  const int row0 = slice * M_BLOCKS * 16;
  const int rows = min(M_BLOCKS * 16, p.m - row0);
  const int nb32 = p.n / kWarpN;
  const long long lo = static_cast<long long>(nt) * k_tiles, hi = lo + k_tiles - 1;
  const int w_lo = static_cast<int>(((lo + 1) * p.workers + total - 1) / total - 1);
  const int w_hi = static_cast<int>(((hi + 1) * p.workers + total - 1) / total - 1);
  const long long start_lo = static_cast<long long>(w_lo) * total / p.workers;
  const float* first = p.slots + (static_cast<size_t>(slice * p.workers + w_lo) * 2 +
                                  (start_lo < lo ? 1 : 0)) *
                                     kSlotFloats;
  const float* others = p.slots + static_cast<size_t>(slice * p.workers) * 2 * kSlotFloats;
  constexpr size_t kStride = 2 * static_cast<size_t>(kSlotFloats);  // worker to worker
  const int n_cols = min(kWarps, nb32 - nt * kWarps) * kWarpN;
  const half* bias = static_cast<const half*>(p.bias);
  // The shape of finalize_tile (float4 per thread x contributors per batch) is chosen by the
  // rows present, 16 loads in flight whatever M is.
  const int limit = rows * kTileN;
  const int c4 = (tid * 4) % kTileN;  // the same column for every slot of this thread
  const bool col_ok = c4 < n_cols;
  const int col = nt * kTileN + c4;
  float4 b4 = make_float4(0.f, 0.f, 0.f, 0.f);  // the bias is one per column: load once
  if (bias != nullptr && col_ok) {
    b4.x = __half2float(bias[col]);
    b4.y = __half2float(bias[col + 1]);
    b4.z = __half2float(bias[col + 2]);
    b4.w = __half2float(bias[col + 3]);
  }
  T* dst = static_cast<T*>(p.c) + static_cast<size_t>(row0) * p.n + col;
  const int need = (limit + kThreads * 4 - 1) / (kThreads * 4);  // float4 per thread
  if (need <= 1)
    finalize_tile<T, 1, 16>(first, others, kStride, w_lo, w_hi, limit, tid, col_ok, b4, dst, p.n);
  else if (need <= 2)
    finalize_tile<T, 2, 8>(first, others, kStride, w_lo, w_hi, limit, tid, col_ok, b4, dst, p.n);
  else if (M_BLOCKS == 1 || need <= 4)
    finalize_tile<T, 4, 4>(first, others, kStride, w_lo, w_hi, limit, tid, col_ok, b4, dst, p.n);
  else if constexpr (M_BLOCKS >= 2) {
    if (M_BLOCKS == 2)  // 8 in flight: 16 would spill under the 128-register cap
      finalize_tile<T, 8, 1>(first, others, kStride, w_lo, w_hi, limit, tid, col_ok, b4, dst, p.n);
    else if (need <= 8)
      finalize_tile<T, 8, 2>(first, others, kStride, w_lo, w_hi, limit, tid, col_ok, b4, dst, p.n);
    else
      finalize_tile<T, 16, 1>(first, others, kStride, w_lo, w_hi, limit, tid, col_ok, b4, dst, p.n);
  }
  if (tid == 0) p.counters[slice * n_tiles + nt] = 0;
}

// ---------------------------------------------------------------------------------------------
// The main kernel's body; TMA = the
// Hopper variant (gemm_kernel_tma): warp 0 moves each stage with bulk copies that complete on
// the stage's mbarrier (one for the weights, one per scale / zero-point row, one per valid
// activation row) instead of every thread issuing 16-byte cp.async copies with their address
// arithmetic (a third of the default's instructions per stage at small M).
// KT = 2 (the wide kernels, gemm_kernel_wide, 4-bit): each stage holds two consecutive 64-row k
// tiles, so the wait, the block barrier, the copy bookkeeping and the loop control are paid
// once per 128 rows, and a warp has two tiles of independent loads and mmas between barriers
// (the kernel is latency-bound at small M: ncu, session 3). Iterations, tiles, counters and the
// stream-K split all count stages, so K must be a multiple of 128.
// SWAP: the swapped mma at up to 8 rows (compute_stage), on the wide pipelines.
template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS, bool TMA = false, int KT = 1,
          bool SWAP = false>
__device__ __forceinline__ void gemm_body(const GemmArgs& p) {
  static_assert(KT == 1 || !TMA, "wide stages run on the cp.async pipeline only");
  using L = Layout<BITS>;
  using S = Smem<BITS, M_BLOCKS, TMA, KT>;
  constexpr int kStages = Stages<BITS, M_BLOCKS, KT>::value;
  constexpr int kBRounds = S::kB / 16 / kThreads;                   // 16-byte weight copies
  constexpr int kAUnits = M_BLOCKS * 16 * 8;                        // 16-byte activation units
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int s_last;
  __shared__ __align__(8) uint64_t bars[TMA ? kStages : 1];  // TMA: one mbarrier per stage

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int slice = blockIdx.x % p.slices;
  const int worker = blockIdx.x / p.slices;
  const int k_tiles = p.k / (kTileK * KT);  // stages per column of tiles
  const int nb32 = p.n / kWarpN;
  const int n_tiles = (nb32 + kWarps - 1) / kWarps;
  const long long total = static_cast<long long>(n_tiles) * k_tiles;
  const long long it0 = worker * total / p.workers;
  const long long it1 = (worker + 1) * total / p.workers;
  const int n_iters = static_cast<int>(it1 - it0);
  const int row0 = slice * M_BLOCKS * 16;  // slices > 1 only at the largest M_BLOCKS
  const bool two_group_rows = p.group_shift == 5;
  const uint64_t policy = l2_policy(p.evict_first != 0);
  const uint8_t* b_base = static_cast<const uint8_t*>(p.b);

  // Per-thread copy assignments, fixed for the whole kernel.
  const int a_row = tid >> 3, a_unit = tid & 7;  // activation unit (rounds of 256 threads)
  const int s_row = tid >> 5, s_unit = tid & 31;  // scale unit (threads 0..63)

  // The fetch cursor: next iteration (f_nt, f_kt) into stage f_stage. Pointers step by a
  // constant within a column and are recomputed only when the column changes.
  int f_nt = static_cast<int>(it0 / k_tiles), f_kt = static_cast<int>(it0 % k_tiles);
  int f_stage = 0;
  int f_nw = 0, f_b_units = 0;
  size_t f_b_step = 0;
  const uint8_t* f_b = nullptr;
  auto f_column = [&]() {
    f_nw = min(kWarps, nb32 - f_nt * kWarps);
    f_b_units = f_nw * (L::kWarpTileBytes / 16);
    f_b_step = static_cast<size_t>(f_nw) * L::kWarpTileBytes;
    f_b = b_base + static_cast<size_t>(f_nt) * k_tiles * KT * kWarps * L::kWarpTileBytes +
          f_kt * KT * f_b_step + (TMA ? 0 : tid * 16);  // TMA: the tile's first byte
  };
  f_column();

  // TMA: every stage is n_copies bulk copies: the weights, the scale (and zero-point) rows, and
  // one per valid activation row of this slice. Copy j is issued by lane 0 of warp j % 8, which
  // first adds the copy's bytes to the stage's mbarrier and arrives (so each byte count is
  // announced before its copy can land); the phase completes after n_copies arrivals and all
  // bytes. Activation rows past the valid ones are never copied: zeroed once here, per stage.
  const int a_rows = min(M_BLOCKS * 16, p.m - row0);
  const int s_copies = (two_group_rows ? 2 : 1) * (HAS_ZEROS ? 2 : 1);
  const int n_copies = 1 + s_copies + a_rows;
  if constexpr (TMA) {
    if (tid == 0)
#pragma unroll
      for (int s = 0; s < kStages; s++) mbar_init(&bars[s], n_copies);
    const int per_stage = (M_BLOCKS * 16 - a_rows) * (S::kARow / 16);
    for (int u = tid; u < kStages * per_stage; u += kThreads) {
      const int s = u / per_stage, r = u - s * per_stage;
      *reinterpret_cast<uint4*>(smem + s * S::kStage + S::kB + a_rows * S::kARow + r * 16) =
          make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
  }
  // Step the fetch cursor to the next stage.
  auto advance = [&]() {
    if (++f_stage == kStages) f_stage = 0;
    if (++f_kt == k_tiles) {
      f_kt = 0;
      f_nt++;
      f_column();
    } else {
      f_b += KT * f_b_step;
    }
  };
  auto fetch_tma = [&]() {
    uint8_t* st = smem + f_stage * S::kStage;
    uint64_t* bar = &bars[f_stage];
#pragma unroll 1
    for (int j = warp; j < n_copies; j += kWarps) {
      if (lane != 0) continue;
      if (j == 0) {
        const uint32_t bytes = static_cast<uint32_t>(f_b_units) * 16;
        mbar_expect(bar, bytes);
        bulk_copy_policy(st, f_b, bytes, bar, policy);
      } else if (j <= s_copies) {
        // Scale rows first (j = 1, 2 with group size 32), then the zero-point rows.
        const int r = HAS_ZEROS ? (j - 1) % (s_copies / 2) : j - 1;
        const bool zero_row = HAS_ZEROS && j > s_copies / 2;
        const int g = (p.group_shift < 0 ? 0 : (f_kt * kTileK) >> p.group_shift) + r;
        const size_t off = (static_cast<size_t>(g) * p.n + static_cast<size_t>(f_nt) * kTileN) * 2;
        const uint32_t bytes = static_cast<uint32_t>(f_nw) * kWarpN * 2;
        mbar_expect(bar, bytes);
        bulk_copy(st + S::kB + S::kA + (zero_row ? S::kS : 0) + r * 512,
                  static_cast<const uint8_t*>(zero_row ? p.zeros : p.scales) + off, bytes, bar);
      } else {
        const int r = j - 1 - s_copies;
        mbar_expect(bar, kTileK * 2);
        bulk_copy(st + S::kB + r * S::kARow,
                  static_cast<const T*>(p.a) + static_cast<size_t>(row0 + r) * p.k + f_kt * kTileK,
                  kTileK * 2, bar);
      }
    }
    advance();
  };
  auto fetch_cp = [&]() {
#pragma unroll
    for (int h = 0; h < KT; h++) {
      uint8_t* st = smem + f_stage * S::kStage + h * S::kSub;
      const uint8_t* fb = f_b + h * f_b_step;
      const int kt64 = f_kt * KT + h;  // the 64-row k tile of this sub-stage
#pragma unroll
      for (int r = 0; r < kBRounds; r++) {
        if (r * kThreads + tid < f_b_units) {
          // ptxas 13.0 gave some variants an odd uniform register pair for the cache-policy
          // descriptor of LDGSTS (illegal instruction on sm_90): 8-bit copies and those of the
          // wide kernels above one row block go without the hint (test_marlin_compile checks
          // every build for odd descriptors).
          if constexpr (BITS == 4 && !(KT >= 2 && M_BLOCKS >= 2))
            cp_async16_policy(st + (r * kThreads + tid) * 16, fb + r * kThreads * 16, policy);
          else
            cp_async16(st + (r * kThreads + tid) * 16, fb + r * kThreads * 16);
        }
      }
      uint8_t* sa = st + S::kB;
#pragma unroll
      for (int r = 0; r < (kAUnits + kThreads - 1) / kThreads; r++) {
        const int row = a_row + r * (kThreads / 8);
        if (kAUnits % kThreads == 0 || row < M_BLOCKS * 16) {
          const int grow = row0 + row;
          const bool ok = grow < p.m;
          const T* src = static_cast<const T*>(p.a) + static_cast<size_t>(ok ? grow : 0) * p.k +
                         kt64 * kTileK + a_unit * 8;
          cp_async16_zfill(sa + row * 128 + ((a_unit ^ (row & 7)) << 4), src, ok);
        }
      }
      if (tid < 64 && (s_row == 0 || two_group_rows) && s_unit < f_nw * 4) {
        const int g = (p.group_shift < 0 ? 0 : (kt64 * kTileK) >> p.group_shift) + s_row;
        const size_t off =
            (static_cast<size_t>(g) * p.n + static_cast<size_t>(f_nt) * kTileN) * 2 + s_unit * 16;
        uint8_t* ss = sa + S::kA + s_row * 512 + s_unit * 16;
        cp_async16(ss, static_cast<const uint8_t*>(p.scales) + off);
        if constexpr (HAS_ZEROS) cp_async16(ss + S::kS, static_cast<const uint8_t*>(p.zeros) + off);
      }
    }
    advance();
  };

  float acc[M_BLOCKS][4][4];
  zero_acc(acc);
  auto fetch = [&]() {
    if constexpr (TMA)
      fetch_tma();
    else
      fetch_cp();
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; s++) {
    if (s < n_iters) fetch();
    if constexpr (!TMA) cp_async_commit();
  }

  int nt = static_cast<int>(it0 / k_tiles), kt = static_cast<int>(it0 % k_tiles), stage = 0;
  uint32_t phase = 0;  // TMA: parity of the current pass over the stages
  int seg_first = 0;  // iteration at which the current block tile began
  int to_finalize = 0;  // shared tiles this block arrived at last: 1 its first tile, 2 its last
  for (int i = 0; i < n_iters; i++) {
    if constexpr (TMA)
      mbar_wait(&bars[stage], phase);
    else
      cp_async_wait<kStages - 2>();
    __syncthreads();
    if (i + kStages - 1 < n_iters) fetch();
    if constexpr (!TMA) cp_async_commit();

    const bool warp_ok = nt * kWarps + warp < nb32;
    if (warp_ok) {
#pragma unroll
      for (int h = 0; h < KT; h++)
        compute_stage<BITS, T, M_BLOCKS, HAS_ZEROS, TMA, SWAP>(
            acc, smem + stage * S::kStage + h * S::kSub, warp, lane, two_group_rows);
    }
    const int cur_nt = nt, cur_kt = kt;
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
    if (++kt == k_tiles) {
      kt = 0;
      nt++;
    }
    if (cur_kt != k_tiles - 1 && i != n_iters - 1) continue;

    // ------------------------------------------------------------ end of a block tile
    const int kt_first = cur_kt - (i - seg_first);
    const int col0 = cur_nt * kTileN + warp * kWarpN;
    if (kt_first == 0 && cur_kt == k_tiles - 1) {
      if constexpr (SWAP) {
        if (warp_ok) store_tile_swap<T>(acc, p, row0, col0, lane);
      } else {
        if (warp_ok) store_tile<T, M_BLOCKS>(acc, p, row0, col0, lane);
      }
    } else {
      // Shared tile: park the partial sums of the valid rows in this worker's slot (0: its
      // first tile, 1: its last), row-major [rows][kTileN] fp32; the last contributor to
      // arrive adds all slots up in worker order (deterministic).
      const int rows = min(M_BLOCKS * 16, p.m - row0);
      float* slot = p.slots + (static_cast<size_t>(slice * p.workers + worker) * 2 +
                               (seg_first == 0 ? 0 : 1)) *
                                  kSlotFloats;
      if (warp_ok && SWAP) {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
          for (int h = 0; h < 2; h++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
              const int r = 2 * t + e, c = warp * kWarpN + 16 * i + 8 * h + g;
              if (r < rows) slot[r * kTileN + c] = acc[0][i][2 * h + e];
            }
      } else if (warp_ok) {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int mb = 0; mb < M_BLOCKS; mb++)
#pragma unroll
          for (int j = 0; j < 4; j++) {
            const int r = mb * 16 + g, c = warp * kWarpN + j * 8 + 2 * t;
            if (r < rows)
              *reinterpret_cast<float2*>(slot + r * kTileN + c) =
                  make_float2(acc[mb][j][0], acc[mb][j][1]);
            if (r + 8 < rows)
              *reinterpret_cast<float2*>(slot + (r + 8) * kTileN + c) =
                  make_float2(acc[mb][j][2], acc[mb][j][3]);
          }
      }
      __threadfence();
      __syncthreads();
      int* counter = p.counters + slice * n_tiles + cur_nt;
      if (tid == 0) {
        const int add = cur_kt - kt_first + 1;
        s_last = (atomicAdd(counter, add) + add == k_tiles);
      }
      __syncthreads();
      // The last contributor sums the tile, after its main loop (see finalize_shared_tile).
      if (s_last) to_finalize |= seg_first == 0 ? 1 : 2;
    }
    zero_acc(acc);
    seg_first = i + 1;
  }
  if constexpr (!TMA) cp_async_wait<0>();
  // Out of the main loop, so that its registers do not meet the finalizer's loads in flight.
  if (to_finalize & 1)
    finalize_shared_tile<T, M_BLOCKS>(p, static_cast<int>(it0 / k_tiles), slice, k_tiles, n_tiles, tid);
  if (to_finalize & 2)
    finalize_shared_tile<T, M_BLOCKS>(p, static_cast<int>((it1 - 1) / k_tiles), slice, k_tiles, n_tiles, tid);
}

template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS>
__global__ void __launch_bounds__(kThreads, M_BLOCKS <= 2 ? 2 : 1) gemm_kernel(const GemmArgs p) {
  gemm_body<BITS, T, M_BLOCKS, HAS_ZEROS>(p);
}

// 4-bit, K a multiple of 128: 128-row stages (see gemm_body).
template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS>
__global__ void __launch_bounds__(kThreads, M_BLOCKS <= 2 ? 2 : 1)
    gemm_kernel_wide(const GemmArgs p) {
  gemm_body<BITS, T, M_BLOCKS, HAS_ZEROS, false, 2>(p);
}

// 256-row stages, double-buffered (4-bit, 1-2 row blocks, K % 256 == 0): large layers.
template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS>
__global__ void __launch_bounds__(kThreads, 2) gemm_kernel_wide4(const GemmArgs p) {
  gemm_body<BITS, T, M_BLOCKS, HAS_ZEROS, false, 4>(p);
}

// The wide kernels with the swapped mma (at most 8 rows; see compute_stage).
template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS>
__global__ void __launch_bounds__(kThreads, 2) gemm_kernel_wide_swap(const GemmArgs p) {
  gemm_body<BITS, T, M_BLOCKS, HAS_ZEROS, false, 2, true>(p);
}
template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS>
__global__ void __launch_bounds__(kThreads, 2) gemm_kernel_wide4_swap(const GemmArgs p) {
  gemm_body<BITS, T, M_BLOCKS, HAS_ZEROS, false, 4, true>(p);
}

// 8-bit weights on compute capability >= 9.0: the stages arrive by bulk copies (see gemm_body).
template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS>
__global__ void __launch_bounds__(kThreads, M_BLOCKS <= 2 ? 2 : 1)
    gemm_kernel_tma(const GemmArgs p) {
  gemm_body<BITS, T, M_BLOCKS, HAS_ZEROS, true>(p);
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

// ---------------------------------------------------------------------------------------------
// The kernel of each kind (KernelKind, marlin.h) and its dynamic shared memory.
template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS, int KIND>
struct Variant {
  static constexpr int kSmem = Smem<BITS, M_BLOCKS, KIND == kTma, kernel_traits(KIND).stage_tiles>::kTotal;
  static auto kernel() {
    if constexpr (KIND == kTma)
      return gemm_kernel_tma<BITS, T, M_BLOCKS, HAS_ZEROS>;
    else if constexpr (KIND == kWide4)
      return gemm_kernel_wide4<BITS, T, M_BLOCKS, HAS_ZEROS>;
    else if constexpr (KIND == kWideSwap)
      return gemm_kernel_wide_swap<BITS, T, M_BLOCKS, HAS_ZEROS>;
    else if constexpr (KIND == kWide4Swap)
      return gemm_kernel_wide4_swap<BITS, T, M_BLOCKS, HAS_ZEROS>;
    else if constexpr (KIND == kWide)
      return gemm_kernel_wide<BITS, T, M_BLOCKS, HAS_ZEROS>;
    else
      return gemm_kernel<BITS, T, M_BLOCKS, HAS_ZEROS>;
  }
  // Raise the kernel's shared-memory limit, once per device (bit per device 0..63).
  static cudaError_t configure() {
    static unsigned long long configured = 0;
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const unsigned long long bit = 1ull << (device & 63);
    if (configured & bit) return cudaSuccess;
    err = cudaFuncSetAttribute(kernel(), cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err == cudaSuccess) configured |= bit;
    return err;
  }
};

template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS, int KIND>
cudaError_t occupancy_variant(int* blocks_per_sm) {
  using V = Variant<BITS, T, M_BLOCKS, HAS_ZEROS, KIND>;
  const cudaError_t err = V::configure();
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, V::kernel(), kThreads, V::kSmem);
}

template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS, int KIND>
cudaError_t launch_variant(const GemmArgs& args, cudaStream_t stream) {
  using V = Variant<BITS, T, M_BLOCKS, HAS_ZEROS, KIND>;
  const cudaError_t err = V::configure();
  if (err != cudaSuccess) return err;
  V::kernel()<<<args.workers * args.slices, kThreads, V::kSmem, stream>>>(args);
  return cudaGetLastError();
}

// The compile-time value of a std::integral_constant argument of a generic lambda.
#define GPTQ_MARLIN_VALUE(x) std::decay_t<decltype(x)>::value

// f(std::integral_constant<int, KIND>, std::integral_constant<int, M_BLOCKS>, std::bool_constant
// <HAS_ZEROS>) for the run-time kind, row blocks and zero-point flag, over the variants that
// exist; cudaErrorInvalidValue for any other combination.
template <int BITS, typename F>
cudaError_t with_variant(int kind, int m_blocks, bool has_zeros, F&& f) {
  auto rows = [&](auto k) -> cudaError_t {
    auto pick = [&](auto mb) -> cudaError_t {
      if constexpr (GPTQ_MARLIN_VALUE(mb) <= built_m_blocks(GPTQ_MARLIN_VALUE(k), BITS)) {
        return has_zeros ? f(k, mb, std::true_type{}) : f(k, mb, std::false_type{});
      } else {
        return cudaErrorInvalidValue;
      }
    };
    switch (m_blocks) {
      case 1: return pick(std::integral_constant<int, 1>{});
      case 2: return pick(std::integral_constant<int, 2>{});
      case 3: return pick(std::integral_constant<int, 3>{});
      case 4: return pick(std::integral_constant<int, 4>{});
      default: return cudaErrorInvalidValue;
    }
  };
  switch (kind) {
    case kNarrow: return rows(std::integral_constant<int, kNarrow>{});
    case kWide: return rows(std::integral_constant<int, kWide>{});
    case kWide4: return rows(std::integral_constant<int, kWide4>{});
    case kWideSwap: return rows(std::integral_constant<int, kWideSwap>{});
    case kWide4Swap: return rows(std::integral_constant<int, kWide4Swap>{});
    case kTma: return rows(std::integral_constant<int, kTma>{});
    default: return cudaErrorInvalidValue;
  }
}

// The per-(bits, dtype) entry points each instantiation file defines.
template <int BITS, typename T>
cudaError_t occupancy_t(int m_blocks, bool has_zeros, int kind, int* blocks_per_sm) {
  return with_variant<BITS>(kind, m_blocks, has_zeros, [&](auto k, auto mb, auto z) {
    return occupancy_variant<BITS, T, GPTQ_MARLIN_VALUE(mb), GPTQ_MARLIN_VALUE(z), GPTQ_MARLIN_VALUE(k)>(
        blocks_per_sm);
  });
}

// args.kind picks the kernel (marlin_ops.cpp).
template <int BITS, typename T>
cudaError_t launch_t(const GemmArgs& args, cudaStream_t stream) {
  return with_variant<BITS>(args.kind, args.m_blocks, args.zeros != nullptr, [&](auto k, auto mb, auto z) {
    return launch_variant<BITS, T, GPTQ_MARLIN_VALUE(mb), GPTQ_MARLIN_VALUE(z), GPTQ_MARLIN_VALUE(k)>(
        args, stream);
  });
}

template <int BITS, typename T>
cudaError_t dequant_t(const DequantArgs& args, cudaStream_t stream) {
  const long long tiles = static_cast<long long>(args.n / kWarpN) * (args.k / kTileK);
  const long long blocks = (tiles + kWarps - 1) / kWarps;
  if (blocks == 0) return cudaSuccess;
  dequant_kernel<BITS, T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

#define GPTQ_MARLIN_INSTANTIATE(BITS, T)                                                    \
  template cudaError_t occupancy_t<BITS, T>(int, bool, int, int*);                                \
  template cudaError_t launch_t<BITS, T>(const GemmArgs&, cudaStream_t);                    \
  template cudaError_t dequant_t<BITS, T>(const DequantArgs&, cudaStream_t);

}  // namespace gptq_marlin
