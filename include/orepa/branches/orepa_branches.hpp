#pragma once
/// @file orepa_branches.hpp
/// The branches of OREPA (SPEC section 1), OREPA_3x3_RepVGG (section 4) and OREPA_1x1
/// (section 2). Names take a stem: "orepa" gives `weight_orepa_origin`, "rbr" gives
/// `weight_rbr_origin`, "or1x1" gives `weight_or1x1_origin`.
/// Kernels are [O, Ig, k, k] row-major; "hw" below is the flattened k*k spatial index.
///
/// Every branch here is linear in parameters with one row per output channel, so its
/// adjoint needs no kernel formed again: dv[o] = <dW[o], K[o]> = <theta[o], g[o]> with g
/// the unscaled adjoint. The branches with real arithmetic (1x1 -> k x k, DW-separable,
/// the low-rank 1x1 pair) run their products as a few dense GEMMs through the GemmFn the
/// block passes in (oneDNN's matmul for float, Eigen otherwise).
///
/// Every loop runs over the output channels o with parallel_ranges (core/parallel.hpp):
/// each thread owns the same rows W[o0, o1) in every branch and in both directions, and
/// runs its own GEMMs on them (oneDNN runs a matmul called from a parallel region on the
/// calling thread). Gradients of tensors shared by all rows (the 1x1 of the 1x1 -> k x k
/// branch, the depthwise kernel, the low-rank conv1) are summed per thread and reduced.

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "orepa/branches/branch.hpp"
#include "orepa/core/parallel.hpp"

namespace orepa::branches {

/// Vectorisable row kernels (Eigen reorders the sums, which plain loops may not).
template <class S>
using VecMap = Eigen::Map<Eigen::Matrix<S, Eigen::Dynamic, 1>>;
/// Read-only Eigen column-vector map over values of type `S`.
template <class S>
using ConstVecMap = Eigen::Map<const Eigen::Matrix<S, Eigen::Dynamic, 1>>;
/// grad += v * g over n values; returns <theta, g>.
template <class S>
S axpy_dot(std::int64_t n, S v, const S* g, const S* theta, S* grad) {
  if (n <= 16) {  // a kernel row (k*k values): Eigen's set-up would cost more than the work
    S dot = 0;
    for (std::int64_t j = 0; j < n; ++j) {
      grad[j] += v * g[j];
      dot += theta[j] * g[j];
    }
    return dot;
  }
  ConstVecMap<S> gm(g, n);
  VecMap<S>(grad, n) += v * gm;
  return ConstVecMap<S>(theta, n).dot(gm);
}

/// One tensor per thread of parallel_ranges, readable by every thread afterwards (the
/// partial gradients that reduce_into() sums).
template <class S>
class PerThread {
 public:
  /// Makes room for every thread parallel_ranges may use (call outside parallel regions).
  void reserve() {
    if (t_.size() < std::size_t(max_range_threads())) t_.resize(std::size_t(max_range_threads()));
  }
  /// Thread t's tensor.
  Tensor<S>& operator[](int t) { return t_[std::size_t(t)]; }

