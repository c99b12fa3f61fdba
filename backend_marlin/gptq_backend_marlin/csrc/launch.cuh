// Host side of the kernels: each kind's shared memory and occupancy, the run-time dispatch of
// (kind, row blocks, zero points) to the instantiated kernels, and the per-(bits, dtype) entry
// points that the marlin_<dtype>_b<bits>.cu files instantiate (one file each: parallel builds).
#pragma once
#include <type_traits>

#include "dequant.cuh"
#include "kernels.h"
#include "marlin.h"
#include "pipeline.cuh"
#include "stage.cuh"

namespace gptq_marlin {

// The kernel of each kind (kernels.h) and its dynamic shared memory.
template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS, int KIND>
struct Variant {
  static constexpr KernelTraits kTraits = kernel_traits(KIND);
  static constexpr int kSmem =
      Smem<BITS, M_BLOCKS, kTraits.copy == CopyEngine::kBulk, kTraits.stage_tiles>::kTotal;
  static auto kernel() { return gemm_kernel<BITS, T, M_BLOCKS, HAS_ZEROS, KIND>; }
  // Raise the kernel's shared-memory limit, once per device (bit per device 0..63).
  static cudaError_t configure() {
    static unsigned long long configured = 0;
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const unsigned long long bit = 1ull << (device & 63);
    if (configured & bit) return cudaSuccess;
    err = cudaFuncSetAttribute(kernel(), cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err == cudaSuccess) configured |= bit;
    return err;
  }
};

template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS, int KIND>
cudaError_t occupancy_variant(int* blocks_per_sm) {
  using V = Variant<BITS, T, M_BLOCKS, HAS_ZEROS, KIND>;
  const cudaError_t err = V::configure();
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, V::kernel(), kThreads, V::kSmem);
}

template <int BITS, typename T, int M_BLOCKS, bool HAS_ZEROS, int KIND>
cudaError_t launch_variant(const GemmArgs& args, cudaStream_t stream) {
  using V = Variant<BITS, T, M_BLOCKS, HAS_ZEROS, KIND>;
  const cudaError_t err = V::configure();
  if (err != cudaSuccess) return err;
  V::kernel()<<<args.workers * args.slices, kThreads, V::kSmem, stream>>>(args);
  return cudaGetLastError();
}

// The compile-time value of a std::integral_constant argument of a generic lambda.
#define GPTQ_MARLIN_VALUE(x) std::decay_t<decltype(x)>::value

// f(std::integral_constant<int, KIND>, std::integral_constant<int, M_BLOCKS>, std::bool_constant
// <HAS_ZEROS>) for the run-time kind, row blocks and zero-point flag, over the variants that
// exist; cudaErrorInvalidValue for any other combination.
template <int BITS, typename F>
cudaError_t with_variant(int kind, int m_blocks, bool has_zeros, F&& f) {
  auto rows = [&](auto k) -> cudaError_t {
    auto pick = [&](auto mb) -> cudaError_t {
      if constexpr (GPTQ_MARLIN_VALUE(mb) <= built_m_blocks(GPTQ_MARLIN_VALUE(k), BITS)) {
        return has_zeros ? f(k, mb, std::true_type{}) : f(k, mb, std::false_type{});
      } else {
        return cudaErrorInvalidValue;
      }
    };
    switch (m_blocks) {
      case 1: return pick(std::integral_constant<int, 1>{});
      case 2: return pick(std::integral_constant<int, 2>{});
      case 3: return pick(std::integral_constant<int, 3>{});
      case 4: return pick(std::integral_constant<int, 4>{});
      default: return cudaErrorInvalidValue;
    }
  };
  switch (kind) {
    case kNarrow: return rows(std::integral_constant<int, kNarrow>{});
    case kWide: return rows(std::integral_constant<int, kWide>{});
    case kWide4: return rows(std::integral_constant<int, kWide4>{});
    case kWideSwap: return rows(std::integral_constant<int, kWideSwap>{});
    case kWide4Swap: return rows(std::integral_constant<int, kWide4Swap>{});
    case kTma: return rows(std::integral_constant<int, kTma>{});
    default: return cudaErrorInvalidValue;
  }
}

// The per-(bits, dtype) entry points each instantiation file defines.
template <int BITS, typename T>
cudaError_t occupancy_t(int m_blocks, bool has_zeros, int kind, int* blocks_per_sm) {
  return with_variant<BITS>(kind, m_blocks, has_zeros, [&](auto k, auto mb, auto z) {
    return occupancy_variant<BITS, T, GPTQ_MARLIN_VALUE(mb), GPTQ_MARLIN_VALUE(z), GPTQ_MARLIN_VALUE(k)>(
        blocks_per_sm);
  });
}

// args.kind picks the kernel (marlin_ops.cpp).
template <int BITS, typename T>
cudaError_t launch_t(const GemmArgs& args, cudaStream_t stream) {
  return with_variant<BITS>(args.kind, args.m_blocks, args.zeros != nullptr, [&](auto k, auto mb, auto z) {
    return launch_variant<BITS, T, GPTQ_MARLIN_VALUE(mb), GPTQ_MARLIN_VALUE(z), GPTQ_MARLIN_VALUE(k)>(
        args, stream);
  });
}

template <int BITS, typename T>
cudaError_t dequant_t(const DequantArgs& args, cudaStream_t stream) {
  const long long tiles = static_cast<long long>(args.n / kWarpN) * (args.k / kTileK);
  const long long blocks = (tiles + kWarps - 1) / kWarps;
  if (blocks == 0) return cudaSuccess;
  dequant_kernel<BITS, T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

#define GPTQ_MARLIN_INSTANTIATE(BITS, T)                                                    \
  template cudaError_t occupancy_t<BITS, T>(int, bool, int, int*);                                \
  template cudaError_t launch_t<BITS, T>(const GemmArgs&, cudaStream_t);                    \
  template cudaError_t dequant_t<BITS, T>(const DequantArgs&, cudaStream_t);

}  // namespace gptq_marlin
