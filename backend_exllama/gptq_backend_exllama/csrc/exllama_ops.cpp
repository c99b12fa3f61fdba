// Torch binding of the ExLlama-style kernels: CUDA implementations of the ops that ops.py
// defines (gptq_exllama::gemm, gptq_exllama::dequantize), with argument checks that say what is
// wrong. Messages are built as one std::string (no iostreams in TORCH_CHECK: see
// backend_marlin's binding for the crash that avoids).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "exllama.h"
#include "gptq_check.h"

namespace gptq_exllama {
namespace {

// Messages are one std::string made by gptq_check::msg (gptq_core/csrc/gptq_check.h says why).
using ::gptq_check::msg;
#define EXLLAMA_CHECK(cond, ...) GPTQ_CHECK(cond, __VA_ARGS__)

// Activation dtype of the prepared weight: fp16 layers fold into fp16 constants, bf16 layers
// into fp32 ones (layout.fold_scales).
int dtype_of(const at::Tensor& sz) {
  if (sz.scalar_type() == at::kHalf) return kF16;
  EXLLAMA_CHECK(sz.scalar_type() == at::kFloat, "exllama: sz must be float16 (fp16 layers) or "
                "float32 (bf16 layers), got ", sz.scalar_type());
  return kBF16;
}

at::ScalarType act_type(int dtype) { return dtype == kF16 ? at::kHalf : at::kBFloat16; }

// k_pad of the prepared words, after checking them against n.
int64_t check_weights(const at::Tensor& q, const at::Tensor& sz, int64_t group_size, int64_t n) {
  EXLLAMA_CHECK(n > 0 && n % 4 == 0, "exllama: N=", n, " must be a positive multiple of 4");
  EXLLAMA_CHECK(q.is_cuda() && q.scalar_type() == at::kInt && q.is_contiguous() && q.numel() % n == 0,
                "exllama: q must be a contiguous int32 CUDA tensor of k_pad / 8 x N words "
                "(gptq_backend_exllama.layout.shuffle), got ", q.sizes());
  const int64_t k_pad = q.numel() / n * kStepK;
  EXLLAMA_CHECK(k_pad > 0 && k_pad < (int64_t{1} << 30), "exllama: K=", k_pad, " is out of range");
  EXLLAMA_CHECK(group_size > 0 && group_size % kStepK == 0,
                "exllama: group_size (rows per group) must be a positive multiple of 8, got ", group_size);
  const int64_t groups = (k_pad + group_size - 1) / group_size;
  EXLLAMA_CHECK(sz.dim() == 3 && sz.size(0) >= groups && sz.size(1) == n / 4 && sz.size(2) == 8 &&
                    sz.is_contiguous() && sz.device() == q.device(),
                "exllama: sz must be a contiguous [", groups, ", ", n / 4, ", 8] tensor on the weights' "
                "device, got ", sz.sizes());
  return k_pad;
}

std::mutex g_mutex;
std::map<std::tuple<int, int, int, bool>, int> g_occupancy;
std::map<int, int> g_sm_count;

int sm_count(int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_sm_count.find(device);
  if (it != g_sm_count.end()) return it->second;
  int value = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device);
  EXLLAMA_CHECK(err == cudaSuccess, "exllama: cannot query the device: ", cudaGetErrorString(err));
  g_sm_count[device] = value;
  return value;
}

int occupancy(int device, int dtype, int rows, bool stream) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto key = std::make_tuple(device, dtype, rows, stream);
  auto it = g_occupancy.find(key);
  if (it != g_occupancy.end()) return it->second;
  int blocks = 0;
  const cudaError_t err = gemm_occupancy(dtype, rows, stream, &blocks);
  EXLLAMA_CHECK(err == cudaSuccess && blocks > 0, "exllama: the kernel cannot run on this device: ",
                cudaGetErrorString(err));
  g_occupancy[key] = blocks;
  return blocks;
}

