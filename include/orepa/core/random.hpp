#pragma once
/// @file random.hpp
/// A seedable random source whose stream is the same on every platform and standard
/// library (std::uniform_real_distribution is not), plus the reference initialisers.

#include <cmath>
#include <cstdint>
#include <random>

#include "orepa/core/tensor.hpp"

namespace orepa {

/// Deterministic random numbers: mt19937_64 with a portable uniform mapping.
class Rng {
 public:
  /// Seeds the generator; the same seed gives the same stream everywhere.
  explicit Rng(std::uint64_t seed = 0) : gen_(seed) {}
  /// Uniform in [0, 1).
  double uniform() { return double(gen_() >> 11) * (1.0 / 9007199254740992.0); }
  /// Uniform in [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  /// Standard normal (Box-Muller).
  double normal() {
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  /// Uniform integer in [0, n).
  std::uint64_t below(std::uint64_t n) { return n ? gen_() % n : 0; }

 private:
  std::mt19937_64 gen_;
};

/// Fills `t` with U(-bound, bound).
template <class S>
void fill_uniform(Tensor<S>& t, double bound, Rng& rng) {
  for (auto& v : t) v = static_cast<S>(rng.uniform(-bound, bound));
}

/// PyTorch's kaiming_uniform_(t, a): bound = sqrt(6 / ((1 + a^2) * fan_in)), fan_in the
/// product of the dims after the first. a = 0 gives sqrt(6/fan_in), a = 1 sqrt(3/fan_in).
template <class S>
void kaiming_uniform(Tensor<S>& t, double a, Rng& rng) {
  std::int64_t fan_in = 1;
  for (int i = 1; i < t.dim(); ++i) fan_in *= t.size(i);
  if (fan_in <= 0) return;
  fill_uniform(t, std::sqrt(6.0 / ((1.0 + a * a) * double(fan_in))), rng);
}

}  // namespace orepa
