#pragma once
/// @file orepa.hpp (blocks)
/// OREPA: the k x k online re-parameterised block (SPEC section 1): six branches
/// (origin, 1x1+avg, 1x1+frequency prior, 1x1->kxk, 1x1, linear DW-separable) squeezed
/// into one kernel, then BN and the activation. State-dict names as in the reference:
/// weight_orepa_*, id_tensor, vector [6, O], bn.*.

#include "orepa/blocks/conv_block.hpp"
#include "orepa/blocks/options.hpp"
#include "orepa/branches/orepa_branches.hpp"

namespace orepa {

/// The reference rule for the 1x1 -> k x k internal channels: I when g <= 4, else 2 I.
inline std::int64_t default_internal_channels(std::int64_t in_channels, std::int64_t groups) {
  return groups <= 4 ? in_channels : 2 * in_channels;
}

/// The six OREPA branches for geometry `g` in `vector` row order, reference-initialised
/// (kaiming_uniform a = 0, idconv1 zero, scales 0.25, 0.25, 0, 0.5, 1, 0.5); T internal
/// channels in the 1x1 -> k x k row (0: the reference rule).
template <class S>
BranchList<S> make_orepa_branches(const ConvGeometry& g, std::int64_t internal_channels, Rng& rng) {
  using namespace branches;
  const std::int64_t T = internal_channels > 0 ? internal_channels : default_internal_channels(g.in_channels, g.groups);
  BranchList<S> list;
  list.push_back(std::make_unique<Origin<S>>(g, "orepa", Init{0.25, 0.0}, rng));
  list.push_back(std::make_unique<Avg<S>>(g, "orepa", Init{0.25, 0.0}, rng));
  list.push_back(std::make_unique<Prior<S>>(g, "orepa", Init{0.0, 0.0}, rng));
  list.push_back(std::make_unique<OneByOneKxk<S>>(g, "orepa", T, true, Init{0.5, 0.0}, rng));
  list.push_back(std::make_unique<OneByOne<S>>(g, "orepa", Init{1.0, 0.0}, rng));
  list.push_back(std::make_unique<DepthwiseSeparable<S>>(g, "orepa", Init{0.5, 0.0}, rng));
  return list;
}

/// The OREPA k x k block, `OREPA<float, SiLU> b(OrepaOptions(16, 32, 3).stride(2));`.
/// Any odd k, groups, stride, padding and dilation.
template <class S = float, class Act = Identity>
class OREPA : public OnlineBlock<S, Act> {
 public:
  /// The options type the block is built from.
  using Options = OrepaOptions;
  /// Builds the block from `opts` (`seed` drives the reference initialisation, see
  /// make_orepa_branches()). Throws config_error on an invalid geometry (even kernel,
  /// groups not dividing the channels, ...) or internal channels not a positive multiple
  /// of groups.
  explicit OREPA(const OrepaOptions& opts, Act act = {})
      : OnlineBlock<S, Act>(opts.geometry(), branches_for(opts), "OREPA", act) {}

  /// A deep copy: parameters, buffers and configuration, nothing saved for backward.
  OREPA clone() const { return OREPA(*this, detail::CloneTag{}); }

 protected:
  /// A deep copy of `o` (clone()).
  OREPA(const OREPA& o, detail::CloneTag t) : OnlineBlock<S, Act>(o, t) {}

 private:
  static BranchList<S> branches_for(const OrepaOptions& opts) {
    const auto g = opts.geometry();
    g.validate("OREPA");
    Rng rng(opts.seed());
    return make_orepa_branches<S>(g, opts.internal_channels(), rng);
  }
};

}  // namespace orepa