at::Tensor dequantize_into(const at::Tensor& q, const at::Tensor& sz, int64_t group_size,
                           int64_t n, int64_t k_pad) {
  const int dtype = dtype_of(sz);
  auto out = at::empty({k_pad, n}, q.options().dtype(act_type(dtype)));
  DequantArgs args{};
  args.q = static_cast<const uint4*>(q.data_ptr());
  args.sz = sz.data_ptr();
  args.out = out.data_ptr();
  args.n = static_cast<int>(n);
  args.k_pad = static_cast<int>(k_pad);
  args.group_size = static_cast<int>(group_size);
  const cudaError_t err = dequant_launch(dtype, args, c10::cuda::getCurrentCUDAStream());
  EXLLAMA_CHECK(err == cudaSuccess, "exllama: dequantize launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

// Dense [k_pad, n] weight in the activation dtype and the sorted (act-order) k order.
at::Tensor dequantize(const at::Tensor& q, const at::Tensor& sz, int64_t group_size, int64_t size_n) {
  const int64_t k_pad = check_weights(q, sz, group_size, size_n);
  c10::cuda::CUDAGuard guard(q.device());
  return dequantize_into(q, sz, group_size, size_n, k_pad);
}

// y = a @ W (+ bias) by the kernel (kind kGemm) or by dequantizing into a scratch weight and
// cuBLAS (kDequantCublas), as the caller's dispatch policy chose. The split-K workspace (acc:
// fp32 zeros, counters: int32 zeros) is the caller's and every call leaves it at zero, so a
// call allocates nothing that outlives it; calls sharing it run in stream order.
at::Tensor gemm(const at::Tensor& a, const at::Tensor& q, const at::Tensor& sz,
                const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& bias,
                const at::Tensor& acc, const at::Tensor& counters, int64_t group_size,
                int64_t size_n, int64_t kind) {
  EXLLAMA_CHECK(a.is_cuda() && a.dim() == 2, "exllama: a must be a 2-D CUDA tensor, got ", a.sizes());
  EXLLAMA_CHECK(a.device() == q.device(), "exllama: activations and weights are on different devices");
  const int dtype = dtype_of(sz);
  EXLLAMA_CHECK(a.scalar_type() == act_type(dtype), "exllama: the weights were prepared for ",
                act_type(dtype), " activations but got ", a.scalar_type(), "; bind the layer for this dtype");
  const int64_t M = a.size(0), K = a.size(1), N = size_n;
  const int64_t k_pad = check_weights(q, sz, group_size, N);
  EXLLAMA_CHECK(K <= k_pad && k_pad - K < kStepK, "exllama: a has K=", K, " columns but the weights ",
                k_pad, " rows (K rounded up to 8)");
  if (perm.has_value()) {
    EXLLAMA_CHECK(perm->dim() == 1 && perm->size(0) == K && perm->scalar_type() == at::kInt &&
                      perm->is_contiguous() && perm->device() == a.device(),
                  "exllama: perm must be a contiguous int32 [K] tensor on the activations' device");
  }
  if (bias.has_value()) {
    EXLLAMA_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == a.scalar_type() &&
                      bias->is_contiguous() && bias->device() == a.device(),
                  "exllama: bias must be a contiguous [N] tensor of the activations' dtype and device, got ",
                  bias->scalar_type(), " ", bias->sizes());
  }
  EXLLAMA_CHECK(acc.device() == a.device() && acc.scalar_type() == at::kFloat && acc.is_contiguous() &&
                    counters.device() == a.device() && counters.scalar_type() == at::kInt &&
                    counters.is_contiguous(),
                "exllama: the workspace (acc: float32, counters: int32, contiguous) must be on the "
                "activations' device; make it with gptq_backend_exllama.workspace");
  EXLLAMA_CHECK(kind == kGemm || kind == kDequantCublas, "exllama: kind ", kind,
                " does not exist (0: kernel, 1: dequantize + cuBLAS)");
  c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({M, N}, a.options());
  if (M == 0) return out;
  const at::Tensor A = a.contiguous();

  if (kind == kDequantCublas) {
    const at::Tensor w = dequantize_into(q, sz, group_size, N, k_pad).narrow(0, 0, K);
    const at::Tensor As = perm.has_value() ? A.index_select(1, *perm) : A;
    at::mm_out(out, As, w);
    if (bias.has_value()) out.add_(*bias);
    return out;
  }

  EXLLAMA_CHECK(M < (int64_t{1} << 31) / std::max<int64_t>(K, N), "exllama: M=", M, " is too large");
  const int64_t chunks = (M + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t col_blocks = (N / 4 + kThreads - 1) / kThreads;
  const int rows = chunks == 1 ? static_cast<int>(M) : kRowsPerChunk;
  const int device = a.device().index();
  // Splits: as many as keep every block in one wave of the GPU, and at most one per kMinSplitRows
  // rows. Rounding the wave up put a few blocks into a second wave, which costs that wave's whole
  // time (8192x28672 at M = 4: 86.5 us with 10 splits, 560 blocks for a 528-block wave; 71.8 with
  // 9); shorter splits cost more in staging and reduction than they gain in parallelism (11008x4096
  // at M = 1: 11.8 us with 115 splits of 96 rows, 11.1 with 86 of 128). NOTES/perf-h200.md.
  const int64_t wave = int64_t{sm_count(device)} * occupancy(device, dtype, rows, chunks == 1);
  const int64_t units = (k_pad + kSplitAlign - 1) / kSplitAlign;
  const int64_t most = std::max<int64_t>(units / (kMinSplitRows / kSplitAlign), 1);
  int64_t splits = std::min<int64_t>({std::max<int64_t>(wave / (chunks * col_blocks), 1), most, kMaxSplits});
  const bool fits = acc.numel() >= M * N && counters.numel() >= chunks * col_blocks;
  if (!fits) splits = 1;  // a workspace made for fewer rows: no split-K, still correct
  int64_t k_split = (units + splits - 1) / splits * kSplitAlign;
  if (splits == 1 || k_split >= k_pad) k_split = k_pad;
  splits = (k_pad + k_split - 1) / k_split;

  GemmArgs args{};
  args.a = A.data_ptr();
  args.perm = perm.has_value() ? perm->data_ptr<int>() : nullptr;
  args.q = static_cast<const uint4*>(q.data_ptr());
  args.sz = sz.data_ptr();
  args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  args.c = out.data_ptr();
  args.acc = acc.data_ptr<float>();
  args.counters = counters.data_ptr<int>();
  args.m = static_cast<int>(M);
  args.n = static_cast<int>(N);
  args.k = static_cast<int>(K);
  args.k_pad = static_cast<int>(k_pad);
  args.group_size = static_cast<int>(group_size);
  args.k_split = static_cast<int>(k_split);
  const cudaError_t err = gemm_launch(dtype, args, static_cast<int>(splits), c10::cuda::getCurrentCUDAStream());
  EXLLAMA_CHECK(err == cudaSuccess, "exllama: gemm launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace gptq_exllama

TORCH_LIBRARY_IMPL(gptq_exllama, CUDA, m) {
  m.impl("gemm", &gptq_exllama::gemm);
  m.impl("dequantize", &gptq_exllama::dequantize);
}
