#pragma once
/// @file orepa_branches.hpp
/// The branches of OREPA (SPEC section 1), OREPA_3x3_RepVGG (section 4) and OREPA_1x1
/// (section 2). Names take a stem: "orepa" gives `weight_orepa_origin`, "rbr" gives
/// `weight_rbr_origin`, "or1x1" gives `weight_or1x1_origin`.
/// Kernels are [O, Ig, k, k] row-major; "hw" below is the flattened k*k spatial index.

#include <cmath>

#include "orepa/branches/branch.hpp"

namespace orepa::branches {

/// Initial branch scale and kaiming slope, which differ between the reference blocks.
struct Init {
  double scale = 1.0;      ///< initial row of `vector`
  double kaiming_a = 0.0;  ///< kaiming_uniform slope (0 in OREPA, 1 in RepVGG / OREPA_1x1)
};

/// "weight_<stem>_<what>", the reference's parameter naming.
inline std::string wname(const std::string& stem, const char* what) { return "weight_" + stem + "_" + what; }

/// Row 0: a free k x k kernel, `weight_<stem>_origin` [O, Ig, k, k].
template <class S>
class Origin final : public Branch<S> {
 public:
  Origin(const ConvGeometry& g, const std::string& stem, Init init, Rng& rng)
      : w_(wname(stem, "origin"), Tensor<S>(g.weight_shape())), init_(init) {
    kaiming_uniform(w_.value, init.kaiming_a, rng);
  }
  void kernel(Tensor<S>& out) const override { std::copy(w_.value.begin(), w_.value.end(), out.begin()); }
  void kernel_backward(const Tensor<S>& dk) override {
    for (std::int64_t j = 0; j < dk.size(); ++j) w_.grad[j] += dk[j];
  }
  ParamList<S> params() override { return {&w_}; }
  double initial_scale() const override { return init_.scale; }

 private:
  Param<S> w_;
  Init init_;
};

/// A 1x1 conv followed by a fixed per-output-channel k x k filter F[o', hw]:
/// K[o, i, hw] = conv[o, i] * F[o mod rows(F), hw]. With one filter row shared by all
/// outputs this is the average branch (row 1), with O rows the frequency prior (row 2).
template <class S>
class OneByOneThenFilter : public Branch<S> {
 public:
  void kernel(Tensor<S>& out) const override {
    const auto O = out.dim(0), Ig = out.dim(1), kk = out.dim(2) * out.dim(3), rows = filter_.value.size() / kk;
    for (std::int64_t o = 0; o < O; ++o)
      for (std::int64_t i = 0; i < Ig; ++i) {
        const S c = conv_.value[o * Ig + i];
        const S* f = filter_.value.data() + (o % rows) * kk;
        S* k = out.data() + (o * Ig + i) * kk;
        for (std::int64_t j = 0; j < kk; ++j) k[j] = c * f[j];
      }
  }
  void kernel_backward(const Tensor<S>& dk) override {
    const auto O = dk.dim(0), Ig = dk.dim(1), kk = dk.dim(2) * dk.dim(3), rows = filter_.value.size() / kk;
    for (std::int64_t o = 0; o < O; ++o)
      for (std::int64_t i = 0; i < Ig; ++i) {
        const S* f = filter_.value.data() + (o % rows) * kk;
        const S* d = dk.data() + (o * Ig + i) * kk;
        S acc = 0;
        for (std::int64_t j = 0; j < kk; ++j) acc += d[j] * f[j];
        conv_.grad[o * Ig + i] += acc;
      }
  }
  ParamList<S> params() override { return {&conv_, &filter_}; }
  double initial_scale() const override { return init_.scale; }

