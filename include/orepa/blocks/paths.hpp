#pragma once
/// @file paths.hpp
/// Multi-path blocks (DBB, RepVGGBlock_OREPA): blocks that really run several
/// convolutions on the activations in training, y = act(sum_p path_p(x)), and fold into
/// one convolution for deployment. A path is a sequence of stages built from the same
/// pieces as the single-convolution blocks:
///
///   - ConvBnStage: a kernel source and a trunk (conv -> BN, no activation);
///   - ConvStage:   a kernel source and a convolution alone;
///   - BnStage:     a BatchNorm;
///   - BnPadStage:  DBB's BN-and-pad (BN, then a border filled with what BN gives 0);
///   - AvgPoolStage: a k x k average pool (zeros of the padding counted).
///
/// Every stage folds as an Affine composed after the stages before it (kernel_algebra.hpp),
/// so every path folds into one kernel and bias; the block sums them (1x1 results padded
/// to the k x k centre).

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "orepa/blocks/conv_block.hpp"

namespace orepa {

/// One piece of a path.
template <class S>
class Stage {
 public:
  virtual ~Stage() = default;
  /// Training forward; returns the stage's output buffer, valid until its next forward_train.
  virtual const Tensor<S>& forward_train(ConstTensorView<S> x) = 0;
  /// Eval forward (running statistics), no state change.
  virtual Tensor<S> forward_eval(ConstTensorView<S> x) const = 0;
  /// Backward of the last forward_train, whose input was `x`: accumulates the stage's
  /// parameter gradients and returns dL/dx (the stage's buffer).
  virtual const Tensor<S>& backward(ConstTensorView<S> x, ConstTensorView<S> grad_out) = 0;
  /// This stage as an affine map composed after `before` (nullptr: the stage is first),
  /// for convolutions in `groups` groups.
  virtual Affine<S> fold(const Affine<S>* before, std::int64_t groups) const = 0;
  /// Appends the stage's tensors under `prefix`.
  virtual void collect_tensors(Tensors<S>& out, const std::string& prefix) = 0;
  /// oneDNN primitive sets the stage's engines have created.
  virtual std::int64_t primitive_creations() const { return 0; }
  /// Bytes the stage keeps from forward_train for backward (0 before one).
  virtual std::int64_t bytes_saved_for_backward() const = 0;
  /// A deep copy (parameters, buffers, configuration).
  virtual std::unique_ptr<Stage> clone() const = 0;
};

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// `mine` after `before` (a 1x1 map, or nothing when `mine` comes first).
template <class S>
Affine<S> then(const Affine<S>* before, Affine<S> mine, std::int64_t groups) {
  return before ? merge_1x1_kxk(*before, mine, groups) : mine;
}
}  // namespace detail
/// \endcond

/// conv(kernel source) -> BN, on a Trunk with the identity (fused pipeline for float).
template <class S, class Source>
class ConvBnStage final : public Stage<S> {
 public:
  std::unique_ptr<Stage<S>> clone() const override { return std::make_unique<ConvBnStage>(*this); }
  /// Convolution `g` with kernel from `source`, BN named `bn_name`; `who` for messages.
  ConvBnStage(const ConvGeometry& g, Source source, std::string bn_name = "bn.", std::string who = "ConvBnStage")
      : source_(std::move(source)), trunk_(g, Identity{}, std::move(bn_name)), who_(std::move(who)) {}
  /// The kernel source.
  Source& source() { return source_; }
  /// The BatchNorm.
  BatchNorm2d<S>& bn() { return trunk_.bn(); }
  /// The kernel the source produces now.
  Tensor<S> squeeze() const {
    Tensor<S> w;
    source_.squeeze_into(w);
    return w;
  }

