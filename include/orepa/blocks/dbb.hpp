#pragma once
/// @file dbb.hpp
/// DBB<S, Act>: the Diverse Branch Block (structural re-parameterisation, SPEC section 5),
/// the baseline OREPA's training cost is measured against. In training EVERY branch runs
/// on the activations with its own BN (no squeezing shortcut):
///
///     y = act(dbb_origin(x) + dbb_1x1(x) + dbb_avg(x) + dbb_1x1_kxk(x))
///
/// Padding must be k/2 and dilation 1 (the reference's branches only line up then).
/// Two variants, chosen by the reference rule:
///
/// - groups < out_channels (e.g. g = 1, g = 2):
///   - dbb_origin:  conv k x k (stride, padding k/2, groups) -> BN
///                  (`dbb_origin.conv.weight` [O, Ig, k, k], `dbb_origin.bn.*`);
///   - dbb_1x1:     conv 1x1 (stride, padding 0, groups) -> BN (`dbb_1x1.conv.weight`, `dbb_1x1.bn.*`);
///   - dbb_avg:     conv 1x1 (`dbb_avg.conv.weight` [O, Ig, 1, 1], groups) -> BN-and-pad
///                  (`dbb_avg.bn.bn.*`) -> k x k average pool (stride, padding 0) -> BN (`dbb_avg.avgbn.*`);
///   - dbb_1x1_kxk: identity-based 1x1 (`dbb_1x1_kxk.idconv1.weight` [I, Ig, 1, 1], applied as
///                  weight + id with id[i, i mod Ig] = 1, id rebuilt, never stored) -> BN-and-pad
///                  (`dbb_1x1_kxk.bn1.bn.*`) -> conv k x k (`dbb_1x1_kxk.conv2.weight` [O, I/g, k, k],
///                  stride, padding 0, groups) -> BN (`dbb_1x1_kxk.bn2.*`).
/// - groups >= out_channels (i.e. g = O; the reference then needs I = O, e.g. depthwise):
///   no dbb_1x1; dbb_avg is only a k x k average pool (stride, padding k/2, zeros counted:
///   count_include_pad) -> `dbb_avg.avgbn.*`; dbb_1x1_kxk has internal width T = 2I and a
///   plain `dbb_1x1_kxk.conv1.weight` [2I, Ig, 1, 1] (then bn1 over 2I channels, conv2
///   [O, 2I/g, k, k]).
/// DbbOptions::internal_channels (0 = the rule above) overrides T as the reference's
/// internal_channels_1x1_3x3 does: T == I gives idconv1, any other T a plain conv1.
///
/// BN-and-pad: BN(x) padded by k/2 on every side with, per channel, the value
/// beta - running_mean * gamma / sqrt(running_var + eps) (what BN gives a zero input, so
/// the deployed zero-padded conv matches). In training the interior uses batch statistics
/// and the border the running statistics AFTER this forward's update, with gamma and beta
/// detached: the border passes no gradient to gamma, beta or the input.
///
/// The average pool runs as a depthwise conv with the constant kernel 1/k^2 (the same
/// numbers, zeros of the padding counted, and it reuses the cached conv primitives).
///
/// Initialisation (as the reference): PyTorch's default conv init, kaiming_uniform with
/// a = sqrt(5) (bound 1/sqrt(fan_in)), drawn from Rng(seed) in state-dict order for
/// dbb_origin, dbb_avg.conv, dbb_1x1, conv1 and conv2; idconv1 zero; every BN weight 1,
/// bias 0, running mean 0, running var 1.
///
/// Deploy (folded()): each branch folded with its own BN; 1x1-then-k x k pairs merged per
/// group, K[o, i] = sum_t k2[o, t] * k1[t, i], b = b2 + sum_{t,h,w} k2[o, t, h, w] * b1[t];
/// the average pool is the kernel A[o, o mod Og, :, :] = 1/k^2; the 1x1 branch is zero-padded
/// to the k x k centre; kernels and biases are summed (deployed names `dbb_reparam.*`).
///
/// Thread safety: a block is not safe to use from several threads at once (training and
/// eval forwards reuse the block's buffers). Deploy it for concurrent inference.

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "orepa/blocks/conv_bn.hpp"
#include "orepa/core/activation.hpp"
#include "orepa/deploy/deployed_conv.hpp"
#include "orepa/engine/batch_norm.hpp"
#include "orepa/engine/conv.hpp"