 protected:
  OneByOneThenFilter(const ConvGeometry& g, std::string conv_name, std::string filter_name, Tensor<S> filter,
                     Init init, Rng& rng)
      : conv_(std::move(conv_name), Tensor<S>({g.out_channels, g.in_per_group(), 1, 1})),
        filter_(std::move(filter_name), std::move(filter), ParamKind::buffer),
        init_(init) {
    kaiming_uniform(conv_.value, init.kaiming_a, rng);
  }
  Param<S> conv_, filter_;
  Init init_;
};

/// Row 1: 1x1 conv `weight_<stem>_avg_conv` then the k x k average `weight_<stem>_avg_avg` [k, k].
template <class S>
class Avg final : public OneByOneThenFilter<S> {
 public:
  Avg(const ConvGeometry& g, const std::string& stem, Init init, Rng& rng)
      : OneByOneThenFilter<S>(g, wname(stem, "avg_conv"), wname(stem, "avg_avg"),
                              Tensor<S>({g.kernel, g.kernel}, S(1.0 / double(g.kernel * g.kernel))), init, rng) {}
  // avg_avg [k, k] is read as one filter row shared by every output channel.
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
  Prior(const ConvGeometry& g, const std::string& stem, Init init, Rng& rng)
      : OneByOneThenFilter<S>(g, wname(stem, "pfir_conv"), wname(stem, "prior"),
                              frequency_prior<S>(g.out_channels, g.kernel), init, rng) {}
};

/// Row 3: 1x1 (T internal channels) then k x k. With `identity_init` the 1x1 is
/// `weight_<stem>_1x1_kxk_idconv1` (zero-initialised) plus the buffer `id_tensor`
/// (id[t, t mod Ig] = 1); otherwise a free kaiming-initialised `weight_<stem>_1x1_kxk_conv1`.
/// The k x k part is `weight_<stem>_1x1_kxk_conv2` [O, T/g, k, k]. Per group c:
/// K[c*Og+a, i, hw] = sum_{u<T/g} conv2[c*Og+a, u, hw] * c1[c*T/g+u, i].
template <class S>
class OneByOneKxk final : public Branch<S> {
 public:
  OneByOneKxk(const ConvGeometry& g, const std::string& stem, std::int64_t internal, bool identity_init, Init init,
              Rng& rng)
      : T_(internal), identity_(identity_init), init_(init) {
    const auto Ig = g.in_per_group();
    if (T_ < 1 || T_ % g.groups != 0)
      throw config_error(orepa::detail::cat("OneByOneKxk: internal channels ", T_, " must be a positive multiple of groups ",
                                     g.groups));
    conv1_ = Param<S>(wname(stem, identity_ ? "1x1_kxk_idconv1" : "1x1_kxk_conv1"), Tensor<S>({T_, Ig, 1, 1}));
    if (identity_) {
      id_ = Param<S>("id_tensor", Tensor<S>({T_, Ig, 1, 1}), ParamKind::buffer);
      for (std::int64_t t = 0; t < T_; ++t) id_.value[t * Ig + t % Ig] = S(1);
    } else {
      kaiming_uniform(conv1_.value, init.kaiming_a, rng);
    }
    conv2_ = Param<S>(wname(stem, "1x1_kxk_conv2"), Tensor<S>({g.out_channels, T_ / g.groups, g.kernel, g.kernel}));
    kaiming_uniform(conv2_.value, init.kaiming_a, rng);
  }
  std::int64_t internal_channels() const { return T_; }

  void kernel(Tensor<S>& out) const override {
    const Tensor<S> c1 = effective_conv1();
    each_group(out.shape(), [&](std::int64_t o, std::int64_t c, std::int64_t Tg, std::int64_t Ig, std::int64_t kk) {
      // K_o (Ig x kk) = c1_c^T (Ig x Tg) * conv2_o (Tg x kk)
      auto c1g = c1.matrix(T_, Ig).middleRows(c * Tg, Tg);
      ConstMatMap<S> w2(conv2_.value.data() + o * Tg * kk, Tg, kk);
      MatMap<S> k(out.data() + o * Ig * kk, Ig, kk);
      k.noalias() = c1g.transpose() * w2;
    });
  }
  void kernel_backward(const Tensor<S>& dk) override {
    const Tensor<S> c1 = effective_conv1();
    each_group(dk.shape(), [&](std::int64_t o, std::int64_t c, std::int64_t Tg, std::int64_t Ig, std::int64_t kk) {
      auto c1g = c1.matrix(T_, Ig).middleRows(c * Tg, Tg);
      ConstMatMap<S> w2(conv2_.value.data() + o * Tg * kk, Tg, kk);
      ConstMatMap<S> d(dk.data() + o * Ig * kk, Ig, kk);
      MatMap<S> g2(conv2_.grad.data() + o * Tg * kk, Tg, kk);
      g2.noalias() += c1g * d;                                           // d conv2_o = c1_c d_o
      conv1_.grad.matrix(T_, Ig).middleRows(c * Tg, Tg).noalias() += w2 * d.transpose();  // d c1_c += conv2_o d_o^T
    });
  }
  ParamList<S> params() override {
    if (identity_) return {&conv1_, &id_, &conv2_};
    return {&conv1_, &conv2_};
  }
  double initial_scale() const override { return init_.scale; }