  const Tensor<S>& forward_train(ConstTensorView<S> x) override {
    source_.squeeze_into(w_);
    return trunk_.forward_train(x, w_, who_);
  }
  Tensor<S> forward_eval(ConstTensorView<S> x) const override { return trunk_.forward_eval(x, squeeze(), who_); }
  const Tensor<S>& backward(ConstTensorView<S>, ConstTensorView<S> grad_out) override {
    const Tensor<S>& dx = trunk_.backward(grad_out, who_);
    source_.squeeze_backward(trunk_.grad_weight());
    return dx;
  }
  Affine<S> fold(const Affine<S>* before, std::int64_t groups) const override {
    return detail::then(before, trunk_.fold(squeeze()), groups);
  }
  void collect_tensors(Tensors<S>& out, const std::string& prefix) override {
    source_.collect_tensors(out, prefix);
    trunk_.collect_tensors(out, prefix);
  }
  std::int64_t primitive_creations() const override { return trunk_.primitive_creations(); }
  std::int64_t bytes_saved_for_backward() const override {
    const std::int64_t t = trunk_.bytes_saved_for_backward();
    return t ? t + std::int64_t(sizeof(S)) * w_.numel() : 0;
  }

 private:
  Source source_;
  Trunk<S, Identity> trunk_;
  std::string who_;
  Tensor<S> w_;
};

/// A convolution alone (no bias), kernel from a source.
template <class S, class Source>
class ConvStage final : public Stage<S> {
 public:
  std::unique_ptr<Stage<S>> clone() const override { return std::make_unique<ConvStage>(*this); }
  /// Convolution `g` with kernel from `source`.
  ConvStage(const ConvGeometry& g, Source source) : source_(std::move(source)), conv_(g) {}

  const Tensor<S>& forward_train(ConstTensorView<S> x) override {
    source_.squeeze_into(w_);
    conv_.forward(x, w_, y_);
    return y_;
  }
  Tensor<S> forward_eval(ConstTensorView<S> x) const override {
    Tensor<S> w, y;
    source_.squeeze_into(w);
    conv_.forward(x, w, y);
    return y;
  }
  const Tensor<S>& backward(ConstTensorView<S> x, ConstTensorView<S> grad_out) override {
    conv_.backward_weights(x, grad_out, dw_);
    source_.squeeze_backward(dw_);
    conv_.backward_data(grad_out, w_, x.sizes(), dx_);
    return dx_;
  }
  Affine<S> fold(const Affine<S>* before, std::int64_t groups) const override {
    Tensor<S> w;
    source_.squeeze_into(w);
    const auto O = w.size(0);
    return detail::then(before, Affine<S>{std::move(w), Tensor<S>({O})}, groups);
  }
  void collect_tensors(Tensors<S>& out, const std::string& prefix) override { source_.collect_tensors(out, prefix); }
  std::int64_t primitive_creations() const override { return conv_.primitive_creations(); }
  std::int64_t bytes_saved_for_backward() const override { return std::int64_t(sizeof(S)) * (w_.numel() + y_.numel()); }

 private:
  Source source_;
  mutable engine::ConvEngine<S> conv_;
  Tensor<S> w_, y_, dw_, dx_;
};

/// A BatchNorm named `name` (its tensors are `name` + weight, bias, ...).
template <class S>
class BnStage final : public Stage<S> {
 public:
  std::unique_ptr<Stage<S>> clone() const override { return std::make_unique<BnStage>(*this); }
  /// BN over `channels` channels.
  BnStage(std::int64_t channels, std::string name) : bn_(channels), name_(std::move(name)) {}
  /// The BatchNorm.
  BatchNorm2d<S>& bn() { return bn_; }

  const Tensor<S>& forward_train(ConstTensorView<S> x) override {
    bn_.forward_train(x, y_);
    return y_;
  }
  Tensor<S> forward_eval(ConstTensorView<S> x) const override {
    Tensor<S> y;
    bn_.forward_eval(x, y);
    return y;
  }
  const Tensor<S>& backward(ConstTensorView<S> x, ConstTensorView<S> grad_out) override {
    bn_.backward(x, grad_out, dx_);
    return dx_;
  }
  Affine<S> fold(const Affine<S>* before, std::int64_t groups) const override {
    return fold_bn(before ? *before : identity_kernel<S>(bn_.channels(), groups), bn_);
  }
  void collect_tensors(Tensors<S>& out, const std::string& prefix) override { bn_.collect_tensors(out, prefix + name_); }
  std::int64_t primitive_creations() const override { return bn_.primitive_creations(); }
  std::int64_t bytes_saved_for_backward() const override {
    return std::int64_t(sizeof(S)) * (y_.numel() + 2 * bn_.batch_mean().numel());
  }

