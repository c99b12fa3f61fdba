// The dtype switch between the torch binding and the per-dtype kernel files.
#include "exllama.h"

namespace gptq_exllama {
cudaError_t gemm_occupancy(int dtype, int rows, bool stream, int* blocks) {
  return dtype == kF16 ? gemm_occupancy_f16(rows, stream, blocks) : gemm_occupancy_bf16(rows, stream, blocks);
}
cudaError_t gemm_launch(int dtype, const GemmArgs& args, int splits, cudaStream_t stream) {
  return dtype == kF16 ? gemm_launch_f16(args, splits, stream) : gemm_launch_bf16(args, splits, stream);
}
cudaError_t dequant_launch(int dtype, const DequantArgs& args, cudaStream_t stream) {
  return dtype == kF16 ? dequant_launch_f16(args, stream) : dequant_launch_bf16(args, stream);
}
}  // namespace gptq_exllama
