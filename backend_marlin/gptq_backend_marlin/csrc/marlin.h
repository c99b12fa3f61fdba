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
constexpr int kMaxMBlocks8 = 2;  // the same for 8-bit weights (see marlin_kernel.cuh)
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

// The kernels, one row per kind: the `kind` argument of the gemm op, chosen per batch size by
// the layer's dispatch policy in Python (policy.py's KERNELS lists the same rows in the same
// order; a test compares them). Three axes (NOTES/perf-marlin.md says why each exists):
// * the copy engine: cp.async by every thread, or bulk copies (TMA) on an mbarrier, which
//   compute capability >= 9.0 has and which was faster only for 8-bit weights in one slice;
// * the stage depth: 64-row k tiles per pipeline stage (1, 2 or 4: 64-, 128- or 256-row
//   stages; the deeper ones pay the wait, the barrier and the copy bookkeeping once per stage);
// * the mma orientation: the weights as the mma's B operand, or swapped to its A operand
//   (one m16n8k16 covers 16 columns x 8 rows: half the mmas at M <= 8).
// plus what each row requires of a call (checked by the op: a kind that cannot serve the call
// is an error naming why).
enum class CopyEngine : int { kCpAsync = 0, kBulk = 1 };

struct KernelTraits {
  const char* name;   // the policy's path is "marlin:" + name
  CopyEngine copy;
  int stage_tiles;    // 64-row k tiles per pipeline stage
  bool swap;          // weights as the mma's A operand
  int bits;           // the weight width it is built for (0: 4 and 8)
  int max_m_blocks;   // 16-row blocks per slice at most (0: the width's own maximum)
  int max_m;          // rows per call at most (0: any)
  int min_cc_major;   // compute capability it needs
};

enum KernelKind : int { kNarrow = 0, kWide = 1, kWide4 = 2, kWideSwap = 3, kWide4Swap = 4, kTma = 5,
                        kKernelKinds = 6,
                        // Not a kernel: dequantize into a scratch weight, then cuBLAS (large M).
                        kDequantCublas = 6 };

constexpr KernelTraits kernel_traits(int kind) {
  switch (kind) {
    case kWide: return {"wide", CopyEngine::kCpAsync, 2, false, 4, 0, 0, 8};
    case kWide4: return {"wide4", CopyEngine::kCpAsync, 4, false, 4, 2, 0, 8};
    case kWideSwap: return {"wide-swap", CopyEngine::kCpAsync, 2, true, 4, 1, 8, 8};
    case kWide4Swap: return {"wide4-swap", CopyEngine::kCpAsync, 4, true, 4, 1, 8, 8};
    case kTma: return {"tma", CopyEngine::kBulk, 1, false, 8, 0, 0, 9};
    default: return {"narrow", CopyEngine::kCpAsync, 1, false, 0, 0, 0, 8};
  }
}

// 16-row blocks of A one block multiplies at most, by weight width (more rows run as slices).
constexpr int max_m_blocks(int bits) { return bits == 8 ? kMaxMBlocks8 : kMaxMBlocks; }

// The row blocks kind `kind` is built for at `bits` (0: not built for that width).
constexpr int built_m_blocks(int kind, int bits) {
  const KernelTraits t = kernel_traits(kind);
  if (t.bits != 0 && t.bits != bits) return 0;
  return t.max_m_blocks != 0 ? t.max_m_blocks : max_m_blocks(bits);
}

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