 private:
  BatchNorm2d<S> bn_;
  std::string name_;
  Tensor<S> y_, dx_;
};

/// DBB's BN-and-pad: BN, then a border of `pad` pixels filled per channel with
/// beta - running_mean * gamma / sqrt(running_var + eps) (what BN gives a zero input, so
/// the folded zero-padded conv matches). In training the interior uses batch statistics and
/// the border the running statistics after this forward's update, detached: the border
/// passes no gradient. Its BN is `name` + "bn." (the reference nests a BatchNorm2d `bn`).
template <class S>
class BnPadStage final : public Stage<S> {
 public:
  std::unique_ptr<Stage<S>> clone() const override { return std::make_unique<BnPadStage>(*this); }
  /// BN over `channels` channels, border `pad`.
  BnPadStage(std::int64_t channels, std::int64_t pad, std::string name)
      : bn_(channels), pad_(pad), name_(std::move(name)) {}
  /// The BatchNorm.
  BatchNorm2d<S>& bn() { return bn_; }

  const Tensor<S>& forward_train(ConstTensorView<S> x) override {
    bn_.forward_train(x, z_);
    pad_into(z_, out_);
    return out_;
  }
  Tensor<S> forward_eval(ConstTensorView<S> x) const override {
    Tensor<S> z, out;
    bn_.forward_eval(x, z);
    pad_into(z, out);
    return out;
  }
  const Tensor<S>& backward(ConstTensorView<S> x, ConstTensorView<S> grad_out) override {
    const std::int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    const std::int64_t PH = H + 2 * pad_, PW = W + 2 * pad_;
    grad_out.expect_shape({N, C, PH, PW}, "BN-and-pad grad_output");
    dz_.resize(x.sizes());
    for (std::int64_t nc = 0; nc < N * C; ++nc)
      for (std::int64_t h = 0; h < H; ++h) {
        const S* src = grad_out.data() + (nc * PH + h + pad_) * PW + pad_;
        std::copy(src, src + W, dz_.data() + (nc * H + h) * W);
      }
    bn_.backward(x, dz_, dx_);
    return dx_;
  }
  Affine<S> fold(const Affine<S>* before, std::int64_t groups) const override {
    return fold_bn(before ? *before : identity_kernel<S>(bn_.channels(), groups), bn_);
  }
  void collect_tensors(Tensors<S>& out, const std::string& prefix) override {
    bn_.collect_tensors(out, prefix + name_ + "bn.");
  }
  std::int64_t primitive_creations() const override { return bn_.primitive_creations(); }
  std::int64_t bytes_saved_for_backward() const override {
    return std::int64_t(sizeof(S)) * (out_.numel() + 2 * bn_.batch_mean().numel());
  }

 private:
  void pad_into(const Tensor<S>& z, Tensor<S>& out) const {
    const std::int64_t N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3);
    const std::int64_t PH = H + 2 * pad_, PW = W + 2 * pad_;
    out.resize({N, C, PH, PW});
    Tensor<S> scale, shift;
    bn_.fold(scale, shift);  // the border value of channel c is shift[c] = BN(0)
    for (std::int64_t c = 0; c < C; ++c) {
      const S v = shift[c];
      for (std::int64_t n = 0; n < N; ++n) {
        S* plane = out.data() + (n * C + c) * PH * PW;
        const S* src = z.data() + (n * C + c) * H * W;
        std::fill(plane, plane + pad_ * PW, v);
        std::fill(plane + (pad_ + H) * PW, plane + PH * PW, v);
        for (std::int64_t h = 0; h < H; ++h) {
          S* row = plane + (h + pad_) * PW;
          std::fill(row, row + pad_, v);
          std::copy(src + h * W, src + (h + 1) * W, row + pad_);
          std::fill(row + pad_ + W, row + PW, v);
        }
      }
    }
  }

  BatchNorm2d<S> bn_;
  std::int64_t pad_;
  std::string name_;
  Tensor<S> z_, out_, dz_, dx_;
};

