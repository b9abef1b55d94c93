#pragma once
/// @file conv_block.hpp
/// ConvBlock<S, Act, Source>: a block made of a kernel source and one trunk,
/// y = act(BN(conv(x, W))) with W produced by the source on every training forward and
/// dL/dW handed back to it (OREPA, OREPA_1x1, OREPA_LargeConv, ConvBN and user
/// OnlineBlocks are ConvBlocks). OnlineBlock<S, Act> is the ConvBlock over a branch list:
/// a new block is a new branch list (see examples/custom_block.cpp).
///
/// Thread safety: not safe to use from several threads at once (training and eval
/// forwards reuse the block's buffers). Deploy it for concurrent inference.

#include <string>
#include <utility>

#include "orepa/blocks/kernel_source.hpp"
#include "orepa/blocks/trunk.hpp"
#include "orepa/deploy/deployed_conv.hpp"

namespace orepa {

/// A kernel source and a trunk: one block of the block concept (blocks/block.hpp).
template <class S, class Act, class Source>
class ConvBlock : public ModuleTensors<ConvBlock<S, Act, Source>, S> {
 public:
  /// The block called `type_name` (in messages) with geometry `g` (validated here; odd
  /// kernel sizes only unless `any_kernel`), kernel source `source` and activation `act`.
  ConvBlock(std::string type_name, const ConvGeometry& g, Source source, Act act = {}, bool any_kernel = false)
      : type_name_(std::move(type_name)), g_(validated(g, type_name_, any_kernel)), source_(std::move(source)),
        trunk_(g_, act) {}
  ConvBlock(const ConvBlock&) = delete;  // never copied silently: std::move it, or clone() for a copy
  ConvBlock& operator=(const ConvBlock&) = delete;
  /// Move constructor.
  ConvBlock(ConvBlock&&) noexcept = default;
  /// Move assignment.
  ConvBlock& operator=(ConvBlock&&) noexcept = default;

  /// The reference class name ("OREPA", "ConvBN", ...).
  std::string type_name() const { return type_name_; }
  /// The block's (and the deployed conv's) convolution geometry.
  const ConvGeometry& geometry() const { return g_; }
  /// The kernel source.
  Source& source() { return source_; }
  /// The kernel source, read-only.
  const Source& source() const { return source_; }
  /// The BatchNorm after the convolution.
  BatchNorm2d<S>& bn() { return trunk_.bn(); }
  /// The activation.
  const Act& activation() const { return trunk_.activation(); }

  /// The kernel W [O, I/g, k, k] the source produces now.
  Tensor<S> squeeze() const {
    Tensor<S> w;
    source_.squeeze_into(w);
    return w;
  }

  /// Training forward: squeeze, one convolution, BN with batch statistics (running
  /// statistics updated), activation. Returns the output (an alias of the block's
  /// buffer, see Tensor). x is [N, I, H, W] with more than one output value per channel.
  Tensor<S> forward_train(ConstTensorView<S> x) {
    source_.squeeze_into(w_);
    return trunk_.forward_train(x, w_, type_name_).alias();
  }
  /// Eval forward with BN's running statistics (no state change).
  Tensor<S> forward_eval(ConstTensorView<S> x) const { return trunk_.forward_eval(x, squeeze(), type_name_); }
  /// Backward of the last forward_train for dL/d(output): accumulates every parameter
  /// gradient (until zero_grad) and returns dL/dx (an alias of the block's buffer).
  Tensor<S> backward(ConstTensorView<S> grad_out) {
    const Tensor<S>& dx = trunk_.backward(grad_out, type_name_);
    source_.squeeze_backward(trunk_.grad_weight());
    return dx.alias();
  }

  /// Whether backward computes dL/dx (default true; see Trunk::set_input_grad).
  void set_input_grad(bool needed) { trunk_.set_input_grad(needed); }
  /// Multiplies the squeezed kernel by `gain` through the branch weights, exactly (an
  /// initialisation choice, yolo::norm_matched_init). Only blocks of branches have it.
  template <class Src = Source, class = decltype(std::declval<Src&>().scale_kernel(S(1)))>
  void scale_kernel(S gain) {
    source_.scale_kernel(gain);
  }

