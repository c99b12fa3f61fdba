// gptq_cpu::qmatmul on the CPU: y = x @ W.T (+ bias) from the cpu backend's prepared layout
// (layout.py). One body (qgemm_body.h) is compiled for AVX-512, AVX2 and plain C++; the
// widest the running CPU supports is chosen once, at load. Columns blocks of 64 are split
// over threads with at::parallel_for. The schema and the fake implementation are defined in
// Python (ops.py); `kind` is the path the layer's dispatch policy chose (docs/DESIGN.md §12).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace gptq_cpu {

constexpr int BLOCK_N = 64;   // columns per block (layout.py BLOCK_N)
constexpr int KC = 128;       // rows dequantized at once by the gemm path
constexpr int64_t KIND_GEMV = 0;
constexpr int64_t KIND_GEMM = 1;

struct Args {
  const float* x;        // [M, K] fp32, columns in the weight's sorted order
  const uint8_t* qdata;  // [NB, units, 64]
  const float* scales;   // [NB, S, 64]
  const float* zeros;    // [NB, S, 64] or null (symmetric: sym_zero)
  const int32_t* segs;   // [S, 4]: x start, rows, unit offset, group
  const float* bias;     // [N] or null
  float* y;              // [M, N] fp32
  int64_t M, K, N, units, segments, vals_per_byte, kind;
  float sym_zero;
};

using BlockFn = void (*)(const Args&, int64_t, int64_t, float*, float*);

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace avx512 {
constexpr int W = 16;
constexpr int MR = 6;
#define SPLAT(v) ((VF)_mm512_set1_ps(v))
#define LOAD_BYTES(p) ((VI)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))
#include "qgemm_body.h"
#undef LOAD_BYTES
#undef SPLAT
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int W = 8;
constexpr int MR = 1;
#define SPLAT(v) ((VF)_mm256_set1_ps(v))
#define LOAD_BYTES(p) ((VI)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))
#include "qgemm_body.h"
#undef LOAD_BYTES
#undef SPLAT
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace generic {
constexpr int W = 4;
constexpr int MR = 2;
#define SPLAT(v) (VF{(v), (v), (v), (v)})
#define LOAD_BYTES(p) (VI{(p)[0], (p)[1], (p)[2], (p)[3]})
#include "qgemm_body.h"
#undef LOAD_BYTES
#undef SPLAT
}  // namespace generic

struct Isa {
  BlockFn fn;
  const char* name;
};

static bool supported(const std::string& name) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return name == "generic";
}

static Isa by_name(const std::string& name) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (name == "avx512") return {avx512::run_blocks, "avx512"};
  if (name == "avx2") return {avx2::run_blocks, "avx2"};
#endif
  return {generic::run_blocks, "generic"};
}

static Isa& isa() {
  static Isa chosen = by_name(supported("avx512") ? "avx512" : supported("avx2") ? "avx2" : "generic");
  return chosen;
}

// Column blocks per task: enough weights per task that a thread's start-up is paid back
// (small layers, e.g. stories260K's, run on the calling thread).
static int64_t grain(int64_t K, int64_t M) {
  const int64_t per_block = K * BLOCK_N * (M < 4 ? M : 4);
  const int64_t want = int64_t(1) << 18;
  return per_block >= want ? 1 : (want + per_block - 1) / per_block;
}

// Checks of the prepared layout, the same for the op and for an EagerLayer (made once).
static void check_layout(const at::Tensor& qdata, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, const at::Tensor& segs,
                         int64_t vals_per_byte, int64_t out_features) {
  TORCH_CHECK(qdata.dtype() == at::kByte && qdata.dim() == 3 && qdata.size(2) == BLOCK_N &&
                  qdata.is_contiguous(),
              "gptq_cpu::qmatmul: qdata must be contiguous uint8 [NB, units, 64]");
  TORCH_CHECK(scales.dtype() == at::kFloat && scales.is_contiguous() && scales.dim() == 3,
              "gptq_cpu::qmatmul: scales must be contiguous float32 [NB, S, 64]");
  TORCH_CHECK(segs.dtype() == at::kInt && segs.is_contiguous() && segs.dim() == 2 &&
                  segs.size(1) == 4 && segs.size(0) == scales.size(1),
              "gptq_cpu::qmatmul: segs must be contiguous int32 [S, 4]");
  TORCH_CHECK(vals_per_byte == 1 || vals_per_byte == 2 || vals_per_byte == 4,
              "gptq_cpu::qmatmul: vals_per_byte must be 1, 2 or 4, got ", vals_per_byte);
  const int64_t NB = qdata.size(0);
  TORCH_CHECK(out_features > 0 && (out_features + BLOCK_N - 1) / BLOCK_N == NB &&
                  scales.size(0) == NB,
              "gptq_cpu::qmatmul: out_features does not match the prepared blocks");
  if (zeros.has_value())
    TORCH_CHECK(zeros->dtype() == at::kFloat && zeros->is_contiguous() &&
                    zeros->sizes() == scales.sizes(),
                "gptq_cpu::qmatmul: zeros must be contiguous float32 like scales");
}

