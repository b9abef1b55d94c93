#pragma once
/// @file squeezed_block.hpp
/// SqueezedBlock<S, Act>: what every online block shares once its kernel is known:
/// y = act(BN(conv(x, W))) with W produced by the subclass's squeeze on every training
/// forward, and backward that hands dL/dW to the subclass's squeeze adjoint. Subclasses:
/// OnlineBlock (a sum of branches: OREPA, OREPA_1x1, ...) and OREPA_LargeConv (a
/// composition of 3x3 OREPA kernels).
///
/// Saved for backward: the block input and the conv output (plus the kernel and BN's
/// per-channel statistics); the pre-activation is recomputed from them. Nothing per branch.
///
/// For float with a built-in activation (identity, ReLU, SiLU) a training step runs the
/// fused pipeline engine::FusedConvBnAct: conv, BN and the activation as oneDNN
/// primitives on the layout the convolution prefers, with reorders only at the block's
/// input and output, the reordered input saved for backward-weights. Other scalars and
/// user activations run the plain path (ConvEngine on NCHW, BatchNorm, element loops).
///
/// Thread safety: not safe to use from several threads at once (training and eval
/// forwards reuse the block's buffers). Deploy it for concurrent inference.

#include <string>

#include "orepa/core/activation.hpp"
#include "orepa/deploy/deployed_conv.hpp"
#include "orepa/engine/batch_norm.hpp"
#include "orepa/engine/conv.hpp"

namespace orepa {

/// Base of the blocks that squeeze their parameters into one conv kernel.
template <class S, class Act = Identity>
class SqueezedBlock {
 public:
  virtual ~SqueezedBlock() = default;
  /// Move constructor.
  SqueezedBlock(SqueezedBlock&&) noexcept = default;
  /// Move assignment.
  SqueezedBlock& operator=(SqueezedBlock&&) noexcept = default;

  /// The block's convolution geometry.
  const ConvGeometry& geometry() const { return g_; }
  /// Reference class name ("OREPA", "OREPA_1x1", ...), used in messages.
  const std::string& type_name() const { return type_name_; }
  /// False in weight_only mode (no BN: the block only yields its kernel).
  bool has_bn() const { return has_bn_; }
  /// The block's BatchNorm; throws config_error in weight_only mode.
  engine::BatchNorm<S>& bn() { require_bn("bn()"); return bn_; }
  /// The block's BatchNorm (read-only); throws config_error in weight_only mode.
  const engine::BatchNorm<S>& bn() const { require_bn("bn()"); return bn_; }
  /// The activation applied after BN.
  const Act& activation() const { return act_; }

  /// Writes the squeezed kernel [O, I/g, k, k] into `w` (buffer reused).
  virtual void squeeze_into(Tensor<S>& w) const = 0;
  /// Adjoint of the squeeze: accumulates parameter gradients from dL/dW.
  virtual void squeeze_backward(const Tensor<S>& grad_w) = 0;
  /// The tensors that make the kernel (parameters and buffers), state-dict names.
  virtual ParamList<S> kernel_parameters() = 0;

  /// The squeezed kernel.
  Tensor<S> squeeze() const {
    Tensor<S> w;
    squeeze_into(w);
    return w;
  }

  /// Training forward: squeeze, one convolution, BN with batch statistics (running
  /// statistics updated), activation. Returns the block's output buffer, valid until the
  /// next forward_train. x is [N, I, H, W] with more than one output value per channel.
  const Tensor<S>& forward_train(const Tensor<S>& x) {
    require_bn("forward_train");
    const Shape ys = g_.output_shape(x.sizes(), (type_name_ + "::forward_train").c_str());
    if (ys[0] * ys[2] * ys[3] < 2)
      throw state_error(detail::cat(type_name_, "::forward_train: BN needs more than one value per channel; input ",
                                    shape_str(x.sizes()), " gives output ", shape_str(ys)));
    squeeze_into(w_);
    if constexpr (kFused) {
      const std::int64_t C = g_.out_channels;
      stats_.resize({2 * C});
      fused().forward(x, w_, bn_.weight.value.data(), bn_.bias.value.data(), bn_.eps, out_, stats_.data(),
                      stats_.data() + C);
      bn_.set_batch_statistics(stats_.data(), stats_.data() + C, ys[0] * ys[2] * ys[3]);
    } else {
      x_.resize(x.sizes());
      std::copy(x.begin(), x.end(), x_.begin());
      conv_.forward(x_, w_, y_);
      bn_.forward_train(y_, out_);
      for (auto& v : out_) v = act_(v);
    }
    has_forward_ = true;
    return out_;
  }

  /// Eval forward with BN's running statistics (no state change).
  Tensor<S> forward_eval(const Tensor<S>& x) const {
    require_bn("forward_eval");
    g_.output_shape(x.sizes(), (type_name_ + "::forward_eval").c_str());
    Tensor<S> y, z;
    conv_.forward(x, squeeze(), y);
    bn_.forward_eval(y, z);
    for (auto& v : z) v = act_(v);
    return z;
  }