 private:
  std::vector<Tensor<S>> t_;
};

/// Scratch tensor `slot` of the calling thread, shared by every branch of every block:
/// what a branch leaves there is overwritten by the next branch, so it is used only within
/// one call. Per-block scratch would grow with the depth of the network; this is one set
/// per thread, as large as the largest branch needs.
template <class S>
Tensor<S>& thread_scratch(int slot) {
  thread_local std::array<Tensor<S>, 3> scratch;
  return scratch[std::size_t(slot)];
}

/// grad += the sum of the first `threads` partial gradients (each grad-shaped).
template <class S>
void reduce_into(Tensor<S>& grad, PerThread<S>& partial, int threads) {
  for (int t = 0; t < threads; ++t) VecMap<S>(grad.data(), grad.numel()) += ConstVecMap<S>(partial[t].data(), grad.numel());
}

/// Calls f(c, a0, a1) for each group c (of `per_group` outputs) holding outputs of
/// [o0, o1): outputs c*per_group + a, a in [a0, a1).
template <class F>
void for_groups(std::int64_t per_group, std::int64_t o0, std::int64_t o1, F&& f) {
  for (std::int64_t c = o0 / per_group; c * per_group < o1; ++c)
    f(c, std::max(o0, c * per_group) - c * per_group, std::min(o1, (c + 1) * per_group) - c * per_group);
}

/// f(a, x) for a in [a0, a1), x in [0, X), a few rows a at a time. The branches copy
/// kernel rows [a][x][.] to and from [x][a][.] order, where their GEMMs are dense; tiled,
/// the [x][a][.] side moves in runs of several rows instead of with a stride of whole
/// rows (4 KiB at 128 channels, which maps every access to the same cache set).
template <class F>
void for_tiles(std::int64_t a0, std::int64_t a1, std::int64_t X, F&& f) {
  constexpr std::int64_t tile = 8;
  for (std::int64_t b = a0; b < a1; b += tile)
    for (std::int64_t x = 0; x < X; ++x)
      for (std::int64_t a = b; a < std::min(a1, b + tile); ++a) f(a, x);
}

/// Initial branch scale and kaiming slope, which differ between the reference blocks.
struct Init {
  double scale = 1.0;      ///< initial row of `vector`
  double kaiming_a = 0.0;  ///< kaiming_uniform slope (0 in OREPA, 1 in RepVGG / OREPA_1x1)
};

/// "weight_<stem>_<what>", the reference's parameter naming.
inline std::string wname(const std::string& stem, const char* what) { return "weight_" + stem + "_" + what; }

/// GemmDims from its fields (batch 1 unless given).
inline GemmDims gemm_dims(std::int64_t M, std::int64_t N, std::int64_t K, std::array<std::int64_t, 3> a,
                          std::array<std::int64_t, 3> b, std::array<std::int64_t, 3> c, bool accumulate = false,
                          std::int64_t batch = 1) {
  GemmDims g;
  g.batch = batch, g.M = M, g.N = N, g.K = K, g.a = a, g.b = b, g.c = c, g.accumulate = accumulate;
  return g;
}

/// Row 0: a free k x k kernel, `weight_<stem>_origin` [O, Ig, k, k].
template <class S>
class Origin final : public Branch<S> {
 public:
  /// Kaiming-initialised origin kernel [O, Ig, k, k] named after `stem`.
  Origin(const ConvGeometry& g, std::string stem, Init init, Rng& rng)
      : w_(Tensor<S>(g.weight_shape())), stem_(std::move(stem)), init_(init) {
    kaiming_uniform(w_.value, init.kaiming_a, rng);
  }
  void add_scaled_kernel(TensorView<S> w, const S* v, GemmFn<S>) const override {
    const std::int64_t O = w.size(0), per = w.numel() / O;
    parallel_ranges(O, [&](std::int64_t o0, std::int64_t o1, int) {
      for (std::int64_t o = o0; o < o1; ++o)
        VecMap<S>(w.data() + o * per, per) += v[o] * ConstVecMap<S>(w_.value.data() + o * per, per);
    });
  }
  void scaled_kernel_backward(ConstTensorView<S> dk, const S* v, S* dv, GemmFn<S>) override {
    const std::int64_t O = dk.size(0), per = dk.numel() / O;
    parallel_ranges(O, [&](std::int64_t o0, std::int64_t o1, int) {
      for (std::int64_t o = o0; o < o1; ++o)
        dv[o] += axpy_dot(per, v[o], dk.data() + o * per, w_.value.data() + o * per, w_.grad.data() + o * per);
    });
  }
  void collect_tensors(NamedParams<S>& out, const std::string& prefix) override {
    out.emplace_back(prefix + wname(stem_, "origin"), &w_);
  }
  double initial_scale() const override { return init_.scale; }
  std::unique_ptr<Branch<S>> clone() const override { return std::make_unique<Origin>(*this); }

 private:
  Param<S> w_;
  std::string stem_;
  Init init_;
};

/// A 1x1 conv followed by a fixed per-output-channel k x k filter F[o', hw]:
/// K[o, i, hw] = conv[o, i] * F[o mod rows(F), hw]. With one filter row shared by all
/// outputs this is the average branch (row 1), with O rows the frequency prior (row 2).
template <class S>
class OneByOneThenFilter : public Branch<S> {
 public:
  void add_scaled_kernel(TensorView<S> w, const S* v, GemmFn<S>) const override {
    const auto O = w.size(0), Ig = w.size(1), kk = w.size(2) * w.size(3), rows = filter_.value.numel() / kk;
    parallel_ranges(O, [&](std::int64_t o0, std::int64_t o1, int) {
      for (std::int64_t o = o0; o < o1; ++o)
        for (std::int64_t i = 0; i < Ig; ++i) {
          const S c = v[o] * conv_.value[o * Ig + i];
          const S* f = filter_.value.data() + (o % rows) * kk;
          S* k = w.data() + (o * Ig + i) * kk;
          for (std::int64_t j = 0; j < kk; ++j) k[j] += c * f[j];
        }
    });
  }
  void scaled_kernel_backward(ConstTensorView<S> dk, const S* v, S* dv, GemmFn<S>) override {
    const auto O = dk.size(0), Ig = dk.size(1), kk = dk.size(2) * dk.size(3), rows = filter_.value.numel() / kk;
    parallel_ranges(O, [&](std::int64_t o0, std::int64_t o1, int) {
      Tensor<S>& g = thread_scratch<S>(0);
      g.resize({Ig});
      for (std::int64_t o = o0; o < o1; ++o) {
        // g[i] = sum_hw dK[o, i, hw] * F[o, hw]: one matrix-vector product per output.
        VecMap<S>(g.data(), Ig).noalias() =
            ConstMatMap<S>(dk.data() + o * Ig * kk, Ig, kk) * ConstVecMap<S>(filter_.value.data() + (o % rows) * kk, kk);
        dv[o] += axpy_dot(Ig, v[o], g.data(), conv_.value.data() + o * Ig, conv_.grad.data() + o * Ig);
      }
    });
  }
  void collect_tensors(NamedParams<S>& out, const std::string& prefix) override {
    out.emplace_back(prefix + conv_name_, &conv_);
    out.emplace_back(prefix + filter_name_, &filter_);
  }
  double initial_scale() const override { return init_.scale; }