// y[M, N] (returned with the sizes `out_sizes`, M * N elements) for a [M, K] x of any
// strides and float dtype; the layout is already checked.
static at::Tensor run(const at::Tensor& x_in, const at::Tensor& qdata, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, const at::Tensor& segs,
                      const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& bias,
                      int64_t vals_per_byte, double sym_zero, int64_t out_features, int64_t kind,
                      at::IntArrayRef out_sizes) {
  const int64_t M = x_in.size(0), K = x_in.size(1);
  at::Tensor x = x_in.scalar_type() == at::kFloat ? x_in : x_in.to(at::kFloat);
  if (perm.has_value()) x = x.index_select(1, *perm);
  x = x.contiguous();
  at::Tensor bf;
  if (bias.has_value()) {
    bf = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bf.numel() == out_features, "gptq_cpu::qmatmul: bias must have N elements");
  }
  at::Tensor y = at::empty(out_sizes, x.options());
  if (M == 0) return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());

  Args a{x.data_ptr<float>(), qdata.data_ptr<uint8_t>(), scales.data_ptr<float>(),
         zeros.has_value() ? zeros->data_ptr<float>() : nullptr, segs.data_ptr<int32_t>(),
         bf.defined() ? bf.data_ptr<float>() : nullptr, y.data_ptr<float>(),
         M, K, out_features, qdata.size(1), segs.size(0), vals_per_byte, kind,
         static_cast<float>(sym_zero)};
  const BlockFn fn = isa().fn;
  at::parallel_for(0, qdata.size(0), grain(K, M), [&](int64_t b0, int64_t b1) {
    std::vector<float> buf, ct;
    if (a.kind == KIND_GEMM) {
      buf.resize((KC + 4) * BLOCK_N);
      ct.resize(M * BLOCK_N);
    }
    fn(a, b0, b1, buf.data(), ct.data());
  });
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

at::Tensor qmatmul(const at::Tensor& x_in, const at::Tensor& qdata, const at::Tensor& scales,
                   const std::optional<at::Tensor>& zeros, const at::Tensor& segs,
                   const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& bias,
                   int64_t vals_per_byte, double sym_zero, int64_t out_features, int64_t kind) {
  TORCH_CHECK(x_in.dim() == 2, "gptq_cpu::qmatmul: x must be [M, K], got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "gptq_cpu::qmatmul: x must be on the CPU");
  TORCH_CHECK(kind == KIND_GEMV || kind == KIND_GEMM, "gptq_cpu::qmatmul: unknown kind ", kind);
  check_layout(qdata, scales, zeros, segs, vals_per_byte, out_features);
  return run(x_in, qdata, scales, zeros, segs, perm, bias, vals_per_byte, sym_zero, out_features,
             kind, {x_in.size(0), out_features});
}

// One layer's layout bound once, for plainly eager calls (plugin.py): the layout is checked
// here, not per call, and a call takes x of any leading dimensions ([..., K] -> [..., N]), so
// the Python side passes one tensor and reshapes nothing. A stories260K-sized layer's call
// costs about as much as its arithmetic; argument conversion and views were most of it.
struct EagerLayer {
  at::Tensor qdata, scales, segs;
  std::optional<at::Tensor> zeros, perm;
  int64_t vals_per_byte, in_features, out_features, gemm_above;
  double sym_zero;

  EagerLayer(at::Tensor qdata_, at::Tensor scales_, std::optional<at::Tensor> zeros_,
             at::Tensor segs_, std::optional<at::Tensor> perm_, int64_t vals_per_byte_,
             double sym_zero_, int64_t in_features_, int64_t out_features_, int64_t gemm_above_)
      : qdata(std::move(qdata_)), scales(std::move(scales_)), segs(std::move(segs_)),
        zeros(std::move(zeros_)), perm(std::move(perm_)), vals_per_byte(vals_per_byte_),
        in_features(in_features_), out_features(out_features_), gemm_above(gemm_above_),
        sym_zero(sym_zero_) {
    check_layout(qdata, scales, zeros, segs, vals_per_byte, out_features);
    TORCH_CHECK(in_features > 0, "gptq_cpu::EagerLayer: in_features must be positive");
    TORCH_CHECK(!perm.has_value() || (perm->dtype() == at::kLong && perm->numel() == in_features),
                "gptq_cpu::EagerLayer: perm must be int64 [K]");
  }

  at::Tensor call(const at::Tensor& x, const std::optional<at::Tensor>& bias) const {
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "gptq_cpu::EagerLayer: x must be [..., ",
                in_features, "], got ", x.sizes());
    TORCH_CHECK(x.device().is_cpu(), "gptq_cpu::EagerLayer: x must be on the CPU");
    const auto dtype = x.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                "gptq_cpu::EagerLayer: x must be float32, float16 or bfloat16");
    const int64_t M = x.numel() / in_features;
    c10::SmallVector<int64_t, 4> sizes(x.sizes().begin(), x.sizes().end());
    sizes.back() = out_features;
    return run(x.dim() == 2 ? x : x.reshape({M, in_features}), qdata, scales, zeros, segs, perm,
               bias, vals_per_byte, sym_zero, out_features, M <= gemm_above ? KIND_GEMV : KIND_GEMM,
               sizes);
  }
};

