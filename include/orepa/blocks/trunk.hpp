#pragma once
/// @file trunk.hpp
/// Trunk<S, Act>: y = act(BN(conv(x, W))) for a kernel W given by the caller (a kernel
/// source), with backward to dL/dx and dL/dW. Every single-convolution block is a kernel
/// source plus a trunk; the multi-path blocks use trunks with the identity for their
/// conv -> BN paths.
///
/// Saved for backward: the input and the conv output (plus the kernel and BN's
/// per-channel statistics); the pre-activation is recomputed from them.
///
/// For float with a built-in activation (identity, ReLU, SiLU) a training step runs the
/// fused pipeline engine::FusedConvBnAct: conv, BN and the activation as oneDNN
/// primitives on the layout the convolution prefers, with reorders only at the input and
/// output, the reordered input saved for backward-weights. Other scalars and user
/// activations run the plain path (ConvEngine on NCHW, BatchNorm2d, element loops).
/// Both honour a synchronised BN (BatchNorm2d::synchronised()): the fused pipeline hands
/// its statistics and gradient sums to the BN to combine across replicas.
///
/// Thread safety: not safe to use from several threads at once (forwards reuse buffers).

#include <string>

#include "orepa/blocks/kernel_algebra.hpp"
#include "orepa/core/activation.hpp"
#include "orepa/engine/conv.hpp"

namespace orepa {

/// conv -> BN -> activation, with backward.
template <class S, class Act = Identity>
class Trunk {
 public:
  /// For geometry `g` (validated by the caller); the BN is named `bn_name` ("bn.").
  Trunk(const ConvGeometry& g, Act act = {}, std::string bn_name = "bn.")
      : g_(g), bn_(g.out_channels), bn_name_(std::move(bn_name)), act_(act), conv_(g_),
        fused_(g_, kFused ? Act::kind : ActivationKind::identity) {}

  /// A copy of the configuration and the BatchNorm; nothing saved for backward (the copy
  /// needs its own forward_train before a backward).
  Trunk(const Trunk& o)
      : g_(o.g_), bn_(o.bn_), bn_name_(o.bn_name_), act_(o.act_), conv_(g_),
        fused_(g_, kFused ? Act::kind : ActivationKind::identity), input_grad_(o.input_grad_) {}
  /// Move constructor.
  Trunk(Trunk&&) noexcept = default;
  Trunk& operator=(const Trunk&) = delete;
  /// Move assignment.
  Trunk& operator=(Trunk&&) noexcept = default;

  /// The convolution geometry.
  const ConvGeometry& geometry() const { return g_; }
  /// The BatchNorm.
  BatchNorm2d<S>& bn() { return bn_; }
  /// The BatchNorm, read-only.
  const BatchNorm2d<S>& bn() const { return bn_; }
  /// The activation.
  const Act& activation() const { return act_; }

  /// Training forward with kernel `w`: one convolution, BN with batch statistics (running
  /// statistics updated), activation. Returns the trunk's output buffer, valid until the
  /// next forward_train: in x's memory format on the fused path, NCHW on the plain one.
  /// `who` names the block in errors.
  const Tensor<S>& forward_train(ConstTensorView<S> x, const Tensor<S>& w, const std::string& who) {
    if constexpr (!kFused) x = contiguous(x, x_nchw_);  // channels-last input: trained on an NCHW copy
    const Shape ys = g_.output_shape(x.sizes(), (who + "::forward_train").c_str());
    if (ys[0] * ys[2] * ys[3] < 2)
      throw state_error(detail::cat(who, "::forward_train: BN needs more than one value per channel; input ",
                                    shape_str(x.sizes()), " gives output ", shape_str(ys)));
    if constexpr (kFused) {
      const std::int64_t C = g_.out_channels;
      std::int64_t n = ys[0] * ys[2] * ys[3];
      stats_.resize({2 * C});
      engine::FusedConvBnAct::StatsSync sync;
      if (bn_.synchronised()) sync = [&](float* mean, float* var) { n = bn_.synchronise_statistics(mean, var, n); };
      fused_.forward(x, w, bn_.weight.value.data(), bn_.bias.value.data(), bn_.eps, out_, stats_.data(),
                     stats_.data() + C, sync);
      bn_.set_batch_statistics(stats_.data(), stats_.data() + C, n);
    } else {
      x_.assign(x);
      w_ = w;
      conv_.forward(x_, w_, y_);
      bn_.forward_train(y_, out_);
      for (auto& v : out_) v = act_(v);
    }
    has_forward_ = true;
    return out_;
  }

  /// Eval forward with kernel `w` and BN's running statistics (no state change).
  Tensor<S> forward_eval(ConstTensorView<S> x, const Tensor<S>& w, const std::string& who) const {
    g_.output_shape(x.sizes(), (who + "::forward_eval").c_str());
    Tensor<S> xc, y, z;
    conv_.forward(contiguous(x, xc), w, y);
    bn_.forward_eval(y, z);
    for (auto& v : z) v = act_(v);
    return z;
  }

