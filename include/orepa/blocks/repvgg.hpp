#pragma once
/// @file repvgg.hpp
/// RepVGGBlock_OREPA (SPEC section 4): y = act(dense(x) + conv1x1_bn(x) + id_bn(x)).
///  - `rbr_dense.`: OREPA_3x3_RepVGG, a BranchSum squeezed on every forward with the rows
///    origin, avg, prior, 1x1->kxk (T = I: idconv1 + id_tensor), DW-separable
///    (`weight_rbr_*`, `vector`, `bn.*`); `vector` has 6 rows when the block has the
///    identity path (the 6th never used, kept 0), else 5;
///  - `rbr_1x1.`: conv 1x1 with the block's stride and groups, padding 0, -> BN;
///  - `rbr_identity.`: BN over the input, by the reference rule present only when I == O
///    and stride 1 (RepVGGOptions::identity overrides the rule, e.g. for a checkpoint).
/// k = 3, padding 1, dilation 1 as the reference asserts; groups must be 1 (the
/// reference's DW-separable row only works for g = 1). Default activation ReLU.
/// Deploy folds each path with its own BN and sums them (paths.hpp).

#include "orepa/blocks/options.hpp"
#include "orepa/blocks/paths.hpp"
#include "orepa/branches/orepa_branches.hpp"

namespace orepa {

/// The RepVGG block with an OREPA dense branch.
template <class S = float, class Act = ReLU>
class RepVGGBlock_OREPA : public MultiPathBlock<S, Act> {
 public:
  /// The options type the block is built from.
  using Options = RepVGGOptions;
  /// Builds the block from `opts` (`seed` for the dense part, `seed + 1` for the 1x1).
  /// Throws config_error unless kernel_size 3, padding 1 (or unset), dilation 1 and
  /// groups 1, for an identity path with in_channels != out_channels, for internal
  /// channels < 0, or on an invalid geometry.
  explicit RepVGGBlock_OREPA(const RepVGGOptions& opts, Act act = {})
      : MultiPathBlock<S, Act>("RepVGGBlock_OREPA", checked(opts), paths_for(opts), act) {}

  /// The stage of the dense part (`rbr_dense.`): a branch sum and a conv -> BN trunk.
  using Dense = ConvBnStage<S, BranchSum<S>>;

  /// True when the block has the identity BN path `rbr_identity`.
  bool has_identity() const { return this->paths().size() == 3; }
  /// The dense part's squeezed 3x3 kernel (what the reference calls weight_gen()).
  Tensor<S> squeeze() const { return dense().squeeze(); }
  /// The dense part.
  Dense& dense() { return static_cast<Dense&>(this->paths()[0].stage(0)); }
  /// The dense part, read-only.
  const Dense& dense() const { return static_cast<const Dense&>(this->paths()[0].stage(0)); }

  /// A deep copy: parameters, buffers and configuration, nothing saved for backward.
  RepVGGBlock_OREPA clone() const { return RepVGGBlock_OREPA(*this, detail::CloneTag{}); }

 protected:
  /// A deep copy of `o` (clone()).
  RepVGGBlock_OREPA(const RepVGGBlock_OREPA& o, detail::CloneTag t) : MultiPathBlock<S, Act>(o, t) {}

 private:
  // The identity path: as asked, else the reference rule (I == O and stride 1).
  static bool with_identity(const RepVGGOptions& opts) {
    return opts.identity().value_or(opts.in_channels() == opts.out_channels() && opts.stride() == 1);
  }
  static ConvGeometry checked(const RepVGGOptions& opts) {
    auto g = opts.geometry();
    g.validate("RepVGGBlock_OREPA");
    if (g.kernel != 3 || g.padding != 1 || g.dilation != 1)
      throw config_error(detail::cat("RepVGGBlock_OREPA: needs kernel_size 3, padding 1, dilation 1 (as the "
                                     "reference), got k", g.kernel, " p", g.padding, " d", g.dilation));
    if (g.groups != 1)
      throw config_error(detail::cat("RepVGGBlock_OREPA: groups must be 1 (the reference's DW-separable row "
                                     "supports g = 1 only), got ", g.groups));
    if (with_identity(opts) && g.in_channels != g.out_channels)
      throw config_error(detail::cat("RepVGGBlock_OREPA: the identity path needs in_channels == out_channels, got ",
                                     g.in_channels, " and ", g.out_channels));
    if (opts.internal_channels() < 0)
      throw config_error(detail::cat("RepVGGBlock_OREPA: internal_channels must be >= 0 (0: in_channels), got ",
                                     opts.internal_channels()));
    return g;
  }
  static std::vector<Path<S>> paths_for(const RepVGGOptions& opts) {
    using namespace branches;
    const ConvGeometry g = checked(opts);
    const std::int64_t T = opts.internal_channels() > 0 ? opts.internal_channels() : g.in_channels;
    const bool identity = with_identity(opts);
    Rng rng(opts.seed());
    BranchList<S> list;
    list.push_back(std::make_unique<Origin<S>>(g, "rbr", Init{0.25, 1.0}, rng));
    list.push_back(std::make_unique<Avg<S>>(g, "rbr", Init{0.25, 1.0}, rng));
    list.push_back(std::make_unique<Prior<S>>(g, "rbr", Init{0.0, 1.0}, rng));
    list.push_back(std::make_unique<OneByOneKxk<S>>(g, "rbr", T, T == g.in_channels, Init{0.5, 1.0}, rng));
    list.push_back(std::make_unique<DepthwiseSeparable<S>>(g, "rbr", Init{0.5, 1.0}, rng));
    std::vector<Path<S>> paths;
    auto path = [&](std::string name, std::unique_ptr<Stage<S>> stage) {
      std::vector<std::unique_ptr<Stage<S>>> stages;
      stages.push_back(std::move(stage));
      paths.emplace_back(std::move(name), std::move(stages));
    };
    path("rbr_dense.", std::make_unique<ConvBnStage<S, BranchSum<S>>>(
                           g, BranchSum<S>(g, std::move(list), identity ? 6 : 5, "RepVGGBlock_OREPA"), "bn.",
                           "RepVGGBlock_OREPA.rbr_dense"));
    const ConvGeometry one{g.in_channels, g.out_channels, 1, g.stride, 0, 1, g.groups};
    Rng rng1(opts.seed() + 1);
    path("rbr_1x1.", std::make_unique<ConvBnStage<S, PlainKernel<S>>>(one, PlainKernel<S>(one, "conv.weight", rng1),
                                                                       "bn.", "RepVGGBlock_OREPA.rbr_1x1"));
    if (identity) path("rbr_identity.", std::make_unique<BnStage<S>>(g.in_channels, ""));
    return paths;
  }
};

}  // namespace orepa
