// Instantiation and launch of one bit width's kernels (each cuda_b*.cu includes this once, so
// the bit widths compile in parallel): 2 dtypes x 2 row tiles x sym/asym x unit-aligned groups
// or not: 16 decode kernels, and 2 x 2 dense dequantization kernels.
#pragma once

#include "dequant_dense.cuh"
#include "gemv.cuh"

namespace gptq_cuda {

template <int BITS, int DT, bool Z, bool A>
cudaError_t gemv_go(int kind, const GemvArgs& args, dim3 grid, int smem, cudaStream_t stream) {
  if (kind == kMmaM8) {
    gemv_kernel<BITS, DT, 1, Z, A><<<grid, kThreads, smem, stream>>>(args);
  } else {
    gemv_kernel<BITS, DT, 2, Z, A><<<grid, kThreads, smem, stream>>>(args);
  }
  return cudaGetLastError();
}

template <int BITS, int DT, bool Z>
cudaError_t gemv_go(int kind, const GemvArgs& args, dim3 grid, int smem, cudaStream_t stream) {
  // Groups end at unit ends: one group (-1), or a group size that is a multiple of the unit.
  return args.group_steps % unit_steps(BITS) == 0 ? gemv_go<BITS, DT, Z, true>(kind, args, grid, smem, stream)
                                                   : gemv_go<BITS, DT, Z, false>(kind, args, grid, smem, stream);
}

template <int BITS>
cudaError_t gemv_launch(int dtype, int kind, bool zeros, const GemvArgs& args, int slices, int smem,
                        cudaStream_t stream) {
  const dim3 grid((args.strips + kWarps - 1) / kWarps, args.splits, slices);
  if (dtype == kF16) {
    return zeros ? gemv_go<BITS, kF16, true>(kind, args, grid, smem, stream)
                 : gemv_go<BITS, kF16, false>(kind, args, grid, smem, stream);
  }
  return zeros ? gemv_go<BITS, kBF16, true>(kind, args, grid, smem, stream)
               : gemv_go<BITS, kBF16, false>(kind, args, grid, smem, stream);
}

template <int BITS>
cudaError_t dequant_launch(int dtype, bool zeros, const DequantArgs& args, cudaStream_t stream) {
  const dim3 grid((args.strips + kWarps - 1) / kWarps, (args.units + kDequantUnits - 1) / kDequantUnits);
  if (dtype == kF16) {
    if (zeros) dequant_kernel<BITS, kF16, true><<<grid, kThreads, 0, stream>>>(args);
    else dequant_kernel<BITS, kF16, false><<<grid, kThreads, 0, stream>>>(args);
  } else {
    if (zeros) dequant_kernel<BITS, kBF16, true><<<grid, kThreads, 0, stream>>>(args);
    else dequant_kernel<BITS, kBF16, false><<<grid, kThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

}  // namespace gptq_cuda

// One bit width's exported launchers (cuda_kernels.h).
#define GPTQ_CUDA_LAUNCHERS(B)                                                                     \
  namespace gptq_cuda {                                                                            \
  cudaError_t gemv_launch_b##B(int dtype, int kind, bool zeros, const GemvArgs& args, int slices,  \
                               int smem, cudaStream_t stream) {                                    \
    return gemv_launch<B>(dtype, kind, zeros, args, slices, smem, stream);                          \
  }                                                                                                \
  cudaError_t dequant_launch_b##B(int dtype, bool zeros, const DequantArgs& args,                  \
                                  cudaStream_t stream) {                                           \
    return dequant_launch<B>(dtype, zeros, args, stream);                                          \
  }                                                                                                \
  }
