// Torch binding of the Marlin kernels: CUDA implementations of the ops that ops.py defines
// (gptq_marlin::gemm, gptq_marlin::dequantize, gptq_marlin::gather_cols), with argument checks
// that say what is wrong.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "kernels.h"
#include "marlin.h"
#include "gptq_check.h"

namespace gptq_marlin {
namespace {

// Messages are one std::string made by gptq_check::msg (gptq_core/csrc/gptq_check.h says why).
using ::gptq_check::msg;
#define MARLIN_CHECK(cond, ...) GPTQ_CHECK(cond, __VA_ARGS__)

int dtype_code(at::ScalarType t) {
  if (t == at::kHalf) return kF16;
  if (t == at::kBFloat16) return kBF16;
  MARLIN_CHECK(false, "marlin: activations must be float16 or bfloat16, got ", t);
  return -1;
}

int group_shift(int64_t group_size, int64_t k) {
  if (group_size == -1) return -1;
  for (int s = 5; s <= 30; s++)
    if ((int64_t{1} << s) == group_size) return s;
  MARLIN_CHECK(false, "marlin: group size must be -1 or a power of two >= 32, got ", group_size);
  return -1;
}

void check_weights(const at::Tensor& b, const at::Tensor& scales,
                   const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                   int64_t k, int64_t n) {
  MARLIN_CHECK(bits == 4 || bits == 8, "marlin: bits must be 4 or 8, got ", bits);
  MARLIN_CHECK(k > 0 && k % kTileK == 0, "marlin: K=", k, " must be a positive multiple of ",
               kTileK);
  MARLIN_CHECK(n > 0 && n % kWarpN == 0, "marlin: N=", n, " must be a positive multiple of ",
               kWarpN);
  MARLIN_CHECK(b.is_cuda() && b.scalar_type() == at::kInt && b.is_contiguous(),
               "marlin: tiles must be a contiguous int32 CUDA tensor (from gptq_backend_marlin."
               "layout.repack)");
  MARLIN_CHECK(b.numel() * 32 == k * n * bits, "marlin: ", b.numel(), " tile words cannot hold a ",
               k, " x ", n, " ", bits, "-bit weight");
  const int64_t groups = group_size == -1 ? 1 : (k + group_size - 1) / group_size;
  MARLIN_CHECK(scales.dim() == 2 && scales.size(0) == groups && scales.size(1) == n &&
                   scales.is_contiguous() && scales.device() == b.device(),
               "marlin: scales must be a contiguous [", groups, ", ", n, "] tensor on ",
               b.device(), ", got ", scales.sizes(), " on ", scales.device());
  if (zeros.has_value()) {
    MARLIN_CHECK(zeros->sizes() == scales.sizes() && zeros->scalar_type() == scales.scalar_type() &&
                     zeros->is_contiguous() && zeros->device() == b.device(),
                 "marlin: zeros must match scales in shape, dtype and device");
  }
}

// x [M, K] fp16/bf16 (made contiguous here), perm [K] int32/int64 on x's device -> [M, K].
at::Tensor gather_cols_impl(const at::Tensor& x_in, const at::Tensor& perm) {
  MARLIN_CHECK(x_in.is_cuda() && x_in.dim() == 2,
               "gather_cols: x must be a 2-D CUDA tensor, got ", x_in.sizes(), " on ", x_in.device());
  MARLIN_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
               "gather_cols: x must be float16 or bfloat16, got ", x_in.scalar_type());
  MARLIN_CHECK(perm.dim() == 1 && perm.size(0) == x_in.size(1),
               "gather_cols: perm must be a 1-D tensor of K=", x_in.size(1), " indices, got ",
               perm.sizes());
  MARLIN_CHECK(perm.scalar_type() == at::kInt || perm.scalar_type() == at::kLong,
               "gather_cols: perm must be int32 or int64, got ", perm.scalar_type());
  MARLIN_CHECK(perm.device() == x_in.device(), "gather_cols: perm is on ", perm.device(),
               " but x on ", x_in.device());
  MARLIN_CHECK(x_in.size(0) < (int64_t{1} << 31) && x_in.size(1) < (int64_t{1} << 30),
               "gather_cols: x of ", x_in.sizes(), " is too large");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor p = perm.contiguous();
  auto out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  MARLIN_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0,
               "gather_cols: output not 16-byte aligned");
  const uint16_t nan_bits = x.scalar_type() == at::kHalf ? 0x7e00 : 0x7fc0;
  const cudaError_t err = gather_cols_launch(
      x.data_ptr(), p.data_ptr(), p.scalar_type() == at::kLong, out.data_ptr(),
      static_cast<int>(x.size(0)), static_cast<int>(x.size(1)), nan_bits,
      c10::cuda::getCurrentCUDAStream());
  MARLIN_CHECK(err == cudaSuccess, "gather_cols: launch failed: ", cudaGetErrorString(err));
  return out;
}

