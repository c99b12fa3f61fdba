// Torch binding of the cuda backend's kernels: CUDA implementations of the ops that ops.py
// defines (gptq_cuda::gemm, gptq_cuda::dequantize), with argument checks that say what is wrong.
// Messages are built as one std::string (no ostream in TORCH_CHECK: see backend_marlin's
// marlin_ops.cpp for why).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>

#include "cuda_kernels.h"
#include "gptq_check.h"

namespace gptq_cuda {
namespace {

// Messages are one std::string made by gptq_check::msg (gptq_core/csrc/gptq_check.h says why).
using ::gptq_check::msg;
#define CUDA_GPTQ_CHECK(cond, ...) GPTQ_CHECK(cond, __VA_ARGS__)

constexpr int64_t kSmemLimit = 48 * 1024;  // policy.py SMEM_DEFAULT_LIMIT

int dtype_code(at::ScalarType t) {
  if (t == at::kHalf) return kF16;
  if (t == at::kBFloat16) return kBF16;
  CUDA_GPTQ_CHECK(false, "gptq_cuda: activations must be float16 or bfloat16, got ", t);
  return -1;
}

struct Shape {
  int64_t units, strips, n_pad, groups_pad, group_steps;
};

// The prepared tensors against the layer's bits, group size, K and N (layout.py, prepare.py).
Shape check_weights(const at::Tensor& qweight, const std::optional<at::Tensor>& qhigh,
                    const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                    const std::optional<at::Tensor>& perm, int64_t bits, int64_t group_size,
                    int64_t k, int64_t n) {
  CUDA_GPTQ_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8,
                  "gptq_cuda: bits must be 2, 3, 4 or 8, got ", bits);
  CUDA_GPTQ_CHECK(group_size == -1 || (group_size > 0 && group_size % kStepK == 0),
                  "gptq_cuda: group size must be -1 or a multiple of 16, got ", group_size);
  CUDA_GPTQ_CHECK(k > 0 && n > 0 && k < (int64_t{1} << 30) && n < (int64_t{1} << 30),
                  "gptq_cuda: K=", k, " and N=", n, " must be positive and below 2^30");
  const int64_t uk = unit_k(static_cast<int>(bits));
  Shape s{};
  s.units = (k + uk - 1) / uk;
  s.strips = (n + kStripN - 1) / kStripN;
  s.n_pad = s.strips * kStripN;
  s.groups_pad = group_size == -1 ? 1 : (s.units * uk + group_size - 1) / group_size;
  s.group_steps = group_size == -1 ? 0 : group_size / kStepK;
  CUDA_GPTQ_CHECK(qweight.is_cuda() && qweight.scalar_type() == at::kInt && qweight.is_contiguous() &&
                      qweight.numel() == s.strips * s.units * 32 * 4,
                  "gptq_cuda: qweight must be the contiguous int32 [", s.strips, ", ", s.units,
                  ", 32, 4] layout of gptq_backend_cuda.layout.repack, got ", qweight.sizes());
  if (bits == 3) {
    CUDA_GPTQ_CHECK(qhigh.has_value() && qhigh->scalar_type() == at::kInt && qhigh->is_contiguous() &&
                        qhigh->numel() == s.strips * s.units * 32 * 2 && qhigh->device() == qweight.device(),
                    "gptq_cuda: 3-bit weights need their contiguous int32 [", s.strips, ", ", s.units,
                    ", 32, 2] third-bit plane (qhigh) on the weights' device");
  }
  CUDA_GPTQ_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2 &&
                      scales.size(0) == s.groups_pad && scales.size(1) == s.n_pad &&
                      scales.is_contiguous() && scales.device() == qweight.device(),
                  "gptq_cuda: scales must be a contiguous float16 [", s.groups_pad, ", ", s.n_pad,
                  "] tensor on the weights' device, got ", scales.scalar_type(), " ", scales.sizes());
  if (zeros.has_value()) {
    CUDA_GPTQ_CHECK(zeros->sizes() == scales.sizes() && zeros->is_contiguous() &&
                        zeros->device() == qweight.device(),
                    "gptq_cuda: zeros must match scales in shape and device");
  }
  if (perm.has_value()) {
    CUDA_GPTQ_CHECK(perm->scalar_type() == at::kInt && perm->dim() == 1 && perm->size(0) == k &&
                        perm->is_contiguous() && perm->device() == qweight.device(),
                    "gptq_cuda: perm must be a contiguous int32 [", k, "] tensor on the weights' device");
  }
  return s;
}

