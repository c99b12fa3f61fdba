// Instantiations for 8-bit weights x half activations (one file per variant: parallel builds).
#include "launch.cuh"

namespace gptq_marlin {
GPTQ_MARLIN_INSTANTIATE(8, half)
}  // namespace gptq_marlin
