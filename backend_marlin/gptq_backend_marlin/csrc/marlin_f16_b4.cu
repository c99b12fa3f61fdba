// Instantiations for 4-bit weights x half activations (one file per variant: parallel builds).
#include "launch.cuh"

namespace gptq_marlin {
GPTQ_MARLIN_INSTANTIATE(4, half)
}  // namespace gptq_marlin