/// A k x k average pool over `channels` channels (stride, zero padding counted: PyTorch's
/// count_include_pad), run as a depthwise conv with the constant kernel 1/k^2.
template <class S>
class AvgPoolStage final : public Stage<S> {
 public:
  std::unique_ptr<Stage<S>> clone() const override { return std::make_unique<AvgPoolStage>(*this); }
  /// Pool k x k with `stride` and `padding` over `channels` channels.
  AvgPoolStage(std::int64_t channels, std::int64_t k, std::int64_t stride, std::int64_t padding)
      : conv_(geometry(channels, k, stride, padding)), weight_({channels, 1, k, k}, S(1.0 / double(k * k))) {}

  const Tensor<S>& forward_train(ConstTensorView<S> x) override {
    conv_.forward(x, weight_, y_);
    return y_;
  }
  Tensor<S> forward_eval(ConstTensorView<S> x) const override {
    Tensor<S> y;
    conv_.forward(x, weight_, y);
    return y;
  }
  const Tensor<S>& backward(ConstTensorView<S> x, ConstTensorView<S> grad_out) override {
    conv_.backward_data(grad_out, weight_, x.sizes(), dx_);
    return dx_;
  }
  Affine<S> fold(const Affine<S>* before, std::int64_t groups) const override {
    const auto C = weight_.size(0), k = weight_.size(2);
    const Affine<S> pool{avg_kernel<S>(C, k, groups), Tensor<S>({C})};
    return before ? merge_1x1_kxk(*before, pool, groups) : merge_1x1_kxk(identity_kernel<S>(C, groups), pool, groups);
  }
  void collect_tensors(Tensors<S>&, const std::string&) override {}
  std::int64_t primitive_creations() const override { return conv_.primitive_creations(); }
  std::int64_t bytes_saved_for_backward() const override { return std::int64_t(sizeof(S)) * y_.numel(); }

 private:
  static ConvGeometry geometry(std::int64_t C, std::int64_t k, std::int64_t s, std::int64_t p) {
    ConvGeometry g;
    g.in_channels = g.out_channels = g.groups = C;
    g.kernel = k, g.stride = s, g.padding = p;
    return g;
  }
  mutable engine::ConvEngine<S> conv_;
  Tensor<S> weight_;
  Tensor<S> y_, dx_;
};

/// A named sequence of stages: `name` prefixes its tensors ("dbb_origin.", "rbr_1x1.").
template <class S>
class Path {
 public:
  /// Path `name` (with its trailing '.') over `stages`, applied in order.
  Path(std::string name, std::vector<std::unique_ptr<Stage<S>>> stages)
      : name_(std::move(name)), stages_(std::move(stages)), outs_(stages_.size(), nullptr) {}
  /// A deep copy: every stage cloned, nothing saved for backward.
  Path(const Path& o) : name_(o.name_), outs_(o.stages_.size(), nullptr) {
    for (const auto& s : o.stages_) stages_.push_back(s->clone());
  }
  /// Move constructor.
  Path(Path&&) noexcept = default;
  /// Move assignment.
  Path& operator=(Path&&) noexcept = default;

  /// The path's name prefix.
  const std::string& name() const { return name_; }
  /// Stage `i`.
  Stage<S>& stage(std::size_t i) { return *stages_.at(i); }
  /// Stage `i`, read-only.
  const Stage<S>& stage(std::size_t i) const { return *stages_.at(i); }

