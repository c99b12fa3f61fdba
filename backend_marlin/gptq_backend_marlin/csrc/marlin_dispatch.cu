// Run-time dispatch over (activation dtype, bits) to the instantiation files.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "marlin.h"

namespace gptq_marlin {

template <int BITS, typename T>
cudaError_t occupancy_t(int m_blocks, bool has_zeros, int kind, int* blocks_per_sm);
template <int BITS, typename T>
cudaError_t launch_t(const GemmArgs& args, cudaStream_t stream);
template <int BITS, typename T>
cudaError_t dequant_t(const DequantArgs& args, cudaStream_t stream);

#define GPTQ_MARLIN_DISPATCH(DTYPE, BITS_, CALL)                     \
  if ((DTYPE) == kF16 && (BITS_) == 4) return CALL(4, half);          \
  if ((DTYPE) == kF16 && (BITS_) == 8) return CALL(8, half);          \
  if ((DTYPE) == kBF16 && (BITS_) == 4) return CALL(4, __nv_bfloat16); \
  if ((DTYPE) == kBF16 && (BITS_) == 8) return CALL(8, __nv_bfloat16); \
  return cudaErrorInvalidValue;

cudaError_t gemm_occupancy(int dtype, int bits, int m_blocks, bool has_zeros, int kind, int* blocks_per_sm) {
#define CALL(B, T) occupancy_t<B, T>(m_blocks, has_zeros, kind, blocks_per_sm)
  GPTQ_MARLIN_DISPATCH(dtype, bits, CALL)
#undef CALL
}

cudaError_t gemm_launch(int dtype, const GemmArgs& args, cudaStream_t stream) {
#define CALL(B, T) launch_t<B, T>(args, stream)
  GPTQ_MARLIN_DISPATCH(dtype, args.bits, CALL)
#undef CALL
}

cudaError_t dequant_launch(int dtype, const DequantArgs& args, cudaStream_t stream) {
#define CALL(B, T) dequant_t<B, T>(args, stream)
  GPTQ_MARLIN_DISPATCH(dtype, args.bits, CALL)
#undef CALL
}

}  // namespace gptq_marlin
