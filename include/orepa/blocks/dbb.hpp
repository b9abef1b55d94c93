#pragma once
/// @file dbb.hpp
/// DBB<S, Act>: the Diverse Branch Block (structural re-parameterisation, SPEC section 5),
/// the baseline OREPA's training cost is measured against. In training EVERY branch runs
/// on the activations with its own BN (no squeezing):
///
///     y = act(dbb_origin(x) + dbb_avg(x) + dbb_1x1(x) + dbb_1x1_kxk(x))
///
/// Padding must be k/2 and dilation 1 (the reference's branches only line up then).
/// When groups < out_channels (e.g. g = 1, g = 2):
///   - dbb_origin:  conv k x k (`conv.weight`) -> BN (`bn.*`);
///   - dbb_avg:     conv 1x1 (`conv.weight`) -> BN-and-pad (`bn.bn.*`) -> k x k average pool
///                  (stride, padding 0) -> BN (`avgbn.*`);
///   - dbb_1x1:     conv 1x1 (stride, padding 0) -> BN (`conv.weight`, `bn.*`);
///   - dbb_1x1_kxk: identity-based 1x1 (`idconv1.weight` [I, Ig, 1, 1], applied as weight + id)
///                  -> BN-and-pad (`bn1.bn.*`) -> conv k x k (`conv2.weight`, stride, padding 0)
///                  -> BN (`bn2.*`).
/// When groups >= out_channels (g = O; the reference then needs I = O, e.g. depthwise):
/// no dbb_1x1; dbb_avg is only a padded k x k average pool -> `avgbn.*`; dbb_1x1_kxk has
/// internal width T = 2I and a plain `conv1.weight` [2I, Ig, 1, 1].
/// DbbOptions::internal_channels (0 = the rule above) overrides T as the reference's
/// internal_channels_1x1_3x3 does: T == I gives idconv1, any other T a plain conv1.
///
/// Initialisation (as the reference): PyTorch's default conv init from Rng(seed), drawn in
/// state-dict order (dbb_origin, dbb_avg.conv, dbb_1x1, conv1, conv2); idconv1 zero; every
/// BN weight 1, bias 0, running mean 0, running var 1. Deploy folds every path (paths.hpp).

#include "orepa/blocks/options.hpp"
#include "orepa/blocks/paths.hpp"

namespace orepa {

/// The Diverse Branch Block, `DBB<float, ReLU> b(DbbOptions(16, 32, 3).groups(2));`.
template <class S = float, class Act = Identity>
class DBB : public MultiPathBlock<S, Act> {
 public:
  /// The options type the block is built from.
  using Options = DbbOptions;
  /// Builds the block from `opts` (`seed` drives the conv init). Throws config_error on
  /// an invalid geometry, an even kernel, padding != k/2, dilation != 1, g >= O with
  /// I != O, or internal channels not divisible by groups.
  explicit DBB(const DbbOptions& opts, Act act = {})
      : MultiPathBlock<S, Act>("DBB", checked(opts), paths_for(opts), act), T_(internal(opts)) {}

  /// Internal channels T of dbb_1x1_kxk.
  std::int64_t internal_channels() const { return T_; }
  /// True for the g < O variant (with dbb_1x1 and dbb_avg.conv), false for g >= O.
  bool has_1x1_branch() const { return this->geometry().groups < this->geometry().out_channels; }

  /// A deep copy: parameters, buffers and configuration, nothing saved for backward.
  DBB clone() const { return DBB(*this, detail::CloneTag{}); }

 protected:
  /// A deep copy of `o` (clone()).
  DBB(const DBB& o, detail::CloneTag t) : MultiPathBlock<S, Act>(o, t) {}

 private:
  static ConvGeometry checked(const DbbOptions& opts) {
    const ConvGeometry g = opts.geometry();
    g.validate("DBB");
    if (g.padding != g.kernel / 2)
      throw config_error(detail::cat("DBB: padding must be kernel_size / 2 = ", g.kernel / 2, ", got ", g.padding));
    if (g.dilation != 1)
      throw config_error(detail::cat("DBB: dilation must be 1 (the branches only line up then), got ", g.dilation));
    if (g.groups >= g.out_channels && g.in_channels != g.out_channels)
      throw config_error(detail::cat("DBB: with groups >= out_channels the padded-pool branch needs in_channels == "
                                     "out_channels, got ", g.in_channels, " and ", g.out_channels));
    const auto T = internal(opts);
    if (T % g.groups != 0)
      throw config_error(detail::cat("DBB: internal channels ", T, " must be divisible by groups ", g.groups));
    return g;
  }
  static std::int64_t internal(const DbbOptions& opts) {
    if (opts.internal_channels() > 0) return opts.internal_channels();
    return opts.groups() < opts.out_channels() ? opts.in_channels() : 2 * opts.in_channels();
  }
  static std::vector<Path<S>> paths_for(const DbbOptions& opts) {
    const ConvGeometry g = checked(opts);
    const std::int64_t I = g.in_channels, O = g.out_channels, k = g.kernel, s = g.stride, p = g.padding, G = g.groups;
    const std::int64_t T = internal(opts);
    const bool narrow = G < O;
    auto conv = [](std::int64_t in, std::int64_t out, std::int64_t kk, std::int64_t st, std::int64_t pad,
                   std::int64_t groups) { return ConvGeometry{in, out, kk, st, pad, 1, groups}; };
    using Plain = PlainKernel<S>;
    Rng rng(opts.seed());  // drawn in the reference's registration order
    std::vector<Path<S>> paths;
    auto path = [&](std::string name, auto... stages) {
      std::vector<std::unique_ptr<Stage<S>>> list;
      (list.push_back(std::move(stages)), ...);
      paths.emplace_back(std::move(name), std::move(list));
    };
    path("dbb_origin.", std::make_unique<ConvBnStage<S, Plain>>(g, Plain(g, "conv.weight", rng), "bn.", "DBB"));
    if (narrow) {
      const auto c1 = conv(I, O, 1, 1, 0, G);
      auto first = std::make_unique<ConvStage<S, Plain>>(c1, Plain(c1, "conv.weight", rng));
      path("dbb_avg.", std::move(first), std::make_unique<BnPadStage<S>>(O, p, "bn."),
           std::make_unique<AvgPoolStage<S>>(O, k, s, 0), std::make_unique<BnStage<S>>(O, "avgbn."));
      const auto one = conv(I, O, 1, s, 0, G);
      path("dbb_1x1.", std::make_unique<ConvBnStage<S, Plain>>(one, Plain(one, "conv.weight", rng), "bn.", "DBB"));
    } else {
      path("dbb_avg.", std::make_unique<AvgPoolStage<S>>(O, k, s, p), std::make_unique<BnStage<S>>(O, "avgbn."));
    }
    const auto c1 = conv(I, T, 1, 1, 0, G), c2 = conv(T, O, k, s, 0, G);
    auto first = std::make_unique<ConvStage<S, Plain>>(
        c1, Plain(c1, T == I ? "idconv1.weight" : "conv1.weight", rng, /*identity_based=*/T == I));
    auto second = std::make_unique<ConvBnStage<S, Plain>>(c2, Plain(c2, "conv2.weight", rng), "bn2.", "DBB");
    path("dbb_1x1_kxk.", std::move(first), std::make_unique<BnPadStage<S>>(T, p, "bn1."), std::move(second));
    return paths;
  }

  std::int64_t T_;
};

}  // namespace orepa