namespace orepa {

namespace detail::baseline {


/// A bias-free convolution owning its weight (a Param named `name`) and its engine (one
/// engine per conv, so each caches its own oneDNN primitives).
///
/// "Identity based" (DBB's idconv1): the conv applies `weight + id`, id[t, t mod Ig] = 1,
/// a [C, C/g, 1, 1] kernel that is rebuilt, never stored. The gradient of `weight` is that
/// of the applied kernel.
///
/// The caller owns the conv input and passes it again to backward (no pointer is kept,
/// so the owning block stays movable between forward and backward).
template <class S>
class BaselineConv {
 public:
  /// Kernel g.weight_shape(), kaiming-uniform with PyTorch's default a = sqrt(5) unless
  /// `identity_based` (then zero, as the reference initialises idconv1).
  BaselineConv(const ConvGeometry& g, std::string name, Rng& rng, bool identity_based = false)
      : weight(std::move(name), Tensor<S>(g.weight_shape()), ParamKind::kernel), identity_(identity_based), engine_(g) {
    if (identity_ && (g.kernel != 1 || g.in_channels != g.out_channels))
      throw config_error(detail::cat(weight.name, ": an identity-based conv must be 1x1 with in == out channels, got ",
                                     g.in_channels, " -> ", g.out_channels, " k", g.kernel));
    if (!identity_) kaiming_uniform(weight.value, torch_default_conv_a, rng);
  }

  /// The conv's geometry.
  const ConvGeometry& geometry() const { return engine_.geometry(); }
  /// True when the conv applies weight + id.
  bool identity_based() const { return identity_; }

  /// The kernel the conv applies: `weight`, or `weight + id` when identity based.
  Tensor<S> kernel() const {
    Tensor<S> k;
    kernel_into(k);
    return k;
  }

  /// Training forward y = conv(x, kernel); remembers the applied kernel for backward.
  void forward_train(const Tensor<S>& x, Tensor<S>& y) {
    engine_.forward(x, applied_kernel(), y);
  }
  /// Same with the current weight and nothing remembered.
  void forward_eval(const Tensor<S>& x, Tensor<S>& y) const {
    if (!identity_) return engine_.forward(x, weight.value, y);
    Tensor<S> k;
    kernel_into(k);
    engine_.forward(x, k, y);
  }
  /// Backward of the last forward_train, whose input was `x`: accumulates dL/dweight and,
  /// when `dx` is non-null, writes dL/dx into it.
  void backward(const Tensor<S>& x, const Tensor<S>& dy, Tensor<S>* dx) {
    engine_.backward_weights(x, dy, dw_);
    if (weight.grad.sizes() != dw_.sizes())  // only if someone replaced the weight with another shape
      weight.grad.expect_shape(dw_.sizes(), weight.name + " gradient");
    for (std::int64_t j = 0; j < dw_.numel(); ++j) weight.grad[j] += dw_[j];
    if (dx) engine_.backward_data(dy, identity_ ? k_ : weight.value, x.sizes(), *dx);
  }

  /// Primitive sets its engine has created (one per input shape).
  std::int64_t primitive_creations() const { return engine_.primitive_creations(); }

  Param<S> weight;

 private:
  const Tensor<S>& applied_kernel() {
    if (!identity_) return weight.value;
    kernel_into(k_);
    return k_;
  }
  void kernel_into(Tensor<S>& k) const {
    k.resize(weight.value.sizes());
    std::copy(weight.value.begin(), weight.value.end(), k.begin());
    if (!identity_) return;
    const std::int64_t C = k.size(0), Cg = k.size(1);
    for (std::int64_t t = 0; t < C; ++t) k[t * Cg + t % Cg] += S(1);
  }

  bool identity_;
  mutable engine::ConvEngine<S> engine_;  // forward_eval is const but the engine caches primitives
  Tensor<S> k_, dw_;                      // applied kernel (identity based), weight-gradient scratch
};

/// Scales output channel o of a kernel [O, ...] by bn's s[o] = gamma / sqrt(var + eps)
/// and returns it with the bias beta - running_mean * s (BN folding, SPEC section 6).
template <class S>
std::pair<Tensor<S>, Tensor<S>> fold_bn(Tensor<S> kernel, const engine::BatchNorm<S>& bn) {
  Tensor<S> scale, shift;
  bn.fold(scale, shift);
  const std::int64_t O = kernel.size(0), per_o = kernel.numel() / O;
  if (O != bn.channels())
    throw shape_error(detail::cat("fold_bn (", bn.prefix(), "): kernel ", shape_str(kernel.sizes()),
                                  " has ", O, " output channels, BN has ", bn.channels()));
  for (std::int64_t j = 0; j < kernel.numel(); ++j) kernel[j] *= scale[j / per_o];
  return {std::move(kernel), std::move(shift)};
}

/// conv -> BN, the body of ConvBN and of DBB's dbb_origin / dbb_1x1. Tensor names are
/// `prefix + "conv.weight"` and `prefix + "bn.*"`. Saves the conv output (BN's input)
/// for backward; the caller keeps the conv input.
template <class S>
class ConvBNPath {
 public:
  /// Conv with geometry g (PyTorch default init from rng) and a BN over its outputs.
  ConvBNPath(const ConvGeometry& g, const std::string& prefix, Rng& rng)
      : conv(g, prefix + "conv.weight", rng), bn(g.out_channels, prefix + "bn.") {}

