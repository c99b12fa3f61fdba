// The kernels for bfloat16 activations (one file per dtype: parallel builds).
#include "gemm.cuh"

namespace gptq_exllama {
cudaError_t gemm_occupancy_bf16(int rows, bool stream, int* blocks) { return occupancy_t<kBF16>(rows, stream, blocks); }
cudaError_t gemm_launch_bf16(const GemmArgs& args, int splits, cudaStream_t stream) { return launch_t<kBF16>(args, splits, stream); }
cudaError_t dequant_launch_bf16(const DequantArgs& args, cudaStream_t stream) { return dequant_t<kBF16>(args, stream); }
}  // namespace gptq_exllama