 protected:
  /// For subclasses: a kaiming-initialised 1x1 conv [O, Ig, 1, 1] named `conv_name` and
  /// the fixed `filter` buffer ([rows, k, k], or [k, k] for one shared row) named `filter_name`.
  OneByOneThenFilter(const ConvGeometry& g, std::string conv_name, std::string filter_name, Tensor<S> filter,
                     Init init, Rng& rng)
      : conv_(Tensor<S>({g.out_channels, g.in_per_group(), 1, 1})),
        filter_(std::move(filter), ParamKind::buffer),
        conv_name_(std::move(conv_name)),
        filter_name_(std::move(filter_name)),
        init_(init) {
    kaiming_uniform(conv_.value, init.kaiming_a, rng);
  }

 private:
  Param<S> conv_, filter_;
  std::string conv_name_, filter_name_;
  Init init_;
};

/// Row 1: 1x1 conv `weight_<stem>_avg_conv` then the k x k average `weight_<stem>_avg_avg` [k, k].
template <class S>
class Avg final : public OneByOneThenFilter<S> {
 public:
  /// Average branch for `g`, parameters named after `stem`.
  Avg(const ConvGeometry& g, const std::string& stem, Init init, Rng& rng)
      : OneByOneThenFilter<S>(g, wname(stem, "avg_conv"), wname(stem, "avg_avg"),
                              Tensor<S>({g.kernel, g.kernel}, S(1.0 / double(g.kernel * g.kernel))), init, rng) {}
  std::unique_ptr<Branch<S>> clone() const override { return std::make_unique<Avg>(*this); }
};

/// The reference frequency prior generalised to any odd k (SPEC section 1):
/// with half = O/2, o < half: cos(pi (h+0.5)(o+1)/k), else cos(pi (w+0.5)(o+1-half)/k).
template <class S>
Tensor<S> frequency_prior(std::int64_t O, std::int64_t k) {
  Tensor<S> p({O, k * k});
  const double half = double(O) / 2.0, pi = 3.14159265358979323846;
  for (std::int64_t o = 0; o < O; ++o)
    for (std::int64_t h = 0; h < k; ++h)
      for (std::int64_t w = 0; w < k; ++w)
        p(o, h * k + w) = S(double(o) < half ? std::cos(pi * (h + 0.5) * double(o + 1) / double(k))
                                             : std::cos(pi * (w + 0.5) * (double(o + 1) - half) / double(k)));
  return p.reshaped({O, k, k});
}

/// Row 2: 1x1 conv `weight_<stem>_pfir_conv` then the fixed DCT-like prior `weight_<stem>_prior` [O, k, k].
template <class S>
class Prior final : public OneByOneThenFilter<S> {
 public:
  /// Frequency-prior branch for `g`, parameters named after `stem`.
  Prior(const ConvGeometry& g, const std::string& stem, Init init, Rng& rng)
      : OneByOneThenFilter<S>(g, wname(stem, "pfir_conv"), wname(stem, "prior"),
                              frequency_prior<S>(g.out_channels, g.kernel), init, rng) {}
  std::unique_ptr<Branch<S>> clone() const override { return std::make_unique<Prior>(*this); }
};

/// Row 3: 1x1 (T internal channels) then k x k. With `identity_init` the 1x1 is
/// `weight_<stem>_1x1_kxk_idconv1` (zero-initialised) plus the buffer `id_tensor`
/// (id[t, t mod Ig] = 1); otherwise a free kaiming-initialised `weight_<stem>_1x1_kxk_conv1`.
/// The k x k part is `weight_<stem>_1x1_kxk_conv2` [O, T/g, k, k]. Per group c:
/// K[c*Og+a, i, hw] = sum_{u<T/g} conv2[c*Og+a, u, hw] * c1[c*T/g+u, i].
template <class S>
class OneByOneKxk final : public Branch<S> {
 public:
  /// Branch with `internal` channels T (a positive multiple of groups, else config_error).
  OneByOneKxk(const ConvGeometry& g, std::string stem, std::int64_t internal, bool identity_init, Init init, Rng& rng)
      : T_(internal), identity_(identity_init), stem_(std::move(stem)), init_(init) {
    const auto Ig = g.in_per_group();
    if (T_ < 1 || T_ % g.groups != 0)
      throw config_error(orepa::detail::cat("OneByOneKxk: internal channels ", T_,
                                            " must be a positive multiple of groups ", g.groups));
    conv1_ = Param<S>(Tensor<S>({T_, Ig, 1, 1}));
    if (identity_) {
      id_ = Param<S>(Tensor<S>({T_, Ig, 1, 1}), ParamKind::buffer);
      for (std::int64_t t = 0; t < T_; ++t) id_.value[t * Ig + t % Ig] = S(1);
    } else {
      kaiming_uniform(conv1_.value, init.kaiming_a, rng);
    }
    conv2_ = Param<S>(Tensor<S>({g.out_channels, T_ / g.groups, g.kernel, g.kernel}));
    kaiming_uniform(conv2_.value, init.kaiming_a, rng);
  }
  /// The number T of internal channels.
  std::int64_t internal_channels() const { return T_; }