  /// z = BN(conv(x)) with batch statistics (running statistics updated).
  void forward_train(const Tensor<S>& x, Tensor<S>& z) {
    conv.forward_train(x, y_);
    bn.forward_train(y_, z);
  }
  /// z = BN(conv(x)) with the running statistics.
  void forward_eval(const Tensor<S>& x, Tensor<S>& z) const {
    Tensor<S> y;
    conv.forward_eval(x, y);
    bn.forward_eval(y, z);
  }
  /// From dL/dz of the last forward_train (input `x`): accumulates the conv and BN
  /// gradients and writes dL/dx into `dx`.
  void backward(const Tensor<S>& x, const Tensor<S>& dz, Tensor<S>& dx) {
    bn.backward(y_, dz, dy_);
    conv.backward(x, dy_, &dx);
  }
  /// conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var (state-dict order).
  ParamList<S> params() {
    ParamList<S> all{&conv.weight};
    for (auto* p : bn.params()) all.push_back(p);
    return all;
  }
  /// BN-folded kernel and bias.
  std::pair<Tensor<S>, Tensor<S>> folded() const { return fold_bn(conv.kernel(), bn); }

  BaselineConv<S> conv;
  engine::BatchNorm<S> bn;

 private:
  Tensor<S> y_, dy_;  // conv output saved for BN's backward; BN's input gradient
};

/// dL/d(pre-activation) = grad_out * act'(pre), into `d` (resized).
template <class S, class Act>
void activation_backward(const Act& act, const Tensor<S>& pre, const Tensor<S>& grad_out, Tensor<S>& d) {
  d.resize(pre.sizes());
  for (std::int64_t j = 0; j < pre.numel(); ++j) d[j] = grad_out[j] * act.derivative(pre[j]);
}



/// Adds `b` into `a` element-wise (same shape).
template <class S>
void add_into(Tensor<S>& a, const Tensor<S>& b) {
  a.expect_shape(b.sizes(), "add_into");
  for (std::int64_t j = 0; j < a.numel(); ++j) a[j] += b[j];
}

/// DBB's BN-and-pad layer: BN, then a border of `pad` pixels filled per channel with
/// beta - running_mean * gamma / sqrt(running_var + eps). The BN's names are
/// `prefix + "bn.*"` (the reference nests an nn.BatchNorm2d called `bn`).
template <class S>
class BNAndPad {
 public:
  BNAndPad(std::int64_t channels, std::int64_t pad, const std::string& prefix)
      : bn(channels, prefix + "bn."), pad_(pad) {}

  /// Border width in pixels (k/2 in DBB).
  std::int64_t pad() const { return pad_; }

  /// Training: interior = BN(y) with batch statistics (this updates the running
  /// statistics), border from the UPDATED running statistics.
  void forward_train(const Tensor<S>& y, Tensor<S>& out) {
    bn.forward_train(y, z_);
    pad_into(z_, out);
  }
  /// Eval: interior and border from the running statistics.
  void forward_eval(const Tensor<S>& y, Tensor<S>& out) const {
    Tensor<S> z;
    bn.forward_eval(y, z);
    pad_into(z, out);
  }
  /// From dL/d(padded output) to dL/dy (BN input `y` of the last forward_train),
  /// accumulating dL/dgamma and dL/dbeta. The border is a detached constant, so only the
  /// interior of `dout` is used.
  void backward(const Tensor<S>& y, const Tensor<S>& dout, Tensor<S>& dy) {
    const std::int64_t N = y.size(0), C = y.size(1), H = y.size(2), W = y.size(3);
    const std::int64_t PH = H + 2 * pad_, PW = W + 2 * pad_;
    if (dout.dim() != 4 || dout.size(0) != N || dout.size(1) != C || dout.size(2) != PH || dout.size(3) != PW)
      dout.expect_shape({N, C, PH, PW}, bn.prefix() + " BN-and-pad grad_output");  // throws, naming both shapes
    dz_.resize(y.sizes());
    for (std::int64_t nc = 0; nc < N * C; ++nc)
      for (std::int64_t h = 0; h < H; ++h) {
        const S* src = dout.data() + (nc * PH + h + pad_) * PW + pad_;
        std::copy(src, src + W, dz_.data() + (nc * H + h) * W);
      }
    bn.backward(y, dz_, dy);
  }
  /// The border value of channel `c` from the current running statistics.
  S border_value(std::int64_t c) const {
    const double s = double(bn.weight.value[c]) / std::sqrt(double(bn.running_var.value[c]) + bn.eps);
    return S(double(bn.bias.value[c]) - double(bn.running_mean.value[c]) * s);
  }