cudaError_t gemv_launch(int bits, int dtype, int kind, bool zeros, const GemvArgs& args, int slices,
                        int smem, cudaStream_t stream) {
  switch (bits) {
    case 2: return gemv_launch_b2(dtype, kind, zeros, args, slices, smem, stream);
    case 3: return gemv_launch_b3(dtype, kind, zeros, args, slices, smem, stream);
    case 4: return gemv_launch_b4(dtype, kind, zeros, args, slices, smem, stream);
    default: return gemv_launch_b8(dtype, kind, zeros, args, slices, smem, stream);
  }
}

at::Tensor dequantize_impl(const at::Tensor& qweight, const std::optional<at::Tensor>& qhigh,
                           const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                           const std::optional<at::Tensor>& perm, const Shape& s, int64_t bits,
                           int64_t k, int64_t n, at::ScalarType dtype) {
  const int code = dtype_code(dtype);
  if (zeros.has_value()) {
    CUDA_GPTQ_CHECK(zeros->scalar_type() == dtype, "gptq_cuda: zeros were prepared for ",
                    zeros->scalar_type(), " activations, not ", dtype);
  }
  auto w = at::empty({n, k}, scales.options().dtype(dtype));
  DequantArgs args{};
  args.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr());
  args.qhigh = qhigh.has_value() ? reinterpret_cast<const uint32_t*>(qhigh->data_ptr()) : nullptr;
  args.scales = scales.data_ptr();
  args.zeros = zeros.has_value() ? zeros->data_ptr() : nullptr;
  args.perm = perm.has_value() ? perm->data_ptr<int>() : nullptr;
  args.w = w.data_ptr();
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.n_pad = static_cast<int>(s.n_pad);
  args.units = static_cast<int>(s.units);
  args.strips = static_cast<int>(s.strips);
  args.group_steps = static_cast<int>(s.group_steps);
  args.groups_pad = static_cast<int>(s.groups_pad);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  switch (bits) {
    case 2: err = dequant_launch_b2(code, zeros.has_value(), args, stream); break;
    case 3: err = dequant_launch_b3(code, zeros.has_value(), args, stream); break;
    case 4: err = dequant_launch_b4(code, zeros.has_value(), args, stream); break;
    default: err = dequant_launch_b8(code, zeros.has_value(), args, stream); break;
  }
  CUDA_GPTQ_CHECK(err == cudaSuccess, "gptq_cuda: dequantize launch failed: ", cudaGetErrorString(err));
  return w;
}

}  // namespace

// The dense [n, k] weight in `dtype` and the original k order.
at::Tensor dequantize(const at::Tensor& qweight, const std::optional<at::Tensor>& qhigh,
                      const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                      const std::optional<at::Tensor>& perm, int64_t bits, int64_t group_size,
                      int64_t size_k, int64_t size_n, at::ScalarType dtype) {
  const Shape s = check_weights(qweight, qhigh, scales, zeros, perm, bits, group_size, size_k, size_n);
  c10::cuda::CUDAGuard guard(qweight.device());
  return dequantize_impl(qweight, qhigh, scales, zeros, perm, s, bits, size_k, size_n, dtype);
}