  // Per group c, each thread taking its outputs o = c*Og + a, a in [a0, a1) (n of them),
  // one GEMM in [x][a][hw] order, where the copies move runs of kk values:
  //   B[u][a][hw] = v[o] * conv2[o, u, hw]
  //   C = c1_c^T * B  [Ig x n*kk]      (M = Ig, K = Tg, N = n*kk)
  //   W[o, i, :] += C[i][a][:]
  void add_scaled_kernel(TensorView<S> w, const S* v, GemmFn<S> gemm) const override {
    const Dims d = dims(w.sizes());
    effective_conv1();
    parallel_ranges(d.O, [&](std::int64_t o0, std::int64_t o1, int) {
      Tensor<S>&b = thread_scratch<S>(0), &e = thread_scratch<S>(1);
      for_groups(d.Og, o0, o1, [&](std::int64_t c, std::int64_t a0, std::int64_t a1) {
        const std::int64_t nk = (a1 - a0) * d.kk;
        scaled_conv2(c, a0, a1, d, v, b);
        e.resize({d.Ig, nk});
        gemm(gemm_dims(d.Ig, nk, d.Tg, {0, 1, d.Ig}, {0, nk, 1}, {0, nk, 1}), c1_.data() + c * d.Tg * d.Ig, b.data(),
             e.data());
        for_tiles(a0, a1, d.Ig, [&](std::int64_t a, std::int64_t i) {
          S* k = w.data() + ((c * d.Og + a) * d.Ig + i) * d.kk;
          const S* er = e.data() + i * nk + (a - a0) * d.kk;
          for (std::int64_t hw = 0; hw < d.kk; ++hw) k[hw] += er[hw];
        });
      });
    });
  }
  // With dE[i][a][hw] = dW[o, i, hw] (each thread its outputs):
  //   G = c1_c * dE  [Tg x n*kk]   -> conv2.grad[o, u, :] += v[o] * G[u][a][:], dv[o] += <conv2[o], G>
  //   dc1_c += B * dE^T  [Tg x Ig], summed per thread, then reduced
  void scaled_kernel_backward(ConstTensorView<S> dk, const S* v, S* dv, GemmFn<S> gemm) override {
    const Dims d = dims(dk.sizes());
    effective_conv1();
    dc1_.reserve();
    const int threads = range_threads(d.O);
    parallel_ranges(d.O, [&](std::int64_t o0, std::int64_t o1, int t) {
      Tensor<S>& dc1 = dc1_[t];
      dc1.reset(conv1_.value.sizes());
      Tensor<S>&b = thread_scratch<S>(0), &e = thread_scratch<S>(1), &g = thread_scratch<S>(2);
      for_groups(d.Og, o0, o1, [&](std::int64_t c, std::int64_t a0, std::int64_t a1) {
        const std::int64_t nk = (a1 - a0) * d.kk;
        e.resize({d.Ig, nk});
        for_tiles(a0, a1, d.Ig, [&](std::int64_t a, std::int64_t i) {
          std::copy_n(dk.data() + ((c * d.Og + a) * d.Ig + i) * d.kk, d.kk, e.data() + i * nk + (a - a0) * d.kk);
        });
        g.resize({d.Tg, nk});
        gemm(gemm_dims(d.Tg, nk, d.Ig, {0, d.Ig, 1}, {0, nk, 1}, {0, nk, 1}), c1_.data() + c * d.Tg * d.Ig, e.data(),
             g.data());
        for (std::int64_t a = a0; a < a1; ++a) {
          const std::int64_t o = c * d.Og + a;
          S acc = 0;
          for (std::int64_t u = 0; u < d.Tg; ++u)
            acc += axpy_dot(d.kk, v[o], g.data() + u * nk + (a - a0) * d.kk, conv2_.value.data() + (o * d.Tg + u) * d.kk,
                            conv2_.grad.data() + (o * d.Tg + u) * d.kk);
          dv[o] += acc;
        }
        scaled_conv2(c, a0, a1, d, v, b);
        gemm(gemm_dims(d.Tg, d.Ig, nk, {0, nk, 1}, {0, 1, nk}, {0, d.Ig, 1}, true), b.data(), e.data(),
             dc1.data() + c * d.Tg * d.Ig);
      });
    });
    reduce_into(conv1_.grad, dc1_, threads);
  }
  void collect_tensors(NamedParams<S>& out, const std::string& prefix) override {
    out.emplace_back(prefix + wname(stem_, identity_ ? "1x1_kxk_idconv1" : "1x1_kxk_conv1"), &conv1_);
    out.emplace_back(prefix + wname(stem_, "1x1_kxk_conv2"), &conv2_);
    if (identity_) out.emplace_back(prefix + "id_tensor", &id_);
  }
  double initial_scale() const override { return init_.scale; }
  // K = conv2 * (conv1 [+ id]): one factor.
  void scale_kernel(S gain) override { scale_values(conv2_, gain); }
  std::unique_ptr<Branch<S>> clone() const override { return std::make_unique<OneByOneKxk>(*this); }

