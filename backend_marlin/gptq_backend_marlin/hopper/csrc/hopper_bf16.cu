// bf16 instantiations of the Hopper GEMM (token tiles 16..128 x symmetric / zero points).
#include "kernel.cuh"

namespace gptq_hopper {
cudaError_t launch_bf16(const void* x, const void* w, const void* scales, const void* zeros, void* y,
                        float* ws, int M, int N, int K, int group_size, int bm, int splits,
                        cudaStream_t stream) {
  return launch_typed<__nv_bfloat16>(x, w, scales, zeros, y, ws, M, N, K, group_size, bm, splits, stream);
}
cudaError_t occupancy_bf16(int bm, bool zp, int* blocks) {
  return occupancy_typed<__nv_bfloat16>(bm, zp, blocks);
}
}  // namespace gptq_hopper
