// The kernel variants as data: one row of traits per kind (the gemm op's `kind` argument).
// Host and device code read the same constexpr table; plain C++ (no CUDA, no torch).
#pragma once

#include "marlin.h"

namespace gptq_marlin {

// The kernels, one row per kind: the `kind` argument of the gemm op, chosen per batch size by
// the layer's dispatch policy in Python (policy.py's KINDS lists the same rows in the same
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

}  // namespace gptq_marlin
