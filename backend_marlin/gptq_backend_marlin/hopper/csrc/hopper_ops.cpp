// The torch binding of the Hopper GEMM: argument checks, then hopper.h's launchers. Output and
// split-K workspace are allocated by the caller (ops.py), and the stream comes in as its raw
// handle, so this file needs only torch/extension.h (no ATen CUDA headers).
#include <torch/extension.h>

#include <cstdint>
#include <string>

#include "hopper.h"

namespace {

void check_cuda(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "hopper_gemm: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "hopper_gemm: ", name, " must be contiguous");
}

void raise_on(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "hopper_gemm: ", what, " failed: ", cudaGetErrorString(err));
}

// y [M, N] = x [M, K] . W; ws: fp32 [splits, M, N] when splits > 1.
void gemm(const torch::Tensor& x, const torch::Tensor& tiles, const torch::Tensor& scales,
          const c10::optional<torch::Tensor>& zeros, torch::Tensor& y, const c10::optional<torch::Tensor>& ws,
          int64_t group_size, int64_t bm, int64_t splits, int64_t stream_handle) {
  check_cuda(x, "x");
  check_cuda(tiles, "tiles");
  check_cuda(scales, "scales");
  check_cuda(y, "y");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "hopper_gemm: x and y must be 2-D");
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == torch::kHalf, "hopper_gemm: x must be float16 or bfloat16");
  TORCH_CHECK(scales.scalar_type() == x.scalar_type() && y.scalar_type() == x.scalar_type(),
              "hopper_gemm: scales and y must have x's dtype");
  TORCH_CHECK(tiles.scalar_type() == torch::kInt32, "hopper_gemm: tiles must be int32");
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  TORCH_CHECK(y.size(0) == M, "hopper_gemm: y has ", y.size(0), " rows, x ", M);
  TORCH_CHECK(tiles.numel() * 8 == K * N, "hopper_gemm: tiles hold ", tiles.numel() * 8, " weights, not K*N=", K * N);
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == N, "hopper_gemm: scales must be [G, N]");
  const void* zp = nullptr;
  if (zeros.has_value()) {
    check_cuda(*zeros, "zeros");
    TORCH_CHECK(zeros->sizes() == scales.sizes() && zeros->scalar_type() == x.scalar_type(),
                "hopper_gemm: zeros must be like scales");
    zp = zeros->data_ptr();
  }
  float* wsp = nullptr;
  if (splits > 1) {
    TORCH_CHECK(ws.has_value(), "hopper_gemm: splits > 1 needs a workspace");
    check_cuda(*ws, "ws");
    TORCH_CHECK(ws->scalar_type() == torch::kFloat32 && ws->numel() >= splits * M * N,
                "hopper_gemm: ws must be float32 with splits*M*N elements");
    wsp = ws->data_ptr<float>();
  }
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  auto launch = bf16 ? gptq_hopper::launch_bf16 : gptq_hopper::launch_f16;
  raise_on(launch(x.data_ptr(), tiles.data_ptr(), scales.data_ptr(), zp, y.data_ptr(), wsp,
                  static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<int>(group_size),
                  static_cast<int>(bm), static_cast<int>(splits), stream),
           "the GEMM launch");
  if (splits > 1) {
    raise_on(gptq_hopper::launch_reduce(wsp, y.data_ptr(), static_cast<int>(M), static_cast<int>(N),
                                        static_cast<int>(splits), bf16, stream),
             "the split-K reduction");
  }
}

// Blocks per SM of the kernel ops.py would launch for token tile bm (the split plan's slots).
int64_t blocks_per_sm(int64_t bm, bool bf16, bool zp) {
  int blocks = 0;
  auto query = bf16 ? gptq_hopper::occupancy_bf16 : gptq_hopper::occupancy_f16;
  raise_on(query(static_cast<int>(bm), zp, &blocks), "the occupancy query");
  return blocks;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "Hopper wgmma 4-bit GPTQ GEMM (y written in place)", py::arg("x"), py::arg("tiles"),
        py::arg("scales"), py::arg("zeros"), py::arg("y"), py::arg("ws"), py::arg("group_size"), py::arg("bm"),
        py::arg("splits"), py::arg("stream"));
  m.def("blocks_per_sm", &blocks_per_sm, "blocks of one token tile's kernel that fit on an SM", py::arg("bm"),
        py::arg("bf16"), py::arg("zp"));
}