 private:
  struct Dims {
    std::int64_t O, Ig, kk, Tg, G, Og;
  };
  Dims dims(const Shape& ks) const {
    const std::int64_t O = ks[0], Ig = ks[1], kk = ks[2] * ks[3], Tg = conv2_.value.size(1), G = T_ / Tg;
    return {O, Ig, kk, Tg, G, O / G};
  }
  // B[u][a - a0][hw] = v[o] * conv2[o, u, hw], o = c*Og + a, a in [a0, a1).
  void scaled_conv2(std::int64_t c, std::int64_t a0, std::int64_t a1, const Dims& d, const S* v, Tensor<S>& B) const {
    const std::int64_t n = a1 - a0;
    B.resize({d.Tg, n * d.kk});
    for_tiles(a0, a1, d.Tg, [&](std::int64_t a, std::int64_t u) {
      const std::int64_t o = c * d.Og + a;
      const S* w2 = conv2_.value.data() + (o * d.Tg + u) * d.kk;
      S* r = B.data() + (u * n + a - a0) * d.kk;
      for (std::int64_t hw = 0; hw < d.kk; ++hw) r[hw] = v[o] * w2[hw];
    });
  }
  // c1 = conv1 (+ id_tensor), into the reused c1_ buffer.
  void effective_conv1() const {
    c1_.resize(conv1_.value.sizes());
    for (std::int64_t j = 0; j < c1_.numel(); ++j) c1_[j] = conv1_.value[j] + (identity_ ? id_.value[j] : S(0));
  }

