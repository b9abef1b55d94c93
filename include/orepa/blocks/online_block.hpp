#pragma once
/// @file online_block.hpp
/// OnlineBlock<S, Act>: an online re-parameterised block built from a list of branches
/// (OREPA, OREPA_1x1, the RepVGG dense part, or a user's own list). Every training
/// forward squeezes the branches into ONE kernel, W = sum_r v[r][o] * K_r, and runs
/// y = act(BN(conv(x, W))) with batch statistics; backward runs the activation and BN
/// backward, the conv's backward-data and backward-weights, and the adjoint of the
/// squeeze into every branch parameter. It keeps for backward only its input and the
/// conv output (plus BN's per-channel statistics): nothing per branch.
///
/// Thread safety: a block is not safe to use from several threads at once (training and
/// eval forwards reuse the block's buffers). Deploy it for concurrent inference.

#include <string>

#include "orepa/branches/branch.hpp"
#include "orepa/core/activation.hpp"
#include "orepa/deploy/deployed_conv.hpp"
#include "orepa/engine/batch_norm.hpp"
#include "orepa/engine/conv.hpp"

namespace orepa {

/// Structural settings of an online block beyond its geometry and branches.
struct OnlineBlockConfig {
  std::string type_name = "OnlineBlock";  ///< used in error messages ("OREPA", ...)
  bool weight_only = false;               ///< no BN / forward: only squeeze() (LargeConv's inner layers)
  std::int64_t vector_rows = 0;           ///< rows of `vector`; 0 = one per branch (extra rows stay 0, unused)
  std::string bn_prefix = "bn.";          ///< state-dict prefix of the BN tensors
};

/// A block whose branches are squeezed into one kernel on every forward pass.
template <class S, class Act = Identity>
class OnlineBlock {
 public:
  /// `branches` in the row order of `vector`; `vector` row r starts at branch r's
  /// initial_scale(). Throws config_error on an invalid geometry or an empty list.
  OnlineBlock(const ConvGeometry& g, BranchList<S> branches, OnlineBlockConfig cfg = {}, Act act = {})
      : g_(g), cfg_(std::move(cfg)), branches_(std::move(branches)), act_(act), conv_(validated(g, cfg_)) {
    if (branches_.empty()) throw config_error(cfg_.type_name + ": needs at least one branch");
    const auto rows = cfg_.vector_rows ? cfg_.vector_rows : std::int64_t(branches_.size());
    if (rows < std::int64_t(branches_.size()))
      throw config_error(detail::cat(cfg_.type_name, ": vector_rows ", rows, " < number of branches ", branches_.size()));
    vector_ = Param<S>("vector", Tensor<S>({rows, g_.out_channels}), ParamKind::scale);
    for (std::size_t r = 0; r < branches_.size(); ++r) {
      if (!branches_[r]) throw config_error(detail::cat(cfg_.type_name, ": branch ", r, " is null"));
      for (std::int64_t o = 0; o < g_.out_channels; ++o) vector_.value(std::int64_t(r), o) = S(branches_[r]->initial_scale());
    }
    if (!cfg_.weight_only) bn_ = engine::BatchNorm<S>(g_.out_channels, cfg_.bn_prefix);
  }
  OnlineBlock(OnlineBlock&&) noexcept = default;
  OnlineBlock& operator=(OnlineBlock&&) noexcept = default;

  const ConvGeometry& geometry() const { return g_; }
  const OnlineBlockConfig& config() const { return cfg_; }
  const BranchList<S>& branches() const { return branches_; }
  Param<S>& scales() { return vector_; }
  engine::BatchNorm<S>& bn() { require_bn("bn()"); return bn_; }
  const engine::BatchNorm<S>& bn() const { require_bn("bn()"); return bn_; }
  const Act& activation() const { return act_; }

  /// The squeezed kernel W [O, I/g, k, k] = sum_r v[r] * K_r.
  Tensor<S> squeeze() const {
    Tensor<S> w;
    squeeze_into(w);
    return w;
  }
  /// Same, into `w` (buffer reused).
  void squeeze_into(Tensor<S>& w) const {
    w.reset(g_.weight_shape());
    Tensor<S>& k = scratch_kernel_;
    const std::int64_t O = g_.out_channels, per_o = w.size() / O;
    for (std::size_t r = 0; r < branches_.size(); ++r) {
      k.reset(g_.weight_shape());
      branches_[r]->kernel(k);
      for (std::int64_t o = 0; o < O; ++o) {
        const S v = vector_.value(std::int64_t(r), o);
        S* dst = w.data() + o * per_o;
        const S* src = k.data() + o * per_o;
        for (std::int64_t j = 0; j < per_o; ++j) dst[j] += v * src[j];
      }
    }
  }
  /// Adjoint of squeeze(): accumulates the gradients of `vector` and of every branch
  /// parameter from dL/dW. Costs a few kernel-sized products, independent of the batch.
  void squeeze_backward(const Tensor<S>& grad_w) {
    grad_w.expect_shape(g_.weight_shape(), cfg_.type_name + "::squeeze_backward grad_weight");
    Tensor<S>& k = scratch_kernel_;
    Tensor<S>& dk = scratch_grad_;
    const std::int64_t O = g_.out_channels, per_o = grad_w.size() / O;
    for (std::size_t r = 0; r < branches_.size(); ++r) {
      k.reset(g_.weight_shape());
      branches_[r]->kernel(k);
      dk.resize(g_.weight_shape());
      for (std::int64_t o = 0; o < O; ++o) {
        const S v = vector_.value(std::int64_t(r), o);
        const S* gw = grad_w.data() + o * per_o;
        const S* src = k.data() + o * per_o;
        S* d = dk.data() + o * per_o;
        S dv = 0;
        for (std::int64_t j = 0; j < per_o; ++j) { dv += gw[j] * src[j]; d[j] = v * gw[j]; }
        vector_.grad(std::int64_t(r), o) += dv;
      }
      branches_[r]->kernel_backward(dk);
    }
  }