 private:
  Tensor<S> effective_conv1() const {
    Tensor<S> c1 = conv1_.value;
    if (identity_)
      for (std::int64_t j = 0; j < c1.size(); ++j) c1[j] += id_.value[j];
    return c1;
  }
  template <class F>
  void each_group(const Shape& ks, F&& f) const {
    const std::int64_t O = ks[0], Ig = ks[1], kk = ks[2] * ks[3], Tg = conv2_.value.dim(1), G = T_ / Tg,
                       Og = O / G;
    for (std::int64_t o = 0; o < O; ++o) f(o, o / Og, Tg, Ig, kk);
  }

  std::int64_t T_;
  bool identity_;
  Init init_;
  Param<S> conv1_, id_, conv2_;
};

/// Row 4: a 1x1 kernel `weight_<stem>_1x1` [O, Ig, 1, 1] zero-padded to the k x k centre.
template <class S>
class OneByOne final : public Branch<S> {
 public:
  OneByOne(const ConvGeometry& g, const std::string& stem, Init init, Rng& rng)
      : w_(wname(stem, "1x1"), Tensor<S>({g.out_channels, g.in_per_group(), 1, 1})), init_(init) {
    kaiming_uniform(w_.value, init.kaiming_a, rng);
  }
  void kernel(Tensor<S>& out) const override {
    const auto k = out.dim(2), kk = k * k, centre = (k / 2) * k + k / 2;
    for (std::int64_t j = 0; j < w_.value.size(); ++j) out[j * kk + centre] = w_.value[j];
  }
  void kernel_backward(const Tensor<S>& dk) override {
    const auto k = dk.dim(2), kk = k * k, centre = (k / 2) * k + k / 2;
    for (std::int64_t j = 0; j < w_.grad.size(); ++j) w_.grad[j] += dk[j * kk + centre];
  }
  ParamList<S> params() override { return {&w_}; }
  double initial_scale() const override { return init_.scale; }

 private:
  Param<S> w_;
  Init init_;
};

/// Row 5: linear depthwise-separable, DW k x k with expansion 8 (`weight_<stem>_gconv_dw`
/// [8I, 1, k, k]) then PW 1x1 (`weight_<stem>_gconv_pw` [O, 8I/g, 1, 1]), with the
/// reference's PW row permutation for g > 1: for o = c*Og + a,
/// K[o, i, hw] = sum_{t<8} pw[a*g + c, i*8 + t] * dw[(c*Ig + i)*8 + t, hw].
template <class S>
class DepthwiseSeparable final : public Branch<S> {
 public:
  static constexpr std::int64_t expand = 8;
  DepthwiseSeparable(const ConvGeometry& g, const std::string& stem, Init init, Rng& rng)
      : dw_(wname(stem, "gconv_dw"), Tensor<S>({expand * g.in_channels, 1, g.kernel, g.kernel})),
        pw_(wname(stem, "gconv_pw"), Tensor<S>({g.out_channels, expand * g.in_per_group(), 1, 1})),
        groups_(g.groups), init_(init) {
    kaiming_uniform(dw_.value, init.kaiming_a, rng);
    kaiming_uniform(pw_.value, init.kaiming_a, rng);
  }
  void kernel(Tensor<S>& out) const override {
    visit(out.shape(), [&](std::int64_t kidx, std::int64_t pidx, std::int64_t didx, std::int64_t kk) {
      const S p = pw_.value[pidx];
      const S* d = dw_.value.data() + didx;
      S* k = out.data() + kidx;
      for (std::int64_t j = 0; j < kk; ++j) k[j] += p * d[j];
    });
  }
  void kernel_backward(const Tensor<S>& dk) override {
    visit(dk.shape(), [&](std::int64_t kidx, std::int64_t pidx, std::int64_t didx, std::int64_t kk) {
      const S p = pw_.value[pidx];
      const S* d = dw_.value.data() + didx;
      const S* g = dk.data() + kidx;
      S* gd = dw_.grad.data() + didx;
      S acc = 0;
      for (std::int64_t j = 0; j < kk; ++j) { acc += g[j] * d[j]; gd[j] += p * g[j]; }
      pw_.grad[pidx] += acc;
    });
  }
  ParamList<S> params() override { return {&dw_, &pw_}; }
  double initial_scale() const override { return init_.scale; }