  /// Backward of the last forward_train for dL/d(output): accumulates every parameter
  /// gradient (until zero_grad) and returns dL/dx (the block's buffer).
  const Tensor<S>& backward(const Tensor<S>& grad_out) {
    if (!has_forward_) throw state_error(type_name_ + "::backward: call forward_train first");
    grad_out.expect_shape(out_.sizes(), type_name_ + "::backward grad_output");
    if constexpr (kFused) {
      const std::int64_t C = g_.out_channels;
      grads_.resize({2 * C});
      fused().backward(grad_out, bn_.weight.value.data(), bn_.bias.value.data(), bn_.batch_mean().data(),
                       bn_.batch_var().data(), dx_, dw_, grads_.data(), grads_.data() + C);
      bn_.accumulate_grads(grads_.data(), grads_.data() + C);
      squeeze_backward(dw_);
      return dx_;
    }
    dz_.resize(y_.sizes());
    const std::int64_t N = y_.size(0), C = y_.size(1), P = y_.size(2) * y_.size(3);
    for (std::int64_t b = 0; b < N; ++b)
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t j = (b * C + c) * P, e = j + P; j < e; ++j)
          dz_[j] = grad_out[j] * act_.derivative(bn_.affine(y_[j], c));
    bn_.backward(y_, dz_, dz_);
    conv_.backward_data(dz_, w_, x_.sizes(), dx_);
    conv_.backward_weights(x_, dz_, dw_);
    squeeze_backward(dw_);
    return dx_;
  }

  /// Every tensor of the block (kernel tensors, then BN's), names as in the state dict.
  ParamList<S> parameters() {
    ParamList<S> all = kernel_parameters();
    if (has_bn_)
      for (auto* p : bn_.params()) all.push_back(p);
    return all;
  }
  /// The BatchNorms of the block (for num_batches_tracked in state dicts).
  std::vector<engine::BatchNorm<S>*> batch_norms() {
    if (!has_bn_) return {};
    return {&bn_};
  }
  /// The tensor called `name` (throws config_error listing the names if absent).
  Param<S>& param(const std::string& name) {
    std::string names;
    for (auto* p : parameters()) {
      if (p->name == name) return *p;
      names += " " + p->name;
    }
    throw config_error(type_name_ + ": no tensor named '" + name + "'; it has:" + names);
  }
  /// Zeroes every gradient.
  void zero_grad() {
    for (auto* p : parameters())
      if (p->trainable()) p->zero_grad();
  }

  /// The BN-folded kernel and bias (W * s[o], beta - mean * s) of the deployed conv.
  std::pair<Tensor<S>, Tensor<S>> folded() const {
    require_bn("deploy");
    Tensor<S> w = squeeze(), scale, shift;
    bn_.fold(scale, shift);
    const std::int64_t per_o = w.numel() / g_.out_channels;
    for (std::int64_t j = 0; j < w.numel(); ++j) w[j] *= scale[j / per_o];
    return {std::move(w), std::move(shift)};
  }
  /// The deployed single convolution (folded kernel + bias, activation fused).
  DeployedConv<S, Act> deploy() const {
    auto [w, b] = folded();
    return DeployedConv<S, Act>(g_, std::move(w), std::move(b), act_);
  }

  /// Primitive sets the training engines have created (one per input shape and path:
  /// the fused training pipeline, the NCHW conv engine of forward_eval, BN's own).
  std::int64_t primitive_creations() const {
    return conv_.primitive_creations() + fused_.primitive_creations() + bn_.primitive_creations();
  }

  /// Bytes the block keeps between forward_train and backward (0 before forward_train):
  /// the saved input and conv output (in the convolution's layout on the fused path), the
  /// squeezed kernel (and its reordered copy) and BN's batch statistics, plus whatever the
  /// subclass keeps for its squeeze adjoint (extra_bytes_saved_for_backward()).
  std::int64_t bytes_saved_for_backward() const {
    if (!has_forward_) return 0;
    const std::int64_t stats = std::int64_t(sizeof(S)) * 2 * g_.out_channels;
    const std::int64_t w = std::int64_t(sizeof(S)) * w_.numel();
    const std::int64_t acts = kFused ? fused_.bytes_saved_for_backward()
                                     : std::int64_t(sizeof(S)) * (x_.numel() + y_.numel());
    return acts + w + stats + extra_bytes_saved_for_backward();
  }

 protected:
  /// `odd_kernel` = false lets plain-kernel subclasses (ConvBN) take even kernel sizes.
  SqueezedBlock(const ConvGeometry& g, std::string type_name, bool with_bn, const std::string& bn_prefix, Act act,
                bool odd_kernel = true)
      : g_(validated(g, type_name, odd_kernel)), type_name_(std::move(type_name)), has_bn_(with_bn), act_(act), conv_(g_),
        fused_(g_, kFused ? Act::kind : ActivationKind::identity) {
    if (has_bn_) bn_ = engine::BatchNorm<S>(g_.out_channels, bn_prefix);
  }
  /// Bytes a subclass keeps from squeeze_into to squeeze_backward (default none).
  virtual std::int64_t extra_bytes_saved_for_backward() const { return 0; }

 private:
  // The fused oneDNN pipeline needs float and an activation oneDNN has.
  static constexpr bool kFused = std::is_same_v<S, float> && Act::kind != ActivationKind::custom;
  engine::FusedConvBnAct& fused() { return fused_; }

  static ConvGeometry validated(const ConvGeometry& g, const std::string& who, bool odd_kernel) {
    g.validate(who.c_str(), odd_kernel);
    return g;
  }
  void require_bn(const char* what) const {
    if (!has_bn_) throw state_error(type_name_ + ": " + what + " is not available in weight_only mode (no BN)");
  }

  ConvGeometry g_;
  std::string type_name_;
  bool has_bn_;
  engine::BatchNorm<S> bn_;
  Act act_;
  mutable engine::ConvEngine<S> conv_;  // forward_eval, and training on the plain path
  engine::FusedConvBnAct fused_;        // training on the fused path (primitives built lazily)
  Tensor<S> w_, x_, y_, out_, dz_, dx_, dw_;  // reused: saved for backward, output, gradients
  Tensor<S> stats_, grads_;                   // fused path: BN batch mean|var, dgamma|dbeta
  bool has_forward_ = false;
};

}  // namespace orepa
