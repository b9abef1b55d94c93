#pragma once
/// @file random.hpp
/// A seedable random source whose stream is the same on every platform and standard
/// library (std::uniform_real_distribution is not), plus the reference initialisers.

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "orepa/core/state_dict.hpp"
#include "orepa/core/tensor.hpp"

namespace orepa {

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// std::mt19937_64 as the standard defines it (parameters, seeding, tempering: the same
// stream), written out because <random> alone costs every program including orepa about
// 2 % of its parse time.
class Mt19937_64 {
 public:
  explicit Mt19937_64(std::uint64_t s) { seed(s); }
  void seed(std::uint64_t s) {
    x_[0] = s;
    for (std::size_t i = 1; i < n; ++i) x_[i] = 6364136223846793005ULL * (x_[i - 1] ^ (x_[i - 1] >> 62)) + i;
    next_ = n;
  }
  std::uint64_t operator()() {
    if (next_ == n) twist();
    std::uint64_t z = x_[next_++];
    z ^= (z >> 29) & 0x5555555555555555ULL;
    z ^= (z << 17) & 0x71D67FFFEDA60000ULL;
    z ^= (z << 37) & 0xFFF7EEE000000000ULL;
    return z ^ (z >> 43);
  }
  void discard(std::uint64_t k) {
    for (; k != 0; --k) (void)(*this)();
  }

 private:
  static constexpr std::size_t n = 312, m = 156;
  void twist() {
    constexpr std::uint64_t upper = ~std::uint64_t(0) << 31, lower = ~upper;
    for (std::size_t k = 0; k < n; ++k) {
      const std::uint64_t y = (x_[k] & upper) | (x_[(k + 1) % n] & lower);
      x_[k] = x_[(k + m) % n] ^ (y >> 1) ^ ((y & 1) ? 0xB5026F5AA96619E9ULL : 0);
    }
    next_ = 0;
  }
  std::uint64_t x_[n];
  std::size_t next_ = n;
};
}  // namespace detail
/// \endcond

/// Deterministic random numbers: mt19937_64 with a portable uniform mapping. Its state is
/// the seed and the number of values drawn, so a training checkpoint can store it in two
/// integers and restore() it exactly (io/training_checkpoint.hpp).
class Rng {
 public:
  /// Seeds the generator; the same seed gives the same stream everywhere.
  explicit Rng(std::uint64_t seed = 0) : gen_(seed), seed_(seed) {}
  /// Uniform in [0, 1).
  double uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }
  /// Uniform in [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  /// Standard normal (Box-Muller).
  double normal() {
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  /// Uniform integer in [0, n).
  std::uint64_t below(std::uint64_t n) { return n ? next() % n : 0; }

  /// The seed the stream started from.
  std::uint64_t seed() const { return seed_; }
  /// Number of 64-bit values drawn since seeding (each uniform() and below() draws one).
  std::uint64_t draws() const { return draws_; }
  /// Puts the generator where Rng(seed) is after `draws` values (re-seeds, then skips
  /// them: about a nanosecond per skipped value).
  void restore(std::uint64_t seed, std::uint64_t draws) {
    gen_.seed(seed);
    gen_.discard(draws);
    seed_ = seed;
    draws_ = draws;
  }
  /// The state as counters "seed" and "draws" (their 64 bits stored as int64).
  template <class S = float>
  StateDict<S> state_dict() const {
    StateDict<S> sd;
    sd.insert_count("seed", std::int64_t(seed_));
    sd.insert_count("draws", std::int64_t(draws_));
    return sd;
  }
  /// restore()s the state of state_dict(); format_error naming a missing or unexpected
  /// entry (the generator unchanged).
  template <class S>
  void load_state_dict(const StateDict<S>& sd) {
    StateReader<S> r(sd, "Rng");
    const auto seed = std::uint64_t(r.count("seed")), draws = std::uint64_t(r.count("draws"));
    r.finish();
    restore(seed, draws);
  }

 private:
  std::uint64_t next() {
    ++draws_;
    return gen_();
  }
  detail::Mt19937_64 gen_;
  std::uint64_t seed_;
  std::uint64_t draws_ = 0;
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
