// 2-bit kernels (launch.cuh).
#include "launch.cuh"

GPTQ_CUDA_LAUNCHERS(2)
