// The split-K reduction: y = sum of the fp32 partial tiles in split order (deterministic, no
// atomics), four columns per thread.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "hopper.h"

namespace gptq_hopper {

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ half from_float<half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void reduce_kernel(const float* __restrict__ ws, T* __restrict__ y, size_t count4, int splits) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count4) return;
  float4 s = reinterpret_cast<const float4*>(ws)[i];
  for (int p = 1; p < splits; ++p) {
    const float4 v = reinterpret_cast<const float4*>(ws + static_cast<size_t>(p) * count4 * 4)[i];
    s.x += v.x;
    s.y += v.y;
    s.z += v.z;
    s.w += v.w;
  }
  T* out = y + i * 4;
  out[0] = from_float<T>(s.x);
  out[1] = from_float<T>(s.y);
  out[2] = from_float<T>(s.z);
  out[3] = from_float<T>(s.w);
}

cudaError_t launch_reduce(const float* ws, void* y, int M, int N, int splits, bool bf16, cudaStream_t stream) {
  if (N % 4 || splits < 1) return cudaErrorInvalidValue;
  const size_t count4 = static_cast<size_t>(M) * N / 4;
  const unsigned blocks = static_cast<unsigned>((count4 + 255) / 256);
  if (bf16) {
    reduce_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(ws, static_cast<__nv_bfloat16*>(y), count4, splits);
  } else {
    reduce_kernel<half><<<blocks, 256, 0, stream>>>(ws, static_cast<half*>(y), count4, splits);
  }
  return cudaGetLastError();
}

}  // namespace gptq_hopper