std::mutex g_mutex;
std::map<std::tuple<int, int, int, int, bool, int>, int> g_occupancy;
std::map<int, int> g_cc_major;
std::map<int, int> g_sm_count;

// A device attribute, queried once per device.
int cached_attribute(std::map<int, int>& cache, int device, cudaDeviceAttr attr) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int value = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&value, attr, device);
  MARLIN_CHECK(err == cudaSuccess, "marlin: cannot query the device: ", cudaGetErrorString(err));
  cache[device] = value;
  return value;
}

int sm_count(int device) { return cached_attribute(g_sm_count, device, cudaDevAttrMultiProcessorCount); }
int cc_major(int device) { return cached_attribute(g_cc_major, device, cudaDevAttrComputeCapabilityMajor); }

// Stream-K workers get at least this many stages each: fewer contributors per shared tile for
// the finalizer against fewer SMs streaming weights. Only small layers are affected (H100,
// NOTES/perf-marlin.md "Fewer stream-K workers on small layers"): 4096x4096 at M=16 / 32
// went from 13.6 / 17.1 us (1 stage) to 11.1 / 13.2 (4), M=1 9.2 -> 9.0; 6 or 8 was slower.
constexpr int64_t kMinStagesPerWorker = 4;


// Why kernel kind `kind` cannot serve this call ("" when it can): the dispatch policy chose
// it in Python from the same rules (policy.py), so a refusal here means the caller passed a
// kind of its own.
std::string kind_problem(int64_t kind, int64_t bits, int64_t k, int64_t m, int m_blocks,
                         int64_t slices, int cc_major) {
  if (kind < 0 || kind >= kKernelKinds)
    return msg("marlin: kernel kind ", kind, " does not exist (0..", kKernelKinds - 1,
               " are kernels, ", static_cast<int>(kDequantCublas), " dequantize + cuBLAS)");
  const KernelTraits t = kernel_traits(static_cast<int>(kind));
  const auto name = [&] { return msg("marlin: kernel '", t.name, "' (kind ", kind, ") "); };
  if (t.bits != 0 && t.bits != bits) return msg(name(), "serves ", t.bits, "-bit weights, not ", bits, "-bit");
  if (k % (kTileK * t.stage_tiles) != 0)
    return msg(name(), "needs K % ", kTileK * t.stage_tiles, " == 0, K=", k);
  if (t.max_m != 0 && m > t.max_m) return msg(name(), "serves at most ", t.max_m, " rows, M=", m);
  if (m_blocks > built_m_blocks(static_cast<int>(kind), static_cast<int>(bits)))
    return msg(name(), "serves at most ", 16 * built_m_blocks(static_cast<int>(kind), static_cast<int>(bits)),
               " rows per slice, M=", m);
  if (t.copy == CopyEngine::kBulk && slices != 1)
    return msg(name(), "serves one slice (M <= ", 16 * max_m_blocks(static_cast<int>(bits)), "), M=", m);
  if (cc_major < t.min_cc_major)
    return msg(name(), "needs compute capability >= ", t.min_cc_major, ".0, this GPU has ", cc_major, ".x");
  return "";
}

int occupancy(int device, int dtype, int bits, int m_blocks, bool zeros, int kind) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto key = std::make_tuple(device, dtype, bits, m_blocks, zeros, kind);
  auto it = g_occupancy.find(key);
  if (it != g_occupancy.end()) return it->second;
  int blocks = 0;
  const cudaError_t err = gemm_occupancy(dtype, bits, m_blocks, zeros, kind, &blocks);
  MARLIN_CHECK(err == cudaSuccess, "marlin: cannot configure the kernel on this device: ",
               cudaGetErrorString(err));
  MARLIN_CHECK(blocks > 0, "marlin: the kernel does not fit on this device (shared memory)");
  g_occupancy[key] = blocks;
  return blocks;
}

