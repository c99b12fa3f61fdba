// gptq-backend-marlin: the C interface between the CUDA kernels and the torch binding.
// Plain CUDA runtime types only, so the kernels compile with nvcc alone (no torch headers).
#pragma once
#include <cuda_runtime.h>
#include <cstddef>

namespace gptq_marlin {

enum DType : int { kF16 = 0, kBF16 = 1 };

// Geometry shared with layout.py.
constexpr int kThreads = 256;    // 8 warps per block
constexpr int kWarps = 8;
constexpr int kTileK = 64;       // k rows per pipeline stage
constexpr int kWarpN = 32;       // columns per warp
constexpr int kTileN = 256;      // columns per block tile
constexpr int kMaxMBlocks = 4;   // 16-row blocks of A one block multiplies at most (4-bit)
constexpr int kMaxMBlocks8 = 2;  // the same for 8-bit weights (registers: stage.cuh)
// fp32 partial sums of one block tile, in fragment order (see the epilogue).
constexpr int kSlotFloats = kMaxMBlocks * kWarps * 4 * 32 * 4;

struct GemmArgs {
  const void* a;       // [m, k] activations, row-major, act-order already applied
  const void* b;       // tiles (layout.py)
  const void* scales;  // [groups, n] in the activation dtype, columns permuted
  const void* zeros;   // like scales (real zero points), or nullptr: symmetric
  const void* bias;    // [n] fp16, or nullptr
  void* c;             // [m, n] output, activation dtype
  float* slots;        // workers * slices * 2 * kSlotFloats
  int* counters;       // slices * n_tiles, zero on entry, zero again on exit
  int m, n, k, bits;
  int group_shift;     // log2(group size), or -1 for one group over all of k
  int m_blocks;        // 16-row blocks per slice: ceil(min(m, 16 * max) / 16)
  int slices;          // ceil(m / (16 * max)): max = kMaxMBlocks, kMaxMBlocks8 for 8-bit
  int workers;         // blocks per slice; the striped partition splits n_tiles * k_tiles
  int evict_first;     // stream weights with an L2 evict-first hint
  int kind;            // KernelKind: which kernel runs (the caller's dispatch policy)
};

struct DequantArgs {
  const void* b;
  const void* scales;
  const void* zeros;
  void* out;  // [n, k] activation dtype (nn.Linear's weight layout)
  int n, k, bits;
  int group_shift;
};

// Set the shared-memory limit of kernel kind `kind` on the current device and report how many
// blocks of it fit on one multiprocessor.
cudaError_t gemm_occupancy(int dtype, int bits, int m_blocks, bool has_zeros, int kind, int* blocks_per_sm);
cudaError_t gemm_launch(int dtype, const GemmArgs& args, cudaStream_t stream);
cudaError_t dequant_launch(int dtype, const DequantArgs& args, cudaStream_t stream);
// out[r, c] = x[r, perm[c]] for 2-byte x [m, k] (contiguous) and perm [k] of int32 or int64;
// out is contiguous and 16-byte aligned. An index outside [0, k) writes nan_bits.
cudaError_t gather_cols_launch(const void* x, const void* perm, bool perm_int64, void* out,
                               int m, int k, unsigned short nan_bits, cudaStream_t stream);

}  // namespace gptq_marlin