  engine::BatchNorm<S> bn;

 private:
  void pad_into(const Tensor<S>& z, Tensor<S>& out) const {
    const std::int64_t N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3);
    const std::int64_t PH = H + 2 * pad_, PW = W + 2 * pad_;
    out.resize({N, C, PH, PW});
    for (std::int64_t c = 0; c < C; ++c) {
      const S v = border_value(c);
      for (std::int64_t n = 0; n < N; ++n) {
        S* plane = out.data() + (n * C + c) * PH * PW;
        const S* src = z.data() + (n * C + c) * H * W;
        std::fill(plane, plane + pad_ * PW, v);                       // top rows
        std::fill(plane + (pad_ + H) * PW, plane + PH * PW, v);       // bottom rows
        for (std::int64_t h = 0; h < H; ++h) {
          S* row = plane + (h + pad_) * PW;
          std::fill(row, row + pad_, v);
          std::copy(src + h * W, src + (h + 1) * W, row + pad_);
          std::fill(row + pad_ + W, row + PW, v);
        }
      }
    }
  }

  std::int64_t pad_;
  Tensor<S> z_, dz_;  // BN output before padding; cropped gradient
};

/// A k x k average pool over `channels` channels (zero padding counted, PyTorch's
/// count_include_pad), run as a depthwise conv with the constant kernel 1/k^2.
template <class S>
class AvgPoolConv {
 public:
  AvgPoolConv(std::int64_t channels, std::int64_t k, std::int64_t stride, std::int64_t padding)
      : engine_(geometry(channels, k, stride, padding)), weight_({channels, 1, k, k}, S(1.0 / double(k * k))) {}

  /// y = the average pool of x.
  void forward(const Tensor<S>& x, Tensor<S>& y) const { engine_.forward(x, weight_, y); }
  /// dL/dx for an input shaped `x_shape` (the pool has no parameters).
  void backward(const Tensor<S>& dy, const Shape& x_shape, Tensor<S>& dx) {
    engine_.backward_data(dy, weight_, x_shape, dx);
  }
  /// Primitive sets its engine has created.
  std::int64_t primitive_creations() const { return engine_.primitive_creations(); }

 private:
  static ConvGeometry geometry(std::int64_t C, std::int64_t k, std::int64_t s, std::int64_t p) {
    ConvGeometry g;
    g.in_channels = g.out_channels = g.groups = C;
    g.kernel = k, g.stride = s, g.padding = p;
    return g;
  }
  mutable engine::ConvEngine<S> engine_;
  Tensor<S> weight_;
};

/// The average pool as a conv kernel over `channels` channels in `groups` groups:
/// A[o, o mod (channels/groups), :, :] = 1/k^2, shape [channels, channels/groups, k, k].
template <class S>
Tensor<S> avg_pool_kernel(std::int64_t channels, std::int64_t k, std::int64_t groups) {
  const std::int64_t per = channels / groups;
  Tensor<S> a({channels, per, k, k});
  for (std::int64_t o = 0; o < channels; ++o)
    for (std::int64_t j = 0; j < k * k; ++j) a[(o * per + o % per) * k * k + j] = S(1.0 / double(k * k));
  return a;
}

/// Merges a 1x1 conv (k1 [T, Ig, 1, 1], bias b1 [T]) followed by a k x k conv (k2
/// [O, T/g, k, k], bias b2 [O]), both with `groups`, into one conv [O, Ig, k, k]:
/// K[o, i] = sum_t k2[o, t] * k1[t, i] within o's group, b = b2 + sum_{t,h,w} k2[o,t,h,w] * b1[t].
/// (Exact for the block only because the layer between them pads with b1: BN-and-pad.)
template <class S>
std::pair<Tensor<S>, Tensor<S>> merge_1x1_kxk(const Tensor<S>& k1, const Tensor<S>& b1, const Tensor<S>& k2,
                                              const Tensor<S>& b2, std::int64_t groups) {
  const std::int64_t T = k1.size(0), Ig = k1.size(1), O = k2.size(0), Tg = k2.size(1), kh = k2.size(2), kw = k2.size(3);
  if (k1.size(2) != 1 || k1.size(3) != 1 || T != Tg * groups || O % groups != 0)
    throw shape_error(detail::cat("merge_1x1_kxk: kernels ", shape_str(k1.sizes()), " and ", shape_str(k2.sizes()),
                                  " do not chain with groups ", groups));
  const std::int64_t Og = O / groups, area = kh * kw;
  Tensor<S> K({O, Ig, kh, kw});
  Tensor<S> b = b2;
  for (std::int64_t o = 0; o < O; ++o) {
    const std::int64_t t0 = (o / Og) * Tg;  // first internal channel of o's group
    for (std::int64_t u = 0; u < Tg; ++u) {
      const S* w2 = k2.data() + (o * Tg + u) * area;
      const S* w1 = k1.data() + (t0 + u) * Ig;
      for (std::int64_t j = 0; j < area; ++j) {
        b[o] += w2[j] * b1[t0 + u];
        for (std::int64_t i = 0; i < Ig; ++i) K[(o * Ig + i) * area + j] += w2[j] * w1[i];
      }
    }
  }
  return {std::move(K), std::move(b)};
}

/// A 1x1 kernel [O, Ig, 1, 1] zero-padded to the centre of a k x k one.
template <class S>
Tensor<S> pad_to_centre(const Tensor<S>& k1, std::int64_t k) {
  const std::int64_t O = k1.size(0), Ig = k1.size(1);
  Tensor<S> K({O, Ig, k, k});
  for (std::int64_t j = 0; j < O * Ig; ++j) K[j * k * k + (k / 2) * k + k / 2] = k1[j];
  return K;
}

/// DBB's `dbb_avg` branch: [1x1 conv -> BN-and-pad ->] k x k average pool -> avgbn.
template <class S>
class DbbAvgBranch {
 public:
  /// With the 1x1 conv when g < O (pool padding 0 after BN-and-pad), else a padded pool.
  DbbAvgBranch(const ConvGeometry& g, bool with_conv, Rng& rng)
      : pool(g.out_channels, g.kernel, g.stride, with_conv ? 0 : g.padding),
        avgbn(g.out_channels, "dbb_avg.avgbn."),
        k_(g.kernel),
        groups_(g.groups) {
    if (with_conv) {
      ConvGeometry c1{g.in_channels, g.out_channels, 1, 1, 0, 1, g.groups};
      conv.emplace(c1, "dbb_avg.conv.weight", rng);
      bnpad.emplace(g.out_channels, g.padding, "dbb_avg.bn.");
    }
  }

