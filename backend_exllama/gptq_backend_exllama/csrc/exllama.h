// gptq-backend-exllama: the C interface between the CUDA kernels and the torch binding.
// Plain CUDA runtime types only, so the kernels compile with nvcc alone (no torch headers).
// The geometry here is shared with layout.py and policy.py; change both or neither.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace gptq_exllama {

enum DType : int { kF16 = 0, kBF16 = 1 };

constexpr int kThreads = 128;                  // threads per block
constexpr int kBlockN = kThreads * 4;          // columns per block: one column quad per thread
constexpr int kRowsPerChunk = 8;               // activation rows one block multiplies at most
constexpr int kStageK = 256;                   // k rows of activations staged in shared memory
constexpr int kStepK = 8;                      // k rows per 16-byte weight load (8 k x 4 columns)
constexpr int kSplitAlign = 32;                // a split's k range is a multiple of this
constexpr int kMinSplitRows = 128;             // the op's split-K rule: splits of at least this many rows
constexpr int kMaxSplits = 65535;              // gridDim.z

// What the gemm op's `kind` argument selects (policy.KINDS; a test compares the two).
enum KernelKind : int { kGemm = 0, kDequantCublas = 1 };

struct GemmArgs {
  const void* a;         // [m, k] activations, row-major, original column order
  const int* perm;       // [k]: sorted row -> activation column (act-order), or nullptr
  const uint4* q;        // [k_pad / 8, n / 4] shuffled words (layout.py)
  const void* sz;        // [groups, n / 4, 8] folded scales and zero terms (layout.py)
  const void* bias;      // [n] in the activation dtype, or nullptr
  void* c;               // [m, n] output, activation dtype
  float* acc;            // [>= min(m, rows of the workspace), n] fp32: zero on entry and exit
  int* counters;         // [chunks * column blocks]: zero on entry and exit
  int m, n, k, k_pad;
  int group_size;        // rows per group in the sorted order (k_pad for one group)
  int k_split;           // rows per split: a multiple of kSplitAlign, or k_pad
};

struct DequantArgs {
  const uint4* q;
  const void* sz;
  void* out;             // [k_pad, n] activation dtype, sorted k order
  int n, k_pad, group_size;
};

// Blocks of the gemm kernel for `rows` rows (1..8) that fit on one multiprocessor.
cudaError_t gemm_occupancy(int dtype, int rows, bool stream, int* blocks_per_sm);
// One launch: grid (ceil(m / 8), ceil(n / kBlockN), splits).
cudaError_t gemm_launch(int dtype, const GemmArgs& args, int splits, cudaStream_t stream);
cudaError_t dequant_launch(int dtype, const DequantArgs& args, cudaStream_t stream);

// Per activation dtype (exllama_f16.cu, exllama_bf16.cu).
cudaError_t gemm_occupancy_f16(int rows, bool stream, int* blocks_per_sm);
cudaError_t gemm_launch_f16(const GemmArgs& args, int splits, cudaStream_t stream);
cudaError_t dequant_launch_f16(const DequantArgs& args, cudaStream_t stream);
cudaError_t gemm_occupancy_bf16(int rows, bool stream, int* blocks_per_sm);
cudaError_t gemm_launch_bf16(const GemmArgs& args, int splits, cudaStream_t stream);
cudaError_t dequant_launch_bf16(const DequantArgs& args, cudaStream_t stream);

}  // namespace gptq_exllama