  /// Training forward: squeeze, one convolution, BN with batch statistics (running
  /// statistics updated), activation. Returns a reference to the block's output buffer,
  /// valid until the next forward_train. x is [N, I, H, W] with N*OH*OW > 1.
  const Tensor<S>& forward_train(const Tensor<S>& x) {
    require_bn("forward_train");
    const Shape ys = g_.output_shape(x.shape(), (cfg_.type_name + "::forward_train").c_str());
    if (ys[0] * ys[2] * ys[3] < 2)
      throw state_error(detail::cat(cfg_.type_name, "::forward_train: BN needs more than one value per channel; input ",
                                    shape_str(x.shape()), " gives output ", shape_str(ys)));
    squeeze_into(w_);
    x_.resize(x.shape());
    std::copy(x.begin(), x.end(), x_.begin());
    conv_.forward(x_, w_, y_);
    bn_.forward_train(y_, out_);
    for (auto& v : out_) v = act_(v);
    has_forward_ = true;
    return out_;
  }

  /// Eval forward with BN's running statistics (no state changes).
  Tensor<S> forward_eval(const Tensor<S>& x) const {
    require_bn("forward_eval");
    g_.output_shape(x.shape(), (cfg_.type_name + "::forward_eval").c_str());
    Tensor<S> y, z;
    conv_.forward(x, squeeze(), y);
    bn_.forward_eval(y, z);
    for (auto& v : z) v = act_(v);
    return z;
  }

  /// Backward of the last forward_train for dL/d(output) `grad_out`: accumulates every
  /// parameter gradient and returns dL/dx (a reference to the block's buffer).
  const Tensor<S>& backward(const Tensor<S>& grad_out) {
    if (!has_forward_) throw state_error(cfg_.type_name + "::backward: call forward_train first");
    grad_out.expect_shape(out_.shape(), cfg_.type_name + "::backward grad_output");
    // Through the activation (pre-activation recomputed from the conv output).
    dz_.resize(y_.shape());
    const std::int64_t N = y_.dim(0), C = y_.dim(1), P = y_.dim(2) * y_.dim(3);
    for (std::int64_t b = 0; b < N; ++b)
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t j = (b * C + c) * P, e = j + P; j < e; ++j)
          dz_[j] = grad_out[j] * act_.derivative(bn_.affine(y_[j], c));
    bn_.backward(y_, dz_, dz_);
    conv_.backward_data(dz_, w_, x_.shape(), dx_);
    conv_.backward_weights(x_, dz_, dw_);
    squeeze_backward(dw_);
    return dx_;
  }

  /// Every tensor of the block in state-dict order (trainable ones first), names relative
  /// to the block.
  ParamList<S> parameters() {
    ParamList<S> all;
    for (auto& b : branches_)
      for (auto* p : b->params()) all.push_back(p);
    all.push_back(&vector_);
    if (!cfg_.weight_only)
      for (auto* p : bn_.params()) all.push_back(p);
    return all;
  }
  /// The tensor called `name` (throws config_error listing the names if absent).
  Param<S>& param(const std::string& name) {
    std::string names;
    for (auto* p : parameters()) {
      if (p->name == name) return *p;
      names += " " + p->name;
    }
    throw config_error(cfg_.type_name + ": no tensor named '" + name + "'; it has:" + names);
  }
  /// Zeroes every gradient.
  void zero_grad() {
    for (auto* p : parameters())
      if (p->trainable()) p->zero_grad();
  }

  /// The BN-folded kernel and bias (W * s[o], beta - mean * s) for deployment.
  std::pair<Tensor<S>, Tensor<S>> folded() const {
    require_bn("deploy");
    Tensor<S> w = squeeze(), scale, shift;
    bn_.fold(scale, shift);
    const std::int64_t per_o = w.size() / g_.out_channels;
    for (std::int64_t j = 0; j < w.size(); ++j) w[j] *= scale[j / per_o];
    return {std::move(w), std::move(shift)};
  }
  /// The deployed single convolution (folded kernel + bias, activation fused).
  DeployedConv<S, Act> deploy() const {
    auto [w, b] = folded();
    return DeployedConv<S, Act>(g_, std::move(w), std::move(b), act_);
  }

  /// Primitives the block's training engine has created (one set per input shape).
  std::int64_t primitive_creations() const { return conv_.primitive_creations(); }

 private:
  static ConvGeometry validated(const ConvGeometry& g, const OnlineBlockConfig& cfg) {
    g.validate(cfg.type_name.c_str());
    return g;
  }
  void require_bn(const char* what) const {
    if (cfg_.weight_only)
      throw state_error(cfg_.type_name + ": " + what + " is not available in weight_only mode (no BN)");
  }

  ConvGeometry g_;
  OnlineBlockConfig cfg_;
  BranchList<S> branches_;
  Param<S> vector_;
  engine::BatchNorm<S> bn_;
  Act act_;
  mutable engine::ConvEngine<S> conv_;
  // Reused buffers: saved for backward (x_, y_), output, gradients, squeeze scratch.
  Tensor<S> w_, x_, y_, out_, dz_, dx_, dw_;
  mutable Tensor<S> scratch_kernel_, scratch_grad_;
  bool has_forward_ = false;
};

}  // namespace orepa