  /// Training forward of the branch on the block input x into z; saves what backward needs.
  void forward_train(const Tensor<S>& x, Tensor<S>& z) {
    if (conv) {
      conv->forward_train(x, c_);
      bnpad->forward_train(c_, p_);
      pool.forward(p_, q_);
    } else {
      pool.forward(x, q_);
    }
    avgbn.forward_train(q_, z);
  }
  /// Eval forward (running statistics, nothing saved).
  void forward_eval(const Tensor<S>& x, Tensor<S>& z) const {
    Tensor<S> c, p, q;
    if (conv) {
      conv->forward_eval(x, c);
      bnpad->forward_eval(c, p);
      pool.forward(p, q);
    } else {
      pool.forward(x, q);
    }
    avgbn.forward_eval(q, z);
  }
  /// From dL/dz of the last forward_train (block input x): accumulates the branch's
  /// parameter gradients and writes its share of dL/dx into dx.
  void backward(const Tensor<S>& x, const Tensor<S>& dz, Tensor<S>& dx) {
    avgbn.backward(q_, dz, dq_);
    if (!conv) return pool.backward(dq_, x.sizes(), dx);
    pool.backward(dq_, p_.sizes(), dp_);
    bnpad->backward(c_, dp_, dc_);
    conv->backward(x, dc_, &dx);
  }
  /// State-dict order: conv.weight, bn.bn.*, avgbn.*.
  ParamList<S> params() {
    ParamList<S> all;
    if (conv) {
      all.push_back(&conv->weight);
      for (auto* p : bnpad->bn.params()) all.push_back(p);
    }
    for (auto* p : avgbn.params()) all.push_back(p);
    return all;
  }
  /// Appends the branch's BNs in state-dict order.
  void batch_norms(std::vector<engine::BatchNorm<S>*>& out) {
    if (bnpad) out.push_back(&bnpad->bn);
    out.push_back(&avgbn);
  }
  /// The branch as one conv: the pool kernel folded with avgbn, preceded (g < O) by the
  /// 1x1 conv folded with its BN-and-pad BN.
  std::pair<Tensor<S>, Tensor<S>> folded() const {
    auto second = fold_bn(avg_pool_kernel<S>(avgbn.channels(), k_, groups_), avgbn);
    if (!conv) return second;
    auto first = fold_bn(conv->kernel(), bnpad->bn);
    return merge_1x1_kxk(first.first, first.second, second.first, second.second, groups_);
  }
  /// Primitive sets created by the branch's engines.
  std::int64_t primitive_creations() const {
    return pool.primitive_creations() + (conv ? conv->primitive_creations() : 0);
  }

  std::optional<BaselineConv<S>> conv;  ///< dbb_avg.conv (g < O only)
  std::optional<BNAndPad<S>> bnpad;     ///< dbb_avg.bn (g < O only)
  AvgPoolConv<S> pool;
  engine::BatchNorm<S> avgbn;