std::string isa_name() { return isa().name; }

// Tests only: run another compiled body that this CPU supports (each is checked against the
// float64 reference on one machine); returns the previous one. Not thread-safe with calls.
std::string use_isa(const std::string& name) {
  TORCH_CHECK(supported(name), "gptq_cpu: instruction set '", name,
              "' is not compiled in or not supported by this CPU (avx512, avx2, generic)");
  std::string previous = isa().name;
  isa() = by_name(name);
  return previous;
}

}  // namespace gptq_cpu

TORCH_LIBRARY_IMPL(gptq_cpu, CPU, m) { m.impl("qmatmul", &gptq_cpu::qmatmul); }

// The same function without the dispatcher, for eager calls (plugin.py): a tiny layer's call
// costs about as much as its arithmetic, and the dispatcher's argument parsing is most of it.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmatmul", &gptq_cpu::qmatmul, "gptq_cpu::qmatmul without the dispatcher");
  using gptq_cpu::EagerLayer;
  py::class_<EagerLayer>(m, "EagerLayer", "One prepared layer bound for eager calls: y = layer(x, bias)")
      .def(py::init<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor,
                    std::optional<at::Tensor>, int64_t, double, int64_t, int64_t, int64_t>(),
           py::arg("qdata"), py::arg("scales"), py::arg("zeros"), py::arg("segs"), py::arg("perm"),
           py::arg("vals_per_byte"), py::arg("sym_zero"), py::arg("in_features"),
           py::arg("out_features"), py::arg("gemm_above"))
      .def("__call__", &EagerLayer::call, py::arg("x"), py::arg("bias") = py::none())
      .def_readonly("gemm_above", &EagerLayer::gemm_above)
      // copy.deepcopy of a prepared object rebuilds it from its (copied) fields
      .def(py::pickle(
          [](const EagerLayer& l) {
            return py::make_tuple(l.qdata, l.scales, l.zeros, l.segs, l.perm, l.vals_per_byte,
                                  l.sym_zero, l.in_features, l.out_features, l.gemm_above);
          },
          [](const py::tuple& t) {
            TORCH_CHECK(t.size() == 10, "gptq_cpu::EagerLayer: bad pickled state");
            return EagerLayer(t[0].cast<at::Tensor>(), t[1].cast<at::Tensor>(),
                              t[2].cast<std::optional<at::Tensor>>(), t[3].cast<at::Tensor>(),
                              t[4].cast<std::optional<at::Tensor>>(), t[5].cast<int64_t>(),
                              t[6].cast<double>(), t[7].cast<int64_t>(), t[8].cast<int64_t>(),
                              t[9].cast<int64_t>());
          }));
}

// The instruction set the kernels run with (the probe and `gptq backends list` report it).
TORCH_LIBRARY_FRAGMENT(gptq_cpu_info, m) {
  m.def("isa() -> str", &gptq_cpu::isa_name);
  m.def("use_isa(str name) -> str", &gptq_cpu::use_isa);
}