// y = x @ W (+ bias): decode kernel `kind` with K cut into splits of `units_per_split` units,
// or dequantize + cuBLAS (kDequantCublas). The split-K workspace is the caller's (partials:
// fp32 scratch; counters: int32 zeros that every call leaves at zero), so a call allocates
// nothing that outlives it (CUDA-graph capture); calls sharing it run in stream order.
at::Tensor gemm(const at::Tensor& x, const at::Tensor& qweight, const std::optional<at::Tensor>& qhigh,
                const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& bias,
                const at::Tensor& partials, const at::Tensor& counters, int64_t bits,
                int64_t group_size, int64_t size_n, int64_t kind, int64_t units_per_split) {
  CUDA_GPTQ_CHECK(x.is_cuda() && x.dim() == 2, "gptq_cuda: x must be a 2-D CUDA tensor, got ", x.sizes());
  CUDA_GPTQ_CHECK(x.device() == qweight.device(), "gptq_cuda: activations and weights are on different devices");
  const int dtype = dtype_code(x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = size_n;
  const Shape s = check_weights(qweight, qhigh, scales, zeros, perm, bits, group_size, K, N);
  if (zeros.has_value()) {
    CUDA_GPTQ_CHECK(zeros->scalar_type() == x.scalar_type(), "gptq_cuda: the weights were prepared for ",
                    zeros->scalar_type(), " activations but got ", x.scalar_type(), "; bind the layer for this dtype");
  }
  if (bias.has_value()) {
    CUDA_GPTQ_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->device() == x.device() &&
                        bias->scalar_type() == at::kHalf && bias->is_contiguous(),
                    "gptq_cuda: bias must be a contiguous float16 [N] tensor on the activations' device");
  }
  CUDA_GPTQ_CHECK(kind >= 0 && kind <= kDequantCublas, "gptq_cuda: kernel kind ", kind,
                  " does not exist (0..", static_cast<int>(kDequantCublas), ")");
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const at::Tensor A = x.contiguous();

  if (kind == kDequantCublas) {
    // The scratch weight is freed at return; it is in the original k order (no gather of x).
    const at::Tensor w = dequantize_impl(qweight, qhigh, scales, zeros, perm, s, bits, K, N, x.scalar_type());
    at::mm_out(out, A, w.t());
    if (bias.has_value()) out.add_(*bias);
    return out;
  }

  CUDA_GPTQ_CHECK(units_per_split > 0, "gptq_cuda: units_per_split must be positive, got ", units_per_split);
  const int rows = rows_per_slice(static_cast<int>(kind));
  const int64_t slices = (M + rows - 1) / rows;
  const int64_t splits = (s.units + units_per_split - 1) / units_per_split;
  const int64_t span = units_per_split * unit_k(static_cast<int>(bits));
  const int64_t x_stride = (span + 63) / 64 * 64 + 16;  // policy.x_row_stride
  const int64_t smem = std::min<int64_t>(M, rows) * x_stride * 2;
  CUDA_GPTQ_CHECK(smem <= kSmemLimit, "gptq_cuda: a split of ", units_per_split, " units needs ", smem,
                  " bytes of shared memory for ", std::min<int64_t>(M, rows), " rows (at most ", kSmemLimit,
                  "); prepare the layer again (its policy plans the split)");
  CUDA_GPTQ_CHECK(slices < 65536 && splits < 65536, "gptq_cuda: M=", M, " is too large for the decode kernel");
  const int64_t n_blocks = (s.strips + kWarps - 1) / kWarps;
  if (splits > 1) {
    CUDA_GPTQ_CHECK(partials.scalar_type() == at::kFloat && partials.device() == x.device() &&
                        partials.numel() >= slices * splits * rows * s.n_pad &&
                        counters.scalar_type() == at::kInt && counters.device() == x.device() &&
                        counters.numel() >= slices * n_blocks,
                    "gptq_cuda: the split-K workspace (", partials.numel(), " floats, ", counters.numel(),
                    " counters) is too small for M=", M, " (", slices * splits * rows * s.n_pad, ", ",
                    slices * n_blocks, "); prepare the layer for this many rows");
  }
  const bool vector = perm.has_value() == false && K % 8 == 0 &&
                      reinterpret_cast<uintptr_t>(A.data_ptr()) % 16 == 0;
  GemvArgs args{};
  args.x = A.data_ptr();
  args.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr());
  args.qhigh = qhigh.has_value() ? reinterpret_cast<const uint32_t*>(qhigh->data_ptr()) : nullptr;
  args.scales = scales.data_ptr();
  args.zeros = zeros.has_value() ? zeros->data_ptr() : nullptr;
  args.perm = perm.has_value() ? perm->data_ptr<int>() : nullptr;
  args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  args.y = out.data_ptr();
  args.partials = partials.data_ptr<float>();
  args.counters = counters.data_ptr<int>();
  args.m = static_cast<int>(M);
  args.n = static_cast<int>(N);
  args.k = static_cast<int>(K);
  args.n_pad = static_cast<int>(s.n_pad);
  args.units = static_cast<int>(s.units);
  args.strips = static_cast<int>(s.strips);
  args.group_steps = static_cast<int>(s.group_steps);
  args.groups_pad = static_cast<int>(s.groups_pad);
  args.units_per_split = static_cast<int>(units_per_split);
  args.splits = static_cast<int>(splits);
  args.x_stride = static_cast<int>(x_stride);
  args.x_vector = vector ? 1 : 0;
  const cudaError_t err = gemv_launch(static_cast<int>(bits), dtype, static_cast<int>(kind), zeros.has_value(),
                                      args, static_cast<int>(slices), static_cast<int>(smem),
                                      c10::cuda::getCurrentCUDAStream());
  CUDA_GPTQ_CHECK(err == cudaSuccess, "gptq_cuda: gemm launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace gptq_cuda

TORCH_LIBRARY_IMPL(gptq_cuda, CUDA, m) {
  m.impl("gemm", &gptq_cuda::gemm);
  m.impl("dequantize", &gptq_cuda::dequantize);
}