  std::int64_t T_;
  bool identity_;
  std::string stem_;
  Init init_;
  Param<S> conv1_, id_, conv2_;
  mutable Tensor<S> c1_;  // conv1 (+ id_tensor)
  PerThread<S> dc1_;      // per thread: its part of dconv1
};

/// Row 4: a 1x1 kernel `weight_<stem>_1x1` [O, Ig, 1, 1] zero-padded to the k x k centre.
template <class S>
class OneByOne final : public Branch<S> {
 public:
  /// Kaiming-initialised 1x1 kernel [O, Ig, 1, 1] named after `stem`.
  OneByOne(const ConvGeometry& g, std::string stem, Init init, Rng& rng)
      : w_(Tensor<S>({g.out_channels, g.in_per_group(), 1, 1})), stem_(std::move(stem)), init_(init) {
    kaiming_uniform(w_.value, init.kaiming_a, rng);
  }
  void add_scaled_kernel(TensorView<S> w, const S* v, GemmFn<S>) const override {
    const auto Ig = w.size(1), k = w.size(2), kk = k * k, centre = (k / 2) * k + k / 2;
    parallel_ranges(w.size(0), [&](std::int64_t o0, std::int64_t o1, int) {
      for (std::int64_t j = o0 * Ig; j < o1 * Ig; ++j) w[j * kk + centre] += v[j / Ig] * w_.value[j];
    });
  }
  void scaled_kernel_backward(ConstTensorView<S> dk, const S* v, S* dv, GemmFn<S>) override {
    const auto Ig = dk.size(1), k = dk.size(2), kk = k * k, centre = (k / 2) * k + k / 2;
    parallel_ranges(dk.size(0), [&](std::int64_t o0, std::int64_t o1, int) {
      for (std::int64_t o = o0; o < o1; ++o) {
        S acc = 0;
        for (std::int64_t j = o * Ig; j < (o + 1) * Ig; ++j) {
          const S g = dk[j * kk + centre];
          w_.grad[j] += v[o] * g;
          acc += w_.value[j] * g;
        }
        dv[o] += acc;
      }
    });
  }
  void collect_tensors(NamedParams<S>& out, const std::string& prefix) override {
    out.emplace_back(prefix + wname(stem_, "1x1"), &w_);
  }
  double initial_scale() const override { return init_.scale; }
  std::unique_ptr<Branch<S>> clone() const override { return std::make_unique<OneByOne>(*this); }

 private:
  Param<S> w_;
  std::string stem_;
  Init init_;
};

/// Row 5: linear depthwise-separable, DW k x k with expansion 8 (`weight_<stem>_gconv_dw`
/// [8I, 1, k, k]) then PW 1x1 (`weight_<stem>_gconv_pw` [O, 8I/g, 1, 1]), with the
/// reference's PW row permutation for g > 1: for o = c*Og + a,
/// K[o, i, hw] = sum_{t<8} pw[a*g + c, i*8 + t] * dw[(c*Ig + i)*8 + t, hw].
template <class S>
class DepthwiseSeparable final : public Branch<S> {
 public:
  /// Depthwise expansion factor (8 DW channels per input channel).
  static constexpr std::int64_t expand = 8;
  /// Kaiming-initialised DW and PW kernels named after `stem`.
  DepthwiseSeparable(const ConvGeometry& g, std::string stem, Init init, Rng& rng)
      : dw_(Tensor<S>({expand * g.in_channels, 1, g.kernel, g.kernel})),
        pw_(Tensor<S>({g.out_channels, expand * g.in_per_group(), 1, 1})),
        groups_(g.groups),
        stem_(std::move(stem)),
        init_(init) {
    kaiming_uniform(dw_.value, init.kaiming_a, rng);
    kaiming_uniform(pw_.value, init.kaiming_a, rng);
  }
  // For o = c*Og + a and input i, with D_i = dw[(c*Ig + i)*8 + t, :] (8 x kk) and
  // A_i[a, t] = v[o] * pw[a*g + c, i*8 + t] (the reference's PW row of o):
  //   W[o, i, :] += A_i[a, :] * D_i
  // Each thread copies A and its rows of dW into [i][a][.] order, where every operand of
  // the batched GEMM over i is dense (oneDNN then runs its fast kernel), and copies back;
  // the copies move runs of 8 or kk floats.
  void add_scaled_kernel(TensorView<S> w, const S* v, GemmFn<S> gemm) const override {
    const Dims d = dims(w.sizes());
    parallel_ranges(d.O, [&](std::int64_t o0, std::int64_t o1, int) {
      Tensor<S>&A = thread_scratch<S>(0), &E = thread_scratch<S>(1);
      for_groups(d.Og, o0, o1, [&](std::int64_t c, std::int64_t a0, std::int64_t a1) {
        const std::int64_t n = a1 - a0;
        scaled_rows(c, a0, a1, d, v, A);
        E.resize({d.Ig, n, d.kk});
        gemm(gemm_dims(n, d.kk, expand, {n * expand, expand, 1}, {expand * d.kk, d.kk, 1}, {n * d.kk, d.kk, 1}, false,
                       d.Ig),
             A.data(), dw_.value.data() + c * d.Ig * expand * d.kk, E.data());
        for_tiles(a0, a1, d.Ig, [&](std::int64_t a, std::int64_t i) {
          S* k = w.data() + ((c * d.Og + a) * d.Ig + i) * d.kk;
          const S* e = E.data() + (i * n + a - a0) * d.kk;
          for (std::int64_t hw = 0; hw < d.kk; ++hw) k[hw] += e[hw];
        });
      });
    });
  }
  // With dE_i[a, :] = dW[o, i, :]:
  //   G_i = dE_i * D_i^T (n x 8)      -> pw.grad[row of o, i*8 + t] += v[o] * G_i[a, t], dv[o] += <pw, G>
  //   dw.grad_i += A_i^T * dE_i (8 x kk), summed per thread, then reduced
  void scaled_kernel_backward(ConstTensorView<S> dk, const S* v, S* dv, GemmFn<S> gemm) override {
    const Dims d = dims(dk.sizes());
    ddw_.reserve();
    const int threads = range_threads(d.O);
    parallel_ranges(d.O, [&](std::int64_t o0, std::int64_t o1, int t) {
      Tensor<S>& ddw = ddw_[t];
      ddw.reset(dw_.value.sizes());
      Tensor<S>&A = thread_scratch<S>(0), &e = thread_scratch<S>(1), &g = thread_scratch<S>(2);
      for_groups(d.Og, o0, o1, [&](std::int64_t c, std::int64_t a0, std::int64_t a1) {
        const std::int64_t n = a1 - a0;
        e.resize({d.Ig, n, d.kk});
        for_tiles(a0, a1, d.Ig, [&](std::int64_t a, std::int64_t i) {
          std::copy_n(dk.data() + ((c * d.Og + a) * d.Ig + i) * d.kk, d.kk, e.data() + (i * n + a - a0) * d.kk);
        });
        const S* dw = dw_.value.data() + c * d.Ig * expand * d.kk;
        g.resize({d.Ig, n, expand});
        gemm(gemm_dims(n, expand, d.kk, {n * d.kk, d.kk, 1}, {expand * d.kk, 1, d.kk}, {n * expand, expand, 1}, false,
                       d.Ig),
             e.data(), dw, g.data());
        for (std::int64_t a = a0; a < a1; ++a) {
          const std::int64_t o = c * d.Og + a, p = prow(o, d) * d.cols;
          S acc = 0;
          for (std::int64_t i = 0; i < d.Ig; ++i)
            acc += axpy_dot(expand, v[o], g.data() + (i * n + a - a0) * expand, pw_.value.data() + p + i * expand,
                            pw_.grad.data() + p + i * expand);
          dv[o] += acc;
        }
        scaled_rows(c, a0, a1, d, v, A);
        gemm(gemm_dims(expand, d.kk, n, {n * expand, 1, expand}, {n * d.kk, d.kk, 1}, {expand * d.kk, d.kk, 1}, true,
                       d.Ig),
             A.data(), e.data(), ddw.data() + c * d.Ig * expand * d.kk);
      });
    });
    reduce_into(dw_.grad, ddw_, threads);
  }
  void collect_tensors(NamedParams<S>& out, const std::string& prefix) override {
    out.emplace_back(prefix + wname(stem_, "gconv_dw"), &dw_);
    out.emplace_back(prefix + wname(stem_, "gconv_pw"), &pw_);
  }
  double initial_scale() const override { return init_.scale; }
  // K = pw * dw: one factor.
  void scale_kernel(S gain) override { scale_values(pw_, gain); }
  std::unique_ptr<Branch<S>> clone() const override { return std::make_unique<DepthwiseSeparable>(*this); }

