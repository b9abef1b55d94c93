#pragma once
// Shared helpers of the orepa benchmarks: random inputs and the shape tables.
#include <benchmark/benchmark.h>
#include <malloc.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include <orepa/orepa.hpp>

namespace orepa::bench {

/// A tensor of `shape` with U(-1, 1) values from a fixed seed.
inline Tensor<float> random_tensor(const Shape& shape, std::uint64_t seed = 1) {
  Tensor<float> t(shape);
  Rng rng(seed);
  fill_uniform(t, 1.0, rng);
  return t;
}

/// Forward FLOPs of a convolution (2 per multiply-add) for input `x`.
inline double conv_flops(const ConvGeometry& g, const Shape& x) {
  const Shape y = g.output_shape(x, "conv_flops");
  return 2.0 * double(y[0]) * double(y[1]) * double(y[2]) * double(y[3]) * double(g.in_per_group()) *
         double(g.kernel * g.kernel);
}

/// Bytes of `n` floats.
inline double float_bytes(std::int64_t n) { return double(n) * double(sizeof(float)); }

/// A memory figure of this process from /proc/self/status ("VmRSS", "VmHWM"), in bytes
/// (-1 where the file is not there).
inline std::int64_t process_memory(const std::string& field) {
  std::ifstream f("/proc/self/status");
  std::string key;
  std::int64_t kib = -1;
  while (f >> key) {
    if (key == field + ":") {
      f >> kib;
      return kib * 1024;
    }
    std::getline(f, key);
  }
  return -1;
}
/// Resets VmHWM to the current VmRSS (Linux: writing 5 to /proc/self/clear_refs).
inline void reset_peak_memory() { std::ofstream("/proc/self/clear_refs") << "5"; }
/// Returns the heap's free memory to the system, so that what a measurement allocates
/// shows in the RSS instead of reusing memory an earlier benchmark freed.
inline void release_free_memory() { malloc_trim(0); }

}  // namespace orepa::bench