 private:
  // Calls f(kernel offset, pw index, dw offset, k*k) for every (o, i, t).
  template <class F>
  void visit(const Shape& ks, F&& f) const {
    const std::int64_t O = ks[0], Ig = ks[1], kk = ks[2] * ks[3], G = groups_, Og = O / G, cols = expand * Ig;
    for (std::int64_t o = 0; o < O; ++o) {
      const std::int64_t c = o / Og, a = o % Og, prow = a * G + c;
      for (std::int64_t i = 0; i < Ig; ++i)
        for (std::int64_t t = 0; t < expand; ++t)
          f((o * Ig + i) * kk, prow * cols + i * expand + t, ((c * Ig + i) * expand + t) * kk, kk);
    }
  }
  Param<S> dw_, pw_;
  std::int64_t groups_;
  Init init_;
};

/// OREPA_1x1's second branch: `weight_or1x1_l2i_conv1` [T, I, 1, 1] then
/// `weight_or1x1_l2i_conv2` [O, T, 1, 1], K = conv2 @ conv1. If O > I, T = I and conv1
/// starts as the identity; otherwise T = O and conv2 starts as the identity.
template <class S>
class LowRankIdentity final : public Branch<S> {
 public:
  LowRankIdentity(const ConvGeometry& g, Init init, Rng& rng) : init_(init) {
    const auto O = g.out_channels, I = g.in_channels;
    const bool up = O > I;
    const auto T = up ? I : O;
    c1_ = Param<S>("weight_or1x1_l2i_conv1", Tensor<S>({T, I, 1, 1}));
    c2_ = Param<S>("weight_or1x1_l2i_conv2", Tensor<S>({O, T, 1, 1}));
    auto& eye = up ? c1_.value : c2_.value;
    kaiming_uniform(up ? c2_.value : c1_.value, init.kaiming_a, rng);
    for (std::int64_t t = 0; t < T; ++t) eye[t * eye.dim(1) + t] = S(1);
  }
  void kernel(Tensor<S>& out) const override {
    const auto O = c2_.value.dim(0), T = c1_.value.dim(0), I = c1_.value.dim(1);
    out.matrix(O, I).noalias() = c2_.value.matrix(O, T) * c1_.value.matrix(T, I);
  }
  void kernel_backward(const Tensor<S>& dk) override {
    const auto O = c2_.value.dim(0), T = c1_.value.dim(0), I = c1_.value.dim(1);
    c2_.grad.matrix(O, T).noalias() += dk.matrix(O, I) * c1_.value.matrix(T, I).transpose();
    c1_.grad.matrix(T, I).noalias() += c2_.value.matrix(O, T).transpose() * dk.matrix(O, I);
  }
  ParamList<S> params() override { return {&c1_, &c2_}; }
  double initial_scale() const override { return init_.scale; }

 private:
  Param<S> c1_, c2_;
  Init init_;
};

}  // namespace orepa::branches
