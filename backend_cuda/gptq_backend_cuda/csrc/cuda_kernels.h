// The kernels' host interface: argument records, kernel kinds and launchers (no CUDA device code
// here, so the torch binding includes it without nvcc).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace gptq_cuda {

enum DType : int { kF16 = 0, kBF16 = 1 };

// The op's kind argument (policy.py KINDS, in this order; a test compares the two).
enum KernelKind : int {
  kMmaM8 = 0,          // decode kernel, up to 8 rows per slice
  kMmaM16 = 1,         // decode kernel, up to 16 rows per slice
  kDequantCublas = 2,  // dequantize into a scratch weight, then cuBLAS
};
constexpr int kKernelKinds = 2;  // kinds below this are decode kernels
inline int rows_per_slice(int kind) { return kind == kMmaM8 ? 8 : 16; }

constexpr int kStepK = 16;   // input channels per mma step (layout.py STEP_K)
constexpr int kStripN = 16;  // output columns per warp (layout.py STRIP_N)
constexpr int kWarps = 4;    // warps per block (policy.py WARPS)
constexpr int kThreads = 32 * kWarps;
constexpr int kCtaN = kStripN * kWarps;

// Steps per unit (one 16-byte load per lane): layout.py unit_steps.
constexpr int unit_steps(int bits) { return bits == 8 ? 2 : bits == 4 ? 4 : 8; }
constexpr int unit_k(int bits) { return unit_steps(bits) * kStepK; }

struct GemvArgs {
  const void* x;          // [m, k] activations (fp16/bf16), contiguous
  const uint32_t* qweight;  // [strips, units, 32, 4]
  const uint32_t* qhigh;    // [strips, units, 32, 2] (3-bit) or null
  const void* scales;     // fp16 [groups_pad, n_pad]
  const void* zeros;      // activation dtype [groups_pad, n_pad], or null (symmetric)
  const int* perm;        // int32 [k] or null
  const void* bias;       // fp16 [n] or null
  void* y;                // [m, n] activation dtype
  float* partials;        // [slices, splits, rows, n_pad] when splits > 1
  int* counters;          // [slices, blocks(n)], zero between calls
  int m, n, k;
  int n_pad, units, strips;
  int group_steps;        // group size / 16, 0 for one group (-1)
  int groups_pad;
  int units_per_split, splits;
  int x_stride;           // halves per activation row in shared memory (policy.x_row_stride)
  int x_vector;           // 1: k % 8 == 0, no perm, 16-byte aligned x (vector staging)
};

struct DequantArgs {
  const uint32_t* qweight;
  const uint32_t* qhigh;
  const void* scales;
  const void* zeros;
  const int* perm;
  void* w;                // [n, k] activation dtype, original k order
  int n, k, n_pad, units, strips, group_steps, groups_pad;
};

// Per bit width (cuda_b{2,3,4,8}.cu): launch the decode kernel of `kind` for dtype `dtype`.
cudaError_t gemv_launch_b2(int dtype, int kind, bool zeros, const GemvArgs& args, int slices, int smem, cudaStream_t stream);
cudaError_t gemv_launch_b3(int dtype, int kind, bool zeros, const GemvArgs& args, int slices, int smem, cudaStream_t stream);
cudaError_t gemv_launch_b4(int dtype, int kind, bool zeros, const GemvArgs& args, int slices, int smem, cudaStream_t stream);
cudaError_t gemv_launch_b8(int dtype, int kind, bool zeros, const GemvArgs& args, int slices, int smem, cudaStream_t stream);
cudaError_t dequant_launch_b2(int dtype, bool zeros, const DequantArgs& args, cudaStream_t stream);
cudaError_t dequant_launch_b3(int dtype, bool zeros, const DequantArgs& args, cudaStream_t stream);
cudaError_t dequant_launch_b4(int dtype, bool zeros, const DequantArgs& args, cudaStream_t stream);
cudaError_t dequant_launch_b8(int dtype, bool zeros, const DequantArgs& args, cudaStream_t stream);

}  // namespace gptq_cuda