  /// The BN-folded kernel and bias (W * s[o], beta - running_mean * s) of the deployed conv.
  Affine<S> folded() const { return trunk_.fold(squeeze()); }
  /// The deployed single convolution (folded kernel + bias, activation fused); value_error
  /// for tensors that cannot be deployed (deployable_fold()).
  DeployedConv<S> deploy() const {
    auto f = deployable_fold(*this);
    return DeployedConv<S>(g_, std::move(f.weight), std::move(f.bias), AnyActivation<S>(trunk_.activation()));
  }
  /// The deployed convolution in `o`'s precision (int8 takes the calibrated range of
  /// layer "", the block's own).
  DeployedConv<S> deploy(const DeployOptions& o) const {
    auto d = deploy();
    d.apply(o, "");
    return d;
  }

  /// The source's tensors, then BN's (`bn.*`), under `prefix`.
  void collect_tensors(Tensors<S>& out, const std::string& prefix) {
    source_.collect_tensors(out, prefix);
    trunk_.collect_tensors(out, prefix);
  }

  /// Primitive sets the training engines have created (one per input shape and path).
  std::int64_t primitive_creations() const { return trunk_.primitive_creations(); }
  /// Bytes kept between forward_train and backward: the trunk's (input and conv output,
  /// BN statistics) and the squeezed kernel.
  std::int64_t bytes_saved_for_backward() const {
    const std::int64_t t = trunk_.bytes_saved_for_backward();
    return t ? t + std::int64_t(sizeof(S)) * w_.numel() : 0;
  }

 protected:
  /// A deep copy of `o` (the clone() of the block types): parameters, buffers and
  /// configuration, nothing saved for backward.
  ConvBlock(const ConvBlock& o, detail::CloneTag)
      : type_name_(o.type_name_), g_(o.g_), source_(o.source_), trunk_(o.trunk_) {}

 private:
  static ConvGeometry validated(const ConvGeometry& g, const std::string& who, bool any_kernel) {
    g.validate(who.c_str(), !any_kernel);
    return g;
  }

  std::string type_name_;
  ConvGeometry g_;
  Source source_;
  Trunk<S, Act> trunk_;
  Tensor<S> w_;  // the squeezed kernel of the last forward_train
};

/// The block over a branch list: W = sum_r v[r][o] * K_r, then y = act(BN(conv(x, W))).
template <class S, class Act = Identity>
class OnlineBlock : public ConvBlock<S, Act, BranchSum<S>> {
 public:
  /// `branches` in the row order of `vector` (row r starts at branch r's
  /// initial_scale()); `vector_rows` 0 means one row per branch. Throws config_error on
  /// an invalid geometry, an empty list or too few vector rows.
  OnlineBlock(const ConvGeometry& g, BranchList<S> branches, std::string type_name = "OnlineBlock", Act act = {},
              std::int64_t vector_rows = 0)
      : ConvBlock<S, Act, BranchSum<S>>(type_name, g, BranchSum<S>(g, std::move(branches), vector_rows, type_name),
                                        act) {}

  /// The branches, one per row of the scaling matrix.
  const BranchList<S>& branches() const { return this->source().branches(); }
  /// The branch-scaling matrix `vector` [rows, O].
  Param<S>& scales() { return this->source().scales(); }
  /// A deep copy: parameters, buffers and configuration (Branch::clone() for each branch),
  /// nothing saved for backward.
  OnlineBlock clone() const { return OnlineBlock(*this, detail::CloneTag{}); }

 protected:
  /// A deep copy of `o` (clone()).
  OnlineBlock(const OnlineBlock& o, detail::CloneTag t) : ConvBlock<S, Act, BranchSum<S>>(o, t) {}
};

}  // namespace orepa
