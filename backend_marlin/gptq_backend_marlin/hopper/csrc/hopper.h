// The host-side entry of the Hopper (sm_90a) 4-bit GEMM: plain pointers, so the torch binding
// (hopper_ops.cpp) and the kernels (*.cu) share one declaration and the .cu files compile with
// nvcc alone (the compile test builds them without torch). Geometry shared with layout.py.
#pragma once
#include <cuda_runtime_api.h>

#include "stage.h"  // kThreads, kBN, kBK and the pipeline-stage geometry

namespace gptq_hopper {

// Y[M, N] (or fp32 partial sums ws[splits, M, N] when splits > 1) = X[M, K] . W[K, N].
// `w` is layout.py's repacked tiles, `scales` / `zeros` [G, N] in the activation type
// (zeros null: symmetric, zero 8). `bm` is the token tile (16, 32, 64, 128). `splits`
// split K into runs of whole pipeline stages (stage.h: 128 k at bm <= 64, 64 k above), every
// split non-empty (ops.split_count); any other count is cudaErrorInvalidValue.
cudaError_t launch_f16(const void* x, const void* w, const void* scales, const void* zeros, void* y,
                       float* ws, int M, int N, int K, int group_size, int bm, int splits,
                       cudaStream_t stream);
cudaError_t launch_bf16(const void* x, const void* w, const void* scales, const void* zeros, void* y,
                        float* ws, int M, int N, int K, int group_size, int bm, int splits,
                        cudaStream_t stream);
// Blocks of the (bm, zero points) instantiation that fit on one SM (the runtime's occupancy
// query, so it follows the compiled registers and shared memory).
cudaError_t occupancy_f16(int bm, bool zp, int* blocks);
cudaError_t occupancy_bf16(int bm, bool zp, int* blocks);
// y[M, N] = sum over s of ws[s, M, N], in order (deterministic), converted to fp16 / bf16.
cudaError_t launch_reduce(const float* ws, void* y, int M, int N, int splits, bool bf16,
                          cudaStream_t stream);

}  // namespace gptq_hopper
