// Argument-check messages for the torch bindings of gptq-core's compiled backends (the
// *_ops.cpp files; docs/DESIGN.md §10: bad input gets one clear error naming the problem).
// gptq_core.jit puts this folder on every such extension's include path.
//
// Messages are built here as one std::string, without iostreams: on an H100 (torch 2.11,
// CUDA 13) a TORCH_CHECK whose message streamed a number, sizes or a device killed the process
// with SIGSEGV instead of raising, while one that streamed only text raised cleanly
// (backend_marlin's NOTES/perf-marlin.md, "The SIGSEGV on a bad argument"). TORCH_CHECK with a
// single std::string argument does not touch an ostream, so GPTQ_CHECK passes one made by msg().
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace gptq_check {

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(int64_t v) { return std::to_string(v); }
inline std::string piece(int v) { return std::to_string(v); }
inline std::string piece(at::ScalarType t) { return c10::toString(t); }
inline std::string piece(c10::Device d) {
  std::string s = d.is_cuda() ? "cuda" : d.is_cpu() ? "cpu" : "device type " + std::to_string(static_cast<int>(d.type()));
  return d.has_index() ? s + ":" + std::to_string(d.index()) : s;
}
inline std::string piece(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); i++) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

// The pieces of a message, joined: msg("K=", k, " sizes ", t.sizes()).
template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  ((s += piece(args)), ...);
  return s;
}

}  // namespace gptq_check

// TORCH_CHECK with the message made by gptq_check::msg (no ostream: see above).
#define GPTQ_CHECK(cond, ...) TORCH_CHECK(cond, ::gptq_check::msg(__VA_ARGS__))