 private:
  std::int64_t k_, groups_;
  Tensor<S> c_, p_, q_, dq_, dp_, dc_;  // saved activations and their gradients (reused)
};

/// DBB's `dbb_1x1_kxk` branch: 1x1 conv I -> T (identity based when T == I) -> BN-and-pad
/// -> k x k conv T -> O (stride, padding 0) -> BN.
template <class S>
class Dbb1x1KxkBranch {
 public:
  /// Internal width T for the block geometry g (idconv1 when T == I).
  Dbb1x1KxkBranch(const ConvGeometry& g, std::int64_t T, Rng& rng)
      : conv1(ConvGeometry{g.in_channels, T, 1, 1, 0, 1, g.groups},
              T == g.in_channels ? "dbb_1x1_kxk.idconv1.weight" : "dbb_1x1_kxk.conv1.weight", rng,
              T == g.in_channels),
        bn1(T, g.padding, "dbb_1x1_kxk.bn1."),
        conv2(ConvGeometry{T, g.out_channels, g.kernel, g.stride, 0, 1, g.groups}, "dbb_1x1_kxk.conv2.weight", rng),
        bn2(g.out_channels, "dbb_1x1_kxk.bn2."),
        groups_(g.groups) {}

  /// Training forward of the branch on the block input x into z; saves what backward needs.
  void forward_train(const Tensor<S>& x, Tensor<S>& z) {
    conv1.forward_train(x, c1_);
    bn1.forward_train(c1_, p_);
    conv2.forward_train(p_, c2_);
    bn2.forward_train(c2_, z);
  }
  /// Eval forward (running statistics, nothing saved).
  void forward_eval(const Tensor<S>& x, Tensor<S>& z) const {
    Tensor<S> c1, p, c2;
    conv1.forward_eval(x, c1);
    bn1.forward_eval(c1, p);
    conv2.forward_eval(p, c2);
    bn2.forward_eval(c2, z);
  }
  /// From dL/dz of the last forward_train (block input x): accumulates the branch's
  /// parameter gradients and writes its share of dL/dx into dx.
  void backward(const Tensor<S>& x, const Tensor<S>& dz, Tensor<S>& dx) {
    bn2.backward(c2_, dz, dc2_);
    conv2.backward(p_, dc2_, &dp_);
    bn1.backward(c1_, dp_, dc1_);
    conv1.backward(x, dc1_, &dx);
  }
  /// State-dict order: idconv1 (or conv1).weight, bn1.bn.*, conv2.weight, bn2.*.
  ParamList<S> params() {
    ParamList<S> all{&conv1.weight};
    for (auto* p : bn1.bn.params()) all.push_back(p);
    all.push_back(&conv2.weight);
    for (auto* p : bn2.params()) all.push_back(p);
    return all;
  }
  /// Appends the branch's BNs in state-dict order.
  void batch_norms(std::vector<engine::BatchNorm<S>*>& out) {
    out.push_back(&bn1.bn);
    out.push_back(&bn2);
  }
  /// conv1 (weight + id) folded with bn1, conv2 folded with bn2, merged per group.
  std::pair<Tensor<S>, Tensor<S>> folded() const {
    auto first = fold_bn(conv1.kernel(), bn1.bn);
    auto second = fold_bn(conv2.kernel(), bn2);
    return merge_1x1_kxk(first.first, first.second, second.first, second.second, groups_);
  }
  /// Primitive sets created by the branch's engines.
  /// Primitive sets created by the branch's engines.
  std::int64_t primitive_creations() const { return conv1.primitive_creations() + conv2.primitive_creations(); }

  BaselineConv<S> conv1;  ///< idconv1 (T == I) or conv1
  BNAndPad<S> bn1;
  BaselineConv<S> conv2;
  engine::BatchNorm<S> bn2;

 private:
  std::int64_t groups_;
  Tensor<S> c1_, p_, c2_, dc2_, dp_, dc1_;  // saved activations and their gradients (reused)
};

}  // namespace detail::baseline

/// The Diverse Branch Block, `DBB<float, ReLU> b(ConvOptions(16, 32, 3).groups(2));`
/// (see the file comment for the branches, variants, initialisation and deploy).
template <class S = float, class Act = Identity>
class DBB {
 public:
  /// The options type the block is built from.
  using Options = DbbOptions;
  /// Builds the block from `opts` (`seed` drives the conv init).
  /// Throws config_error on an invalid geometry, an even kernel, padding != k/2,
  /// dilation != 1, g >= O with I != O, or internal channels not divisible by groups.
  explicit DBB(const DbbOptions& opts, Act act = {}) : DBB(checked(opts), act, Rng(opts.seed())) {}
  /// Move constructor (DBB is move-only).
  DBB(DBB&&) noexcept = default;
  /// Move assignment.
  DBB& operator=(DBB&&) noexcept = default;

