#pragma once
/// @file conv_bn.hpp
/// ConvBN<S, Act>: the plain baseline block y = act(BN(conv(x, W))) (SPEC section 5),
/// state-dict names `conv.weight` [O, I/g, k, k] (no conv bias) and `bn.*`; deployed as
/// one conv with W' = W * s[o], b = beta - running_mean * s, s = gamma / sqrt(var + eps).
///
/// Initialisation: PyTorch's default nn.Conv2d init (kaiming_uniform with a = sqrt(5),
/// i.e. bound 1/sqrt(fan_in)) from Rng(seed); BN weight 1, bias 0, running mean 0, var 1.
/// Any kernel size (odd or even), stride, padding (default k/2), dilation and groups.
///
/// Also defines the two internals the DBB baseline (dbb.hpp) is built from:
/// detail::baseline::BaselineConv (a bias-free conv owning its weight and its engine) and
/// detail::baseline::ConvBNPath (conv then BN, names under a prefix).
///
/// Thread safety: a block is not safe to use from several threads at once (training and
/// eval forwards reuse the block's buffers). Deploy it for concurrent inference.

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "orepa/blocks/options.hpp"
#include "orepa/core/activation.hpp"
#include "orepa/core/random.hpp"
#include "orepa/deploy/deployed_conv.hpp"
#include "orepa/engine/batch_norm.hpp"
#include "orepa/engine/conv.hpp"

namespace orepa {

namespace detail::baseline {

/// The `a` of PyTorch's default conv initialisation, kaiming_uniform_(w, a = sqrt(5)).
inline constexpr double torch_default_conv_a = 2.2360679774997896964;

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
    if (weight.grad.shape() != dw_.shape())  // only if someone replaced the weight with another shape
      weight.grad.expect_shape(dw_.shape(), weight.name + " gradient");
    for (std::int64_t j = 0; j < dw_.size(); ++j) weight.grad[j] += dw_[j];
    if (dx) engine_.backward_data(dy, identity_ ? k_ : weight.value, x.shape(), *dx);
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
    k.resize(weight.value.shape());
    std::copy(weight.value.begin(), weight.value.end(), k.begin());
    if (!identity_) return;
    const std::int64_t C = k.dim(0), Cg = k.dim(1);
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
  const std::int64_t O = kernel.dim(0), per_o = kernel.size() / O;
  if (O != bn.channels())
    throw shape_error(detail::cat("fold_bn (", bn.prefix(), "): kernel ", shape_str(kernel.shape()),
                                  " has ", O, " output channels, BN has ", bn.channels()));
  for (std::int64_t j = 0; j < kernel.size(); ++j) kernel[j] *= scale[j / per_o];
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
  d.resize(pre.shape());
  for (std::int64_t j = 0; j < pre.size(); ++j) d[j] = grad_out[j] * act.derivative(pre[j]);
}

}  // namespace detail::baseline

/// The plain conv + BN (+ activation) block: `ConvBN<float, SiLU> b(ConvOptions(16, 32, 3).stride(2));`.
template <class S = float, class Act = Identity>
class ConvBN {
 public:
  /// Builds the block from `opts` (padding -1 = k/2; `seed` drives the conv init).
  /// `prefix` is prepended to every tensor name (`prefix + "conv.weight"`, BN prefix
  /// `prefix + "bn."`) for a ConvBN nested in another block, e.g. RepVGG's "rbr_1x1.".
  /// Throws config_error on an invalid geometry; `internal_channels` and `weight_only`
  /// are OREPA options and must stay at their defaults.
  explicit ConvBN(const ConvOptions& opts, Act act = {}, const std::string& prefix = "")
      : ConvBN(opts, checked(opts), act, prefix) {}
  /// Move constructor (ConvBN is move-only).
  ConvBN(ConvBN&&) noexcept = default;
  /// Move assignment.
  ConvBN& operator=(ConvBN&&) noexcept = default;

  /// The conv's geometry (also the deployed conv's).
  const ConvGeometry& geometry() const { return g_; }
  /// "ConvBN", for messages.
  const std::string& type_name() const { return type_name_; }
  /// The activation functor.
  const Act& activation() const { return act_; }
  /// The BN (`bn.*`).
  engine::BatchNorm<S>& bn() { return path_.bn; }
  /// The BN (`bn.*`), read-only.
  const engine::BatchNorm<S>& bn() const { return path_.bn; }

