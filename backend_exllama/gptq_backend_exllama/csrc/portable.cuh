// Which GPU the kernels are compiled for, and the AMD spellings of the few things that are
// NVIDIA-only in qdq4.cuh and gemm.cuh (inline PTX, cache-hint loads and stores).
//
// GPTQ_HIP is the one guard: 1 when these sources are compiled for AMD GPUs (gptq-backend-rocm
// hipifies them at build time, docs/DESIGN.md §1), 0 for nvcc. It is derived from
// __HIP_PLATFORM_AMD__, which hipcc (HIP_PLATFORM=amd), torch's ROCm extension builds and
// HIP's own headers all define; hipcc on the NVIDIA platform leaves it undefined, so nvcc
// still gets the PTX. Every NVIDIA-only site sits in the #else branch of an `#if GPTQ_HIP`,
// which gptq_backend_rocm.portability checks; the NVIDIA code is the same tokens as before.
#pragma once
#include <cstdint>

#if defined(__HIP_PLATFORM_AMD__)
#define GPTQ_HIP 1
#include <hip/hip_fp16.h>
#else
#define GPTQ_HIP 0
#endif

namespace gptq_exllama {

// Blocks of the gemm kernel that must fit on one multiprocessor together (the second argument
// of __launch_bounds__). CUDA reads it as blocks per SM: 4 x 128 threads, <= 128 registers.
// HIP reads it as waves per SIMD (amdgpu_waves_per_eu): the same 4 blocks of two wave64 on a
// CDNA compute unit of 4 SIMDs are 2 waves per SIMD (128 VGPRs on gfx908, 256 on gfx90a+).
#if GPTQ_HIP
constexpr int kMinBlocks = 2;
#else
constexpr int kMinBlocks = 4;
#endif

#if GPTQ_HIP
namespace hip {

// A 32-bit register as HIP's __half2 and back (the kernels keep fp16 pairs as uint32_t).
__device__ __forceinline__ __half2 as_half2(uint32_t bits) {
  __half2_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  raw.y = static_cast<unsigned short>(bits >> 16);
  return __half2(raw);
}

__device__ __forceinline__ uint32_t bits_of(__half2 h) {
  const __half2_raw raw = static_cast<__half2_raw>(h);
  return raw.x | (static_cast<uint32_t>(raw.y) << 16);
}

// The evict-first 16-byte weight load: a nontemporal load (global_load_dwordx4 with the
// streaming cache policy) of the same four words.
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
  typedef uint32_t u32x4 __attribute__((ext_vector_type(4)));
  const u32x4 v = __builtin_nontemporal_load(reinterpret_cast<const u32x4*>(p));
  return make_uint4(v.x, v.y, v.z, v.w);
}

}  // namespace hip
#endif

}  // namespace gptq_exllama