  /// Whether backward computes dL/dx (default true). False for a network's first layer,
  /// whose input is data: backward then skips the backward-data convolution and returns
  /// an empty tensor.
  void set_input_grad(bool needed) { input_grad_ = needed; }
  /// Whether backward computes dL/dx.
  bool input_grad() const { return input_grad_; }
  /// Backward of the last forward_train for dL/d(output) (any memory format): accumulates
  /// BN's gradients, leaves dL/dW in grad_weight() and returns dL/dx (the trunk's buffer,
  /// in the output's memory format; empty when input_grad() is false).
  const Tensor<S>& backward(ConstTensorView<S> grad_out, const std::string& who) {
    if (!has_forward_) throw state_error(who + "::backward: call forward_train first");
    grad_out.expect_shape(out_.sizes(), who + "::backward grad_output");
    grad_out = in_format(grad_out, out_.memory_format(), g_converted_);
    if constexpr (kFused) {
      const std::int64_t C = g_.out_channels;
      grads_.resize({2 * C});
      engine::FusedConvBnAct::GradCorrection correct;
      if (bn_.synchronised())
        correct = [&](const float* dgamma, const float* dbeta, float* scale, float* shift) {
          bn_.synchronise_gradient_sums(dgamma, dbeta, scale, shift);
        };
      fused_.backward(grad_out, bn_.weight.value.data(), bn_.bias.value.data(), bn_.batch_mean().data(),
                      bn_.batch_var().data(), input_grad_ ? &dx_ : nullptr, dw_, grads_.data(), grads_.data() + C,
                      correct);
      if (!input_grad_) dx_ = Tensor<S>();
      bn_.accumulate_grads(grads_.data(), grads_.data() + C);
      return dx_;
    }
    dz_.resize(y_.sizes());
    const std::int64_t N = y_.size(0), C = y_.size(1), P = y_.size(2) * y_.size(3);
    for (std::int64_t b = 0; b < N; ++b)
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t j = (b * C + c) * P, e = j + P; j < e; ++j)
          dz_[j] = grad_out[j] * act_.derivative(bn_.affine(y_[j], c));
    bn_.backward(y_, dz_, dz_);
    if (input_grad_) conv_.backward_data(dz_, w_, x_.sizes(), dx_);
    else dx_ = Tensor<S>();
    conv_.backward_weights(x_, dz_, dw_);
    return dx_;
  }
  /// dL/dW of the last backward [O, I/g, k, k].
  const Tensor<S>& grad_weight() const { return dw_; }

  /// The kernel `w` with BN folded in: w * s[o] and beta - running_mean * s.
  Affine<S> fold(Tensor<S> w) const { return fold_bn(Affine<S>{std::move(w), Tensor<S>({g_.out_channels})}, bn_); }

  /// BN's tensors under `prefix` + the BN name.
  void collect_tensors(Tensors<S>& out, const std::string& prefix) { bn_.collect_tensors(out, prefix + bn_name_); }

  /// Primitive sets the engines have created (the fused training pipeline, the NCHW conv
  /// engine of forward_eval and the plain path, BN's own).
  std::int64_t primitive_creations() const {
    return conv_.primitive_creations() + fused_.primitive_creations() + bn_.primitive_creations();
  }
  /// Bytes kept between forward_train and backward (0 before forward_train): the saved
  /// input and conv output (in the convolution's layout on the fused path), the kernel and
  /// BN's batch statistics.
  std::int64_t bytes_saved_for_backward() const {
    if (!has_forward_) return 0;
    const std::int64_t stats = std::int64_t(sizeof(S)) * 2 * g_.out_channels;
    const std::int64_t acts = kFused ? fused_.bytes_saved_for_backward()
                                     : std::int64_t(sizeof(S)) * (x_.numel() + y_.numel() + w_.numel());
    return acts + stats;
  }

 private:
  // The fused oneDNN pipeline needs float and an activation oneDNN has.
  static constexpr bool kFused = std::is_same_v<S, float> && Act::kind != ActivationKind::custom;

  ConvGeometry g_;
  BatchNorm2d<S> bn_;
  std::string bn_name_;
  Act act_;
  mutable engine::ConvEngine<S> conv_;      // forward_eval, and training on the plain path
  engine::FusedConvBnAct fused_;            // training on the fused path (primitives built lazily)
  Tensor<S> x_, w_, y_, out_, dz_, dx_, dw_;  // reused: saved for backward, output, gradients
  Tensor<S> stats_, grads_;                   // fused path: BN batch mean|var, dgamma|dbeta
  Tensor<S> x_nchw_, g_converted_;            // copies of arguments in another memory format
  bool has_forward_ = false;
  bool input_grad_ = true;
};

}  // namespace orepa