  /// The (unfolded) conv kernel, a copy of `conv.weight`.
  Tensor<S> squeeze() const { return path_.conv.weight.value; }

  /// Training forward act(BN(conv(x))) with batch statistics (running statistics
  /// updated). Returns the block's output buffer, valid until the next forward_train.
  /// x is [N, I, H, W] with more than one output value per channel.
  const Tensor<S>& forward_train(const Tensor<S>& x) {
    const Shape ys = g_.output_shape(x.shape(), "ConvBN::forward_train");
    if (ys[0] * ys[2] * ys[3] < 2)
      throw state_error(detail::cat("ConvBN::forward_train: BN needs more than one value per channel; input ",
                                    shape_str(x.shape()), " gives output ", shape_str(ys)));
    x_.resize(x.shape());  // the conv's backward-weights needs the input: keep our own copy
    std::copy(x.begin(), x.end(), x_.begin());
    path_.forward_train(x_, pre_);
    out_.resize(pre_.shape());
    for (std::int64_t j = 0; j < pre_.size(); ++j) out_[j] = act_(pre_[j]);
    has_forward_ = true;
    return out_;
  }

  /// Eval forward with BN's running statistics (no state change).
  Tensor<S> forward_eval(const Tensor<S>& x) const {
    g_.output_shape(x.shape(), "ConvBN::forward_eval");
    Tensor<S> z;
    path_.forward_eval(x, z);
    for (auto& v : z) v = act_(v);
    return z;
  }

  /// Backward of the last forward_train for dL/d(output): accumulates every parameter
  /// gradient (until zero_grad) and returns dL/dx (the block's buffer).
  const Tensor<S>& backward(const Tensor<S>& grad_out) {
    if (!has_forward_) throw state_error("ConvBN::backward: call forward_train first");
    grad_out.expect_shape(out_.shape(), "ConvBN::backward grad_output");
    detail::baseline::activation_backward(act_, pre_, grad_out, dpre_);
    path_.backward(x_, dpre_, dx_);
    return dx_;
  }

  /// conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var (state-dict order,
  /// after the constructor's prefix).
  ParamList<S> parameters() { return path_.params(); }
  /// The BatchNorms of the block (for num_batches_tracked in state dicts).
  std::vector<engine::BatchNorm<S>*> batch_norms() { return {&path_.bn}; }
  /// The tensor called `name` (throws config_error listing the names if absent).
  Param<S>& param(const std::string& name) {
    std::string names;
    for (auto* p : parameters()) {
      if (p->name == name) return *p;
      names += " " + p->name;
    }
    throw config_error("ConvBN: no tensor named '" + name + "'; it has:" + names);
  }
  /// Zeroes every gradient.
  void zero_grad() {
    for (auto* p : parameters())
      if (p->trainable()) p->zero_grad();
  }

  /// The BN-folded kernel W * s[o] and bias beta - running_mean * s (deployed as
  /// `conv.weight` / `conv.bias`).
  std::pair<Tensor<S>, Tensor<S>> folded() const { return path_.folded(); }
  /// The deployed single convolution (folded kernel + bias, activation fused).
  DeployedConv<S, Act> deploy() const {
    auto [w, b] = folded();
    return DeployedConv<S, Act>(g_, std::move(w), std::move(b), act_);
  }

  /// Primitive sets the training engine has created (one per input shape).
  std::int64_t primitive_creations() const { return path_.conv.primitive_creations(); }

 private:
  static ConvGeometry checked(const ConvOptions& opts) {
    if (opts.internal_channels() != 0 || opts.weight_only())
      throw config_error("ConvBN: internal_channels and weight_only are OREPA options; leave them unset");
    const ConvGeometry g = opts.geometry();
    g.validate("ConvBN", false);
    return g;
  }
  ConvBN(const ConvOptions& opts, const ConvGeometry& g, Act act, const std::string& prefix)
      : g_(g), act_(act), path_(make_path(g, opts.seed(), prefix)) {}
  static detail::baseline::ConvBNPath<S> make_path(const ConvGeometry& g, std::uint64_t seed, const std::string& prefix) {
    Rng rng(seed);
    return detail::baseline::ConvBNPath<S>(g, prefix, rng);
  }

  ConvGeometry g_;
  std::string type_name_ = "ConvBN";
  Act act_;
  detail::baseline::ConvBNPath<S> path_;
  Tensor<S> x_, pre_, out_, dpre_, dx_;  // reused: saved input and pre-activation, output, gradients
  bool has_forward_ = false;
};

}  // namespace orepa