 private:
  struct Dims {
    std::int64_t O, Ig, kk, G, Og, cols;
  };
  Dims dims(const Shape& ks) const {
    const std::int64_t O = ks[0], Ig = ks[1], kk = ks[2] * ks[3], G = groups_;
    return {O, Ig, kk, G, O / G, expand * Ig};
  }
  // The reference's PW row for output o = c*Og + a.
  static std::int64_t prow(std::int64_t o, const Dims& d) { return (o % d.Og) * d.G + o / d.Og; }
  // A[i][a - a0][t] = v[o] * pw[row of o, i*8 + t], o = c*Og + a, a in [a0, a1).
  void scaled_rows(std::int64_t c, std::int64_t a0, std::int64_t a1, const Dims& d, const S* v, Tensor<S>& A) const {
    const std::int64_t n = a1 - a0;
    A.resize({d.Ig, n, expand});
    for_tiles(a0, a1, d.Ig, [&](std::int64_t a, std::int64_t i) {
      const std::int64_t o = c * d.Og + a;
      const S* pw = pw_.value.data() + prow(o, d) * d.cols + i * expand;
      S* r = A.data() + (i * n + a - a0) * expand;
      for (std::int64_t t = 0; t < expand; ++t) r[t] = v[o] * pw[t];
    });
  }