  /// The block's (and the deployed conv's) geometry.
  const ConvGeometry& geometry() const { return g_; }
  /// "DBB", for messages.
  const std::string& type_name() const { return type_name_; }
  /// The activation functor.
  const Act& activation() const { return act_; }
  /// Internal channels T of dbb_1x1_kxk.
  std::int64_t internal_channels() const { return T_; }
  /// True for the g < O variant (with dbb_1x1 and dbb_avg.conv), false for g >= O.
  bool has_1x1_branch() const { return one_.has_value(); }

  /// Training forward: every branch on the activations with its own BN (batch
  /// statistics; all running statistics updated), summed, activated. Returns the block's
  /// output buffer, valid until the next forward_train. x is [N, I, H, W] with more
  /// than one output value per channel.
  const Tensor<S>& forward_train(const Tensor<S>& x) {
    const Shape ys = g_.output_shape(x.sizes(), "DBB::forward_train");
    if (ys[0] * ys[2] * ys[3] < 2)
      throw state_error(detail::cat("DBB::forward_train: BN needs more than one value per channel; input ",
                                    shape_str(x.sizes()), " gives output ", shape_str(ys)));
    x_.resize(x.sizes());  // every branch's first conv needs the input again in backward
    std::copy(x.begin(), x.end(), x_.begin());
    // Summed in the reference's order: origin, 1x1, avg, 1x1_kxk.
    origin_.forward_train(x_, pre_);
    if (one_) {
      one_->forward_train(x_, branch_);
      detail::baseline::add_into(pre_, branch_);
    }
    avg_.forward_train(x_, branch_);
    detail::baseline::add_into(pre_, branch_);
    kxk_.forward_train(x_, branch_);
    detail::baseline::add_into(pre_, branch_);
    out_.resize(pre_.sizes());
    for (std::int64_t j = 0; j < pre_.numel(); ++j) out_[j] = act_(pre_[j]);
    has_forward_ = true;
    return out_;
  }

  /// Eval forward, branch by branch with the running statistics (no state change); equal
  /// to deploy().forward(x) up to round-off.
  Tensor<S> forward_eval(const Tensor<S>& x) const {
    g_.output_shape(x.sizes(), "DBB::forward_eval");
    Tensor<S> pre, branch;
    origin_.forward_eval(x, pre);
    if (one_) {
      one_->forward_eval(x, branch);
      detail::baseline::add_into(pre, branch);
    }
    avg_.forward_eval(x, branch);
    detail::baseline::add_into(pre, branch);
    kxk_.forward_eval(x, branch);
    detail::baseline::add_into(pre, branch);
    for (auto& v : pre) v = act_(v);
    return pre;
  }

  /// Backward of the last forward_train for dL/d(output): runs every branch's backward,
  /// accumulates every parameter gradient (until zero_grad) and returns dL/dx (the
  /// block's buffer).
  const Tensor<S>& backward(const Tensor<S>& grad_out) {
    if (!has_forward_) throw state_error("DBB::backward: call forward_train first");
    grad_out.expect_shape(out_.sizes(), "DBB::backward grad_output");
    detail::baseline::activation_backward(act_, pre_, grad_out, dpre_);
    origin_.backward(x_, dpre_, dx_);
    if (one_) {
      one_->backward(x_, dpre_, dbranch_);
      detail::baseline::add_into(dx_, dbranch_);
    }
    avg_.backward(x_, dpre_, dbranch_);
    detail::baseline::add_into(dx_, dbranch_);
    kxk_.backward(x_, dpre_, dbranch_);
    detail::baseline::add_into(dx_, dbranch_);
    return dx_;
  }

  /// Every tensor in state-dict order (the reference registers dbb_origin, dbb_avg,
  /// dbb_1x1, dbb_1x1_kxk in that order), names as in the state dict.
  ParamList<S> parameters() {
    ParamList<S> all = origin_.params();
    for (auto* p : avg_.params()) all.push_back(p);
    if (one_)
      for (auto* p : one_->params()) all.push_back(p);
    for (auto* p : kxk_.params()) all.push_back(p);
    return all;
  }
  /// The BatchNorms of the block in state-dict order (prefix() is each one's name prefix).
  std::vector<engine::BatchNorm<S>*> batch_norms() {
    std::vector<engine::BatchNorm<S>*> all{&origin_.bn};
    avg_.batch_norms(all);
    if (one_) all.push_back(&one_->bn);
    kxk_.batch_norms(all);
    return all;
  }
  /// The BatchNorm whose prefix is `prefix` (e.g. "dbb_avg.bn.bn."); throws config_error if absent.
  engine::BatchNorm<S>& batch_norm(const std::string& prefix) {
    std::string names;
    for (auto* bn : batch_norms()) {
      if (bn->prefix() == prefix) return *bn;
      names += " " + bn->prefix();
    }
    throw config_error("DBB: no BatchNorm with prefix '" + prefix + "'; it has:" + names);
  }
  /// The tensor called `name` (throws config_error listing the names if absent).
  Param<S>& param(const std::string& name) {
    std::string names;
    for (auto* p : parameters()) {
      if (p->name == name) return *p;
      names += " " + p->name;
    }
    throw config_error("DBB: no tensor named '" + name + "'; it has:" + names);
  }
  /// Zeroes every gradient.
  void zero_grad() {
    for (auto* p : parameters())
      if (p->trainable()) p->zero_grad();
  }