  /// Training forward through every stage; the last stage's output buffer.
  const Tensor<S>& forward_train(ConstTensorView<S> x) {
    ConstTensorView<S> in = x;
    for (std::size_t i = 0; i < stages_.size(); ++i) in = *(outs_[i] = &stages_[i]->forward_train(in));
    return *outs_.back();
  }
  /// Eval forward through every stage.
  Tensor<S> forward_eval(ConstTensorView<S> x) const {
    Tensor<S> y = stages_.front()->forward_eval(x);
    for (std::size_t i = 1; i < stages_.size(); ++i) y = stages_[i]->forward_eval(y);
    return y;
  }
  /// Backward of the last forward_train (input `x`); dL/dx (a stage's buffer).
  const Tensor<S>& backward(ConstTensorView<S> x, ConstTensorView<S> grad_out) {
    ConstTensorView<S> g = grad_out;
    const Tensor<S>* dx = nullptr;
    for (std::size_t i = stages_.size(); i-- > 0;) {
      dx = &stages_[i]->backward(i == 0 ? x : ConstTensorView<S>(*outs_[i - 1]), g);
      g = *dx;
    }
    return *dx;
  }
  /// The whole path as one convolution (kernel and bias), convolutions in `groups` groups.
  Affine<S> fold(std::int64_t groups) const {
    std::optional<Affine<S>> a;
    for (const auto& s : stages_) a = s->fold(a ? &*a : nullptr, groups);
    return std::move(*a);
  }
  /// Every stage's tensors under `prefix` + the path's name.
  void collect_tensors(Tensors<S>& out, const std::string& prefix) {
    for (auto& s : stages_) s->collect_tensors(out, prefix + name_);
  }
  /// Primitive sets of every stage.
  std::int64_t primitive_creations() const {
    std::int64_t n = 0;
    for (const auto& s : stages_) n += s->primitive_creations();
    return n;
  }
  /// Bytes every stage keeps for backward.
  std::int64_t bytes_saved_for_backward() const {
    std::int64_t n = 0;
    for (const auto& s : stages_) n += s->bytes_saved_for_backward();
    return n;
  }

 private:
  std::string name_;
  std::vector<std::unique_ptr<Stage<S>>> stages_;
  std::vector<const Tensor<S>*> outs_;  // each stage's output of the last forward_train
};

/// A block that sums paths and applies one activation: y = act(sum_p path_p(x)).
/// Deploys to the sum of the folded paths (1x1 ones padded to the centre).
template <class S, class Act = Identity>
class MultiPathBlock : public ModuleTensors<MultiPathBlock<S, Act>, S> {
 public:
  /// Block `type_name` with geometry `g` (already validated by the caller; the folded
  /// conv's), summing `paths` in order.
  MultiPathBlock(std::string type_name, const ConvGeometry& g, std::vector<Path<S>> paths, Act act = {})
      : type_name_(std::move(type_name)), g_(g), paths_(std::move(paths)), act_(act) {}
  MultiPathBlock(const MultiPathBlock&) = delete;  // never copied silently: std::move it, or clone() for a copy
  MultiPathBlock& operator=(const MultiPathBlock&) = delete;
  /// Move constructor.
  MultiPathBlock(MultiPathBlock&&) noexcept = default;
  /// Move assignment.
  MultiPathBlock& operator=(MultiPathBlock&&) noexcept = default;

  /// The reference class name ("DBB", "RepVGGBlock_OREPA").
  std::string type_name() const { return type_name_; }
  /// The block's (and the deployed conv's) geometry.
  const ConvGeometry& geometry() const { return g_; }
  /// The activation.
  const Act& activation() const { return act_; }
  /// The paths, in summation order.
  std::vector<Path<S>>& paths() { return paths_; }
  /// The paths, read-only.
  const std::vector<Path<S>>& paths() const { return paths_; }