  Param<S> dw_, pw_;
  std::int64_t groups_;
  std::string stem_;
  Init init_;
  PerThread<S> ddw_;  // per thread: its part of dw's gradient
};

/// OREPA_1x1's second branch: `weight_or1x1_l2i_conv1` [T, I, 1, 1] then
/// `weight_or1x1_l2i_conv2` [O, T, 1, 1], K = conv2 @ conv1. If O > I, T = I and conv1
/// starts as the identity; otherwise T = O and conv2 starts as the identity.
template <class S>
class LowRankIdentity final : public Branch<S> {
 public:
  /// Low-rank identity branch for `g` (parameter names fixed by the reference).
  LowRankIdentity(const ConvGeometry& g, Init init, Rng& rng) : init_(init) {
    const auto O = g.out_channels, I = g.in_channels;
    const bool up = O > I;
    const auto T = up ? I : O;
    c1_ = Param<S>(Tensor<S>({T, I, 1, 1}));
    c2_ = Param<S>(Tensor<S>({O, T, 1, 1}));
    auto& eye = up ? c1_.value : c2_.value;
    kaiming_uniform(up ? c2_.value : c1_.value, init.kaiming_a, rng);
    for (std::int64_t t = 0; t < T; ++t) eye[t * eye.size(1) + t] = S(1);
  }
  // W += (v * conv2) @ conv1: one GEMM (O x T times T x I), each thread its rows.
  void add_scaled_kernel(TensorView<S> w, const S* v, GemmFn<S> gemm) const override {
    const auto O = c2_.value.size(0), T = c1_.value.size(0), I = c1_.value.size(1);
    c2v_.resize({O, T});
    parallel_ranges(O, [&](std::int64_t o0, std::int64_t o1, int) {
      scale_rows(v, o0, o1);
      gemm(gemm_dims(o1 - o0, I, T, {0, T, 1}, {0, I, 1}, {0, I, 1}, true), c2v_.data() + o0 * T, c1_.value.data(),
           w.data() + o0 * I);
    });
  }
  // H = dW @ conv1^T (O x T): conv2.grad += v * H, dv[o] += <conv2[o], H[o]>;
  // conv1.grad += (v * conv2)^T @ dW (T x I), summed per thread, then reduced.
  void scaled_kernel_backward(ConstTensorView<S> dk, const S* v, S* dv, GemmFn<S> gemm) override {
    const auto O = c2_.value.size(0), T = c1_.value.size(0), I = c1_.value.size(1);
    h_.resize({O, T});
    c2v_.resize({O, T});
    dc1_.reserve();
    const int threads = range_threads(O);
    parallel_ranges(O, [&](std::int64_t o0, std::int64_t o1, int t) {
      gemm(gemm_dims(o1 - o0, T, I, {0, I, 1}, {0, 1, I}, {0, T, 1}), dk.data() + o0 * I, c1_.value.data(),
           h_.data() + o0 * T);
      for (std::int64_t o = o0; o < o1; ++o)
        dv[o] += axpy_dot(T, v[o], h_.data() + o * T, c2_.value.data() + o * T, c2_.grad.data() + o * T);
      scale_rows(v, o0, o1);
      dc1_[t].resize(c1_.value.sizes());
      gemm(gemm_dims(T, I, o1 - o0, {0, 1, T}, {0, I, 1}, {0, I, 1}), c2v_.data() + o0 * T, dk.data() + o0 * I,
           dc1_[t].data());
    });
    reduce_into(c1_.grad, dc1_, threads);
  }
  void collect_tensors(NamedParams<S>& out, const std::string& prefix) override {
    out.emplace_back(prefix + "weight_or1x1_l2i_conv1", &c1_);
    out.emplace_back(prefix + "weight_or1x1_l2i_conv2", &c2_);
  }
  double initial_scale() const override { return init_.scale; }
  // K = conv2 @ conv1: one factor, the one not started as the identity.
  void scale_kernel(S gain) override { scale_values(c2_.value.size(0) > c1_.value.size(1) ? c2_ : c1_, gain); }
  std::unique_ptr<Branch<S>> clone() const override { return std::make_unique<LowRankIdentity>(*this); }

 private:
  // Rows [o0, o1) of c2v = v * conv2 (row o scaled by v[o]).
  void scale_rows(const S* v, std::int64_t o0, std::int64_t o1) const {
    const auto T = c2_.value.size(1);
    for (std::int64_t o = o0; o < o1; ++o)
      VecMap<S>(c2v_.data() + o * T, T) = v[o] * ConstVecMap<S>(c2_.value.data() + o * T, T);
  }

  Param<S> c1_, c2_;
  Init init_;
  mutable Tensor<S> c2v_;  // scratch: v-scaled conv2
  Tensor<S> h_;            // scratch: dW @ conv1^T
  PerThread<S> dc1_;       // per thread: its part of conv1's gradient
};

}  // namespace orepa::branches
