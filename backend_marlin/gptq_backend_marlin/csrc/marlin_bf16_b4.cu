// Instantiations for 4-bit weights x __nv_bfloat16 activations (one file per variant: parallel builds).
#include "launch.cuh"

namespace gptq_marlin {
GPTQ_MARLIN_INSTANTIATE(4, __nv_bfloat16)
}  // namespace gptq_marlin