  /// Training forward: every path with batch statistics (all running statistics
  /// updated), summed, activated. Returns the output (an alias of the block's buffer, see
  /// Tensor). x is [N, I, H, W] with more than one output value per channel.
  Tensor<S> forward_train(ConstTensorView<S> x) {
    const Shape ys = g_.output_shape(x.sizes(), (type_name_ + "::forward_train").c_str());
    if (ys[0] * ys[2] * ys[3] < 2)
      throw state_error(detail::cat(type_name_, "::forward_train: BN needs more than one value per channel; input ",
                                    shape_str(x.sizes()), " gives output ", shape_str(ys)));
    x_.assign(x, MemoryFormat::contiguous);  // every path needs the input again in backward
    pre_.assign(paths_.front().forward_train(x_));
    for (std::size_t p = 1; p < paths_.size(); ++p) add(pre_, paths_[p].forward_train(x_));
    out_.resize(pre_.sizes());
    for (std::int64_t j = 0; j < pre_.numel(); ++j) out_[j] = act_(pre_[j]);
    has_forward_ = true;
    return out_.alias();
  }
  /// Eval forward path by path with the running statistics (no state change); equal to
  /// deploy().forward(x) up to round-off.
  Tensor<S> forward_eval(ConstTensorView<S> x) const {
    g_.output_shape(x.sizes(), (type_name_ + "::forward_eval").c_str());
    Tensor<S> xc;
    x = contiguous(x, xc);
    Tensor<S> sum = paths_.front().forward_eval(x);
    for (std::size_t p = 1; p < paths_.size(); ++p) add(sum, paths_[p].forward_eval(x));
    for (auto& v : sum) v = act_(v);
    return sum;
  }
  /// Backward of the last forward_train: every path's backward, every parameter gradient
  /// accumulated (until zero_grad); returns dL/dx (an alias of the block's buffer).
  Tensor<S> backward(ConstTensorView<S> grad_out) {
    if (!has_forward_) throw state_error(type_name_ + "::backward: call forward_train first");
    grad_out.expect_shape(out_.sizes(), type_name_ + "::backward grad_output");
    grad_out = contiguous(grad_out, g_nchw_);
    dpre_.resize(pre_.sizes());
    for (std::int64_t j = 0; j < pre_.numel(); ++j) dpre_[j] = grad_out[j] * act_.derivative(pre_[j]);
    dx_.assign(paths_.front().backward(x_, dpre_));
    for (std::size_t p = 1; p < paths_.size(); ++p) add(dx_, paths_[p].backward(x_, dpre_));
    return dx_.alias();
  }

  /// Every path folded (1x1 ones padded to k x k), kernels and biases summed.
  Affine<S> folded() const {
    Affine<S> sum{Tensor<S>(g_.weight_shape()), Tensor<S>({g_.out_channels})};
    for (const auto& p : paths_) {
      auto f = p.fold(g_.groups);
      add(sum.weight, pad_to_centre(std::move(f.weight), g_.kernel));
      add(sum.bias, f.bias);
    }
    return sum;
  }
  /// The deployed single convolution (folded kernel + bias, activation fused); value_error
  /// for tensors that cannot be deployed (deployable_fold()).
  DeployedConv<S> deploy() const {
    auto f = deployable_fold(*this);
    return DeployedConv<S>(g_, std::move(f.weight), std::move(f.bias), AnyActivation<S>(act_));
  }
  /// The deployed convolution in `o`'s precision (int8 takes the calibrated range of
  /// layer "", the block's own).
  DeployedConv<S> deploy(const DeployOptions& o) const {
    auto d = deploy();
    d.apply(o, "");
    return d;
  }

  /// Every path's tensors under `prefix`, in path order.
  void collect_tensors(Tensors<S>& out, const std::string& prefix) {
    for (auto& p : paths_) p.collect_tensors(out, prefix);
  }
  /// Primitive sets created by all of the block's training engines.
  std::int64_t primitive_creations() const {
    std::int64_t n = 0;
    for (const auto& p : paths_) n += p.primitive_creations();
    return n;
  }
  /// Bytes kept between forward_train and backward (0 before forward_train): every
  /// path's, plus the block's saved input and summed pre-activation.
  std::int64_t bytes_saved_for_backward() const {
    if (!has_forward_) return 0;
    std::int64_t n = std::int64_t(sizeof(S)) * (x_.numel() + pre_.numel());
    for (const auto& p : paths_) n += p.bytes_saved_for_backward();
    return n;
  }

 protected:
  /// A deep copy of `o` (the clone() of the block types): nothing saved for backward.
  MultiPathBlock(const MultiPathBlock& o, detail::CloneTag)
      : type_name_(o.type_name_), g_(o.g_), paths_(o.paths_), act_(o.act_) {}

 private:
  static void add(Tensor<S>& acc, ConstTensorView<S> y) {
    acc.expect_shape(y.sizes(), "path sum");
    for (std::int64_t j = 0; j < y.numel(); ++j) acc[j] += y[j];
  }

  std::string type_name_;
  ConvGeometry g_;
  std::vector<Path<S>> paths_;
  Act act_;
  Tensor<S> x_, pre_, out_, dpre_, dx_;  // saved input and pre-activation, output, gradients (reused)
  Tensor<S> g_nchw_;                     // NCHW copy of a channels-last gradient
  bool has_forward_ = false;
};

}  // namespace orepa
