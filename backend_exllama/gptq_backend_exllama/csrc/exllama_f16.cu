// The kernels for float16 activations (one file per dtype: parallel builds).
#include "gemm.cuh"

namespace gptq_exllama {
cudaError_t gemm_occupancy_f16(int rows, bool stream, int* blocks) { return occupancy_t<kF16>(rows, stream, blocks); }
cudaError_t gemm_launch_f16(const GemmArgs& args, int splits, cudaStream_t stream) { return launch_t<kF16>(args, splits, stream); }
cudaError_t dequant_launch_f16(const DequantArgs& args, cudaStream_t stream) { return dequant_t<kF16>(args, stream); }
}  // namespace gptq_exllama
