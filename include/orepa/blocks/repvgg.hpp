#pragma once
/// @file repvgg.hpp
/// RepVGGBlock_OREPA (SPEC section 4): y = act(dense(x) + conv1x1_bn(x) + id_bn(x)).
///  - `rbr_dense.`: OREPA_3x3_RepVGG, an online block (squeezed on every forward) with
///    the rows origin, avg, prior, 1x1->kxk (T = I, idconv1 + id_tensor), DW-separable
///    (`weight_rbr_*`, `rbr_dense.vector`, `rbr_dense.bn.*`), no activation of its own;
///    `vector` has 6 rows when the block has the identity path (the 6th never used, kept
///    0), else 5;
///  - `rbr_1x1.`: ConvBN 1x1 with the block's stride and groups, padding 0;
///  - `rbr_identity.`: BN over the input, by the reference rule present only when I == O
///    and stride 1 (RepVGGOptions::identity overrides the rule, e.g. for a checkpoint).
/// k = 3, padding 1, dilation 1 as the reference asserts; groups must be 1 (the
/// reference's DW-separable row only works for g = 1). Default activation ReLU.
/// Deploy folds each path with its own BN (the 1x1 zero-padded to the centre, the
/// identity as a kernel with 1 at [o, o mod Ig, 1, 1]) and sums kernels and biases.

#include <optional>

#include "orepa/blocks/conv_bn.hpp"
#include "orepa/blocks/online_block.hpp"
#include "orepa/blocks/options.hpp"
#include "orepa/branches/orepa_branches.hpp"

namespace orepa {

/// The RepVGG block with an OREPA dense branch.
template <class S = float, class Act = ReLU>
class RepVGGBlock_OREPA {
 public:
  /// The options type the block is built from.
  using Options = RepVGGOptions;
  /// Builds the block from `opts` (`seed` for the dense part, `seed + 1` for the 1x1).
  /// Throws config_error unless kernel_size 3, padding 1 (or absent), dilation 1 and
  /// groups 1, for an identity path with in_channels != out_channels, for internal
  /// channels < 0, or on an invalid geometry.
  explicit RepVGGBlock_OREPA(const RepVGGOptions& opts, Act act = {})
      : g_(checked(opts)),
        act_(act),
        dense_(g_, dense_branches(g_, opts), {"RepVGGBlock_OREPA.rbr_dense", false, with_identity(opts) ? 6 : 5,
                                              "rbr_dense.bn."}),
        one_(ConvOptions(g_.in_channels, g_.out_channels, 1).stride(g_.stride).padding(0).groups(g_.groups)
                 .seed(opts.seed() + 1),
             Identity{}, "rbr_1x1.") {
    for (auto* p : dense_.kernel_parameters()) p->name = "rbr_dense." + p->name;
    if (with_identity(opts)) identity_.emplace(g_.in_channels, "rbr_identity.");
  }

  /// The block's (and the deployed conv's) 3x3 geometry.
  const ConvGeometry& geometry() const { return g_; }
  /// The dense OREPA part (`rbr_dense.`).
  OnlineBlock<S, Identity>& dense() { return dense_; }
  /// The 1x1 ConvBN path (`rbr_1x1.`).
  ConvBN<S, Identity>& conv1x1() { return one_; }
  /// True when the block has the identity BN path `rbr_identity`.
  bool has_identity() const { return identity_.has_value(); }

  /// The dense part's squeezed 3x3 kernel (what the reference calls weight_gen()).
  Tensor<S> squeeze() const { return dense_.squeeze(); }

  /// Training forward: each path with batch statistics, summed, activated.
  const Tensor<S>& forward_train(const Tensor<S>& x) {
    g_.output_shape(x.sizes(), "RepVGGBlock_OREPA::forward_train");
    sum_ = dense_.forward_train(x);
    add(sum_, one_.forward_train(x));
    if (identity_) {
      identity_->forward_train(x, id_out_);
      add(sum_, id_out_);
    }
    out_.resize(sum_.sizes());
    for (std::int64_t j = 0; j < sum_.numel(); ++j) out_[j] = act_(sum_[j]);
    if (identity_) {  // only the identity BN's backward needs the input here (buffer reused)
      x_.resize(x.sizes());
      std::copy(x.begin(), x.end(), x_.begin());
    }
    has_forward_ = true;
    return out_;
  }

  /// Eval forward with running statistics.
  Tensor<S> forward_eval(const Tensor<S>& x) const {
    g_.output_shape(x.sizes(), "RepVGGBlock_OREPA::forward_eval");
    Tensor<S> sum = dense_.forward_eval(x);
    add(sum, one_.forward_eval(x));
    if (identity_) {
      Tensor<S> z;
      identity_->forward_eval(x, z);
      add(sum, z);
    }
    for (auto& v : sum) v = act_(v);
    return sum;
  }

  /// Backward of the last forward_train; returns dL/dx.
  const Tensor<S>& backward(const Tensor<S>& grad_out) {
    if (!has_forward_) throw state_error("RepVGGBlock_OREPA::backward: call forward_train first");
    grad_out.expect_shape(out_.sizes(), "RepVGGBlock_OREPA::backward grad_output");
    dsum_.resize(sum_.sizes());
    for (std::int64_t j = 0; j < sum_.numel(); ++j) dsum_[j] = grad_out[j] * act_.derivative(sum_[j]);
    dx_ = dense_.backward(dsum_);
    add(dx_, one_.backward(dsum_));
    if (identity_) {
      identity_->backward(x_, dsum_, id_dx_);
      add(dx_, id_dx_);
    }
    return dx_;
  }