at::Tensor dequantize_into(const at::Tensor& b, const at::Tensor& scales,
                           const std::optional<at::Tensor>& zeros, int64_t bits,
                           int64_t group_size, int64_t k, int64_t n) {
  auto out = at::empty({n, k}, scales.options());
  DequantArgs args{};
  args.b = b.data_ptr();
  args.scales = scales.data_ptr();
  args.zeros = zeros.has_value() ? zeros->data_ptr() : nullptr;
  args.out = out.data_ptr();
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.bits = static_cast<int>(bits);
  args.group_shift = group_shift(group_size, k);
  const cudaError_t err = dequant_launch(dtype_code(scales.scalar_type()), args,
                                         c10::cuda::getCurrentCUDAStream());
  MARLIN_CHECK(err == cudaSuccess, "marlin: dequantize launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

// out[:, c] = x[:, perm[c]]: the act-order activation permutation as one launch.
at::Tensor gather_cols(const at::Tensor& x, const at::Tensor& perm) {
  return gather_cols_impl(x, perm);
}

// Dense [n, k] weight (nn.Linear layout) in the scales' dtype, in the sorted (act-order) k order.
at::Tensor dequantize(const at::Tensor& b, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                      int64_t size_k, int64_t size_n) {
  check_weights(b, scales, zeros, bits, group_size, size_k, size_n);
  dtype_code(scales.scalar_type());
  c10::cuda::CUDAGuard guard(b.device());
  return dequantize_into(b, scales, zeros, bits, group_size, size_k, size_n);
}

// y = a @ W (+ bias) by kernel kind `kind` (KernelKind, chosen by the caller's dispatch policy),
// or by dequantizing into a scratch weight and cuBLAS (kDequantCublas). The kernels' stream-K
// workspace is the caller's (slots: fp32 partial sums, counters: int32 zeros that every call
// leaves at zero), so a call allocates nothing that outlives it (CUDA-graph capture); calls
// that share one workspace must run one after another (one stream).
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scales,
                const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& perm,
                const std::optional<at::Tensor>& bias, const at::Tensor& slots,
                const at::Tensor& counters, int64_t bits, int64_t group_size, int64_t size_n,
                int64_t kind) {
  MARLIN_CHECK(a.is_cuda() && a.dim() == 2, "marlin: a must be a 2-D CUDA tensor, got ",
               a.sizes(), " on ", a.device());
  MARLIN_CHECK(a.device() == b.device(), "marlin: activations on ", a.device(),
               " but weights on ", b.device());
  const int dtype = dtype_code(a.scalar_type());
  MARLIN_CHECK(scales.scalar_type() == a.scalar_type(), "marlin: the weights were prepared for ",
               scales.scalar_type(), " activations but got ", a.scalar_type(),
               "; bind the layer for this dtype");
  const int64_t M = a.size(0), K = a.size(1), N = size_n;
  check_weights(b, scales, zeros, bits, group_size, K, N);
  if (perm.has_value()) {
    MARLIN_CHECK(perm->dim() == 1 && perm->size(0) == K && perm->device() == a.device() &&
                     (perm->scalar_type() == at::kLong || perm->scalar_type() == at::kInt),
                 "marlin: perm must be a [K] int64 or int32 tensor on the activations' device");
  }
  if (bias.has_value()) {
    MARLIN_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->device() == a.device() &&
                     bias->scalar_type() == at::kHalf && bias->is_contiguous(),
                 "marlin: bias must be a contiguous float16 [N] tensor on the activations' device, "
                 "got ", bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
  }
  MARLIN_CHECK(slots.device() == a.device() && slots.scalar_type() == at::kFloat &&
                   slots.is_contiguous() && counters.device() == a.device() &&
                   counters.scalar_type() == at::kInt && counters.is_contiguous(),
               "marlin: the workspace (slots: float32, counters: int32, contiguous) must be on ",
               a.device(), "; make it with gptq_backend_marlin.workspace");
  c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({M, N}, a.options());
  if (M == 0) return out;
  at::Tensor A = a.contiguous();
  if (perm.has_value()) A = gather_cols_impl(A, *perm);
  // cp.async moves 16-byte units: a view that starts mid-unit gets a fresh copy.
  if (reinterpret_cast<uintptr_t>(A.data_ptr()) % 16 != 0) A = A.clone();

  if (kind == kDequantCublas) {
    // The scratch weight is freed at return; the result does not alias it.
    const at::Tensor w = dequantize_into(b, scales, zeros, bits, group_size, K, N);
    at::mm_out(out, A, w.t());
    if (bias.has_value()) out.add_(*bias);
    return out;
  }

  const int max_blocks = max_m_blocks(static_cast<int>(bits));
  const int64_t slice_m = 16 * max_blocks;
  const int m_blocks = M <= slice_m ? static_cast<int>((M + 15) / 16) : max_blocks;
  const int64_t slices = (M + slice_m - 1) / slice_m;
  MARLIN_CHECK(slices < (int64_t{1} << 24), "marlin: M=", M, " is too large for one call");
  const int device = a.device().index();
  const std::string problem = kind_problem(kind, bits, K, M, m_blocks, slices, cc_major(device));
  MARLIN_CHECK(problem.empty(), problem);
  const int sms = sm_count(device);
  const int64_t n_tiles = (N / kWarpN + kWarps - 1) / kWarps;
  MARLIN_CHECK(counters.numel() >= slices * n_tiles && slots.numel() >= slices * 2 * kSlotFloats,
               "marlin: the workspace (", counters.numel(), " counters, ", slots.numel(),
               " slot floats) is too small for M=", M, " on this layer (", slices * n_tiles,
               " counters, at least ", slices * 2 * kSlotFloats, " floats); prepare the layer "
               "for this many rows");
  const int occ = occupancy(device, dtype, static_cast<int>(bits), m_blocks, zeros.has_value(),
                            static_cast<int>(kind));
  const int64_t total = n_tiles * (K / kTileK) / kernel_traits(static_cast<int>(kind)).stage_tiles;
  int64_t workers = std::max<int64_t>(1, int64_t{sms} * occ / slices);
  workers = std::min<int64_t>(workers, std::max<int64_t>(1, total / kMinStagesPerWorker));
  // As many as the workspace holds (it is sized for every SM's blocks: the same number).
  workers = std::min<int64_t>(workers, slots.numel() / (2 * kSlotFloats) / slices);

  GemmArgs args{};
  args.a = A.data_ptr();
  args.b = b.data_ptr();
  args.scales = scales.data_ptr();
  args.zeros = zeros.has_value() ? zeros->data_ptr() : nullptr;
  args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  args.c = out.data_ptr();
  args.slots = slots.data_ptr<float>();
  args.counters = counters.data_ptr<int>();
  args.m = static_cast<int>(M);
  args.n = static_cast<int>(N);
  args.k = static_cast<int>(K);
  args.bits = static_cast<int>(bits);
  args.group_shift = group_shift(group_size, K);
  args.m_blocks = m_blocks;
  args.slices = static_cast<int>(slices);
  args.workers = static_cast<int>(workers);
  args.evict_first = slices == 1 ? 1 : 0;  // several slices re-read the weights from L2
  args.kind = static_cast<int>(kind);
  const cudaError_t err = gemm_launch(dtype, args, c10::cuda::getCurrentCUDAStream());
  MARLIN_CHECK(err == cudaSuccess, "marlin: gemm launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace gptq_marlin

// The direct entry point of the eager hot path (docs/DESIGN.md §11): the same function as the
// custom op, called through pybind11 without the dispatcher's argument boxing. plugin.py takes
// it only when nothing traces or records the call (gptq_core.tracing.plain_eager).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gptq_marlin::gemm, "marlin GEMM (the gptq_marlin::gemm op without the dispatcher)");
}

TORCH_LIBRARY_IMPL(gptq_marlin, CUDA, m) {
  m.impl("gemm", &gptq_marlin::gemm);
  m.impl("dequantize", &gptq_marlin::dequantize);
  m.impl("gather_cols", &gptq_marlin::gather_cols);
}
