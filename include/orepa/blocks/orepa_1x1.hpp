#pragma once
/// @file orepa_1x1.hpp
/// OREPA_1x1 (SPEC section 2): a 1x1 block with two branches, the free 1x1
/// `weight_or1x1_origin` [O, I, 1, 1] (scale 1.0) and the low-rank identity-initialised
/// pair `weight_or1x1_l2i_conv1` [T, I, 1, 1] -> `weight_or1x1_l2i_conv2` [O, T, 1, 1]
/// (scale 0.5; T = I and conv1 = identity when O > I, else T = O and conv2 = identity).
/// kaiming_uniform a = 1 for the random ones; `vector` [2, O]; bn.*. Groups must be 1.

#include "orepa/blocks/conv_block.hpp"
#include "orepa/blocks/options.hpp"
#include "orepa/branches/orepa_branches.hpp"

namespace orepa {

/// The OREPA 1x1 block: `OREPA_1x1<float, SiLU> b(ConvOptions(64, 128, 1).stride(2));`.
template <class S = float, class Act = Identity>
class OREPA_1x1 : public OnlineBlock<S, Act> {
 public:
  /// The options type the block is built from.
  using Options = ConvOptions;
  /// Builds the block from `opts` (`seed` drives the initialisation). Throws
  /// config_error unless kernel_size is 1 and groups is 1, or on an invalid geometry.
  explicit OREPA_1x1(const ConvOptions& opts, Act act = {})
      : OnlineBlock<S, Act>(opts.geometry(), branches_for(opts), "OREPA_1x1", act) {}

  /// A deep copy: parameters, buffers and configuration, nothing saved for backward.
  OREPA_1x1 clone() const { return OREPA_1x1(*this, detail::CloneTag{}); }

 protected:
  /// A deep copy of `o` (clone()).
  OREPA_1x1(const OREPA_1x1& o, detail::CloneTag t) : OnlineBlock<S, Act>(o, t) {}

 private:
  static BranchList<S> branches_for(const ConvOptions& opts) {
    if (opts.kernel_size() != 1)
      throw config_error(detail::cat("OREPA_1x1: kernel_size must be 1, got ", opts.kernel_size()));
    if (opts.groups() != 1)
      throw config_error(detail::cat("OREPA_1x1: groups must be 1 (as in the reference), got ", opts.groups()));
    const auto g = opts.geometry();
    g.validate("OREPA_1x1");
    Rng rng(opts.seed());
    BranchList<S> list;
    list.push_back(std::make_unique<branches::Origin<S>>(g, "or1x1", branches::Init{1.0, 1.0}, rng));
    list.push_back(std::make_unique<branches::LowRankIdentity<S>>(g, branches::Init{0.5, 1.0}, rng));
    return list;
  }
};

}  // namespace orepa