  /// The deploy kernel [O, I/g, k, k] and bias [O]: every branch folded with its own BN
  /// (1x1-then-k x k pairs merged per group, the 1x1 branch centred), summed.
  std::pair<Tensor<S>, Tensor<S>> folded() const {
    std::pair<Tensor<S>, Tensor<S>> sum = origin_.folded();
    auto& [w, b] = sum;
    // Captures `sum`, not the bindings: lambdas may not capture structured bindings in C++17.
    auto add = [&sum](const std::pair<Tensor<S>, Tensor<S>>& kb) {
      detail::baseline::add_into(sum.first, kb.first);
      detail::baseline::add_into(sum.second, kb.second);
    };
    if (one_) {
      auto kb = one_->folded();
      add({detail::baseline::pad_to_centre(kb.first, g_.kernel), std::move(kb.second)});
    }
    add(avg_.folded());
    add(kxk_.folded());
    return {std::move(w), std::move(b)};
  }
  /// The deployed single convolution (folded kernel + bias, activation fused).
  DeployedConv<S, Act> deploy() const {
    auto [w, b] = folded();
    return DeployedConv<S, Act>(g_, std::move(w), std::move(b), act_);
  }

  /// Primitive sets created by all of the block's training engines (each conv and the
  /// pool has one engine; each creates one set per input shape).
  std::int64_t primitive_creations() const {
    return origin_.conv.primitive_creations() + (one_ ? one_->conv.primitive_creations() : 0) +
           avg_.primitive_creations() + kxk_.primitive_creations();
  }

 private:
  struct Checked {
    ConvGeometry g;
    std::int64_t T;
  };
  static Checked checked(const DbbOptions& opts) {
    const ConvGeometry g = opts.geometry();
    g.validate("DBB");  // channels, odd kernel, stride, groups dividing both channel counts
    if (g.padding != g.kernel / 2)
      throw config_error(detail::cat("DBB: padding must be kernel_size / 2 = ", g.kernel / 2, ", got ", g.padding));
    if (g.dilation != 1)
      throw config_error(detail::cat("DBB: dilation must be 1 (the branches only line up then), got ", g.dilation));
    const bool narrow = g.groups < g.out_channels;
    if (!narrow && g.in_channels != g.out_channels)
      throw config_error(detail::cat("DBB: with groups >= out_channels the padded-pool branch needs in_channels == "
                                     "out_channels, got ", g.in_channels, " and ", g.out_channels));
    const std::int64_t T = opts.internal_channels() > 0 ? opts.internal_channels()
                           : narrow                     ? g.in_channels
                                                        : 2 * g.in_channels;
    if (T % g.groups != 0)
      throw config_error(detail::cat("DBB: internal channels ", T, " must be divisible by groups ", g.groups));
    return {g, T};
  }
  // Members are initialised in declaration order, which is the reference's init order.
  DBB(const Checked& c, Act act, Rng&& rng)
      : g_(c.g),
        T_(c.T),
        act_(act),
        origin_(c.g, "dbb_origin.", rng),
        avg_(c.g, c.g.groups < c.g.out_channels, rng),
        one_(make_1x1(c.g, rng)),
        kxk_(c.g, c.T, rng) {}
  static std::optional<detail::baseline::ConvBNPath<S>> make_1x1(const ConvGeometry& g, Rng& rng) {
    if (g.groups >= g.out_channels) return std::nullopt;
    return detail::baseline::ConvBNPath<S>(ConvGeometry{g.in_channels, g.out_channels, 1, g.stride, 0, 1, g.groups}, "dbb_1x1.",
                                 rng);
  }

  ConvGeometry g_;
  std::int64_t T_;
  std::string type_name_ = "DBB";
  Act act_;
  detail::baseline::ConvBNPath<S> origin_;
  detail::baseline::DbbAvgBranch<S> avg_;
  std::optional<detail::baseline::ConvBNPath<S>> one_;  // dbb_1x1 (g < O only)
  detail::baseline::Dbb1x1KxkBranch<S> kxk_;
  // Reused buffers: saved input and pre-activation, output, one branch's output, gradients.
  Tensor<S> x_, pre_, out_, branch_, dpre_, dx_, dbranch_;
  bool has_forward_ = false;
};

}  // namespace orepa