  /// Every tensor: rbr_dense.*, rbr_1x1.*, rbr_identity.* (state-dict names).
  ParamList<S> parameters() {
    ParamList<S> all = dense_.parameters();
    for (auto* p : one_.parameters()) all.push_back(p);
    if (identity_)
      for (auto* p : identity_->params()) all.push_back(p);
    return all;
  }
  /// The BatchNorms of the block: dense, 1x1, then identity (for num_batches_tracked).
  std::vector<engine::BatchNorm<S>*> batch_norms() {
    auto all = dense_.batch_norms();
    for (auto* b : one_.batch_norms()) all.push_back(b);
    if (identity_) all.push_back(&*identity_);
    return all;
  }
  /// The tensor called `name`, e.g. "rbr_dense.vector" (throws config_error if absent).
  Param<S>& param(const std::string& name) {
    for (auto* p : parameters())
      if (p->name == name) return *p;
    throw config_error("RepVGGBlock_OREPA: no tensor named '" + name + "'");
  }
  /// Zeroes every gradient.
  void zero_grad() {
    for (auto* p : parameters())
      if (p->trainable()) p->zero_grad();
  }

  /// The three paths folded into one 3x3 kernel and bias.
  std::pair<Tensor<S>, Tensor<S>> folded() const {
    auto [w, b] = dense_.folded();
    auto [w1, b1] = one_.folded();
    const std::int64_t O = g_.out_channels, Ig = g_.in_per_group();
    for (std::int64_t o = 0; o < O; ++o) {
      b[o] += b1[o];
      for (std::int64_t i = 0; i < Ig; ++i) w(o, i, 1, 1) += w1(o, i, 0, 0);
    }
    if (identity_) {
      Tensor<S> scale, shift;
      identity_->fold(scale, shift);
      for (std::int64_t o = 0; o < O; ++o) {
        w(o, o % Ig, 1, 1) += scale[o];
        b[o] += shift[o];
      }
    }
    return {std::move(w), std::move(b)};
  }
  /// One fused 3x3 convolution (block stride, padding 1, groups).
  DeployedConv<S, Act> deploy() const {
    auto [w, b] = folded();
    return DeployedConv<S, Act>(g_, std::move(w), std::move(b), act_);
  }

 private:
  // The identity path: as asked, else the reference rule (I == O and stride 1).
  static bool with_identity(const RepVGGOptions& opts) {
    return opts.identity().value_or(opts.in_channels() == opts.out_channels() && opts.stride() == 1);
  }
  static ConvGeometry checked(const RepVGGOptions& opts) {
    auto g = opts.geometry();
    g.validate("RepVGGBlock_OREPA");
    if (with_identity(opts) && g.in_channels != g.out_channels)
      throw config_error(detail::cat("RepVGGBlock_OREPA: the identity path needs in_channels == out_channels, got ",
                                     g.in_channels, " and ", g.out_channels));
    if (opts.internal_channels() < 0)
      throw config_error(detail::cat("RepVGGBlock_OREPA: internal_channels must be >= 0 (0: in_channels), got ",
                                     opts.internal_channels()));
    if (g.kernel != 3 || g.padding != 1 || g.dilation != 1)
      throw config_error(detail::cat("RepVGGBlock_OREPA: needs kernel_size 3, padding 1, dilation 1 (as the "
                                     "reference), got k", g.kernel, " p", g.padding, " d", g.dilation));
    if (g.groups != 1)
      throw config_error(detail::cat("RepVGGBlock_OREPA: groups must be 1 (the reference's DW-separable row "
                                     "supports g = 1 only), got ", g.groups));
    return g;
  }
  static BranchList<S> dense_branches(const ConvGeometry& g, const RepVGGOptions& opts) {
    using namespace branches;
    const std::int64_t T = opts.internal_channels() > 0 ? opts.internal_channels() : g.in_channels;
    Rng rng(opts.seed());
    BranchList<S> list;
    list.push_back(std::make_unique<Origin<S>>(g, "rbr", Init{0.25, 1.0}, rng));
    list.push_back(std::make_unique<Avg<S>>(g, "rbr", Init{0.25, 1.0}, rng));
    list.push_back(std::make_unique<Prior<S>>(g, "rbr", Init{0.0, 1.0}, rng));
    list.push_back(std::make_unique<OneByOneKxk<S>>(g, "rbr", T, T == g.in_channels, Init{0.5, 1.0}, rng));
    list.push_back(std::make_unique<DepthwiseSeparable<S>>(g, "rbr", Init{0.5, 1.0}, rng));
    return list;
  }
  static void add(Tensor<S>& acc, const Tensor<S>& y) {
    for (std::int64_t j = 0; j < y.numel(); ++j) acc[j] += y[j];
  }

  ConvGeometry g_;
  Act act_;
  OnlineBlock<S, Identity> dense_;
  ConvBN<S, Identity> one_;
  std::optional<engine::BatchNorm<S>> identity_;
  Tensor<S> x_, sum_, out_, id_out_, dsum_, dx_, id_dx_;
  bool has_forward_ = false;
};

}  // namespace orepa
