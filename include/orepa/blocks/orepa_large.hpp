#pragma once
/// @file orepa_large.hpp
/// OREPA_LargeConv (SPEC section 3): the deep-stem large kernel. L = (k-1)/2 squeezed 3x3
/// OREPA branch lists `weight0.` .. `weight{L-1}.` (layer 0 maps I -> O, the others
/// O -> O) composed into one k x k kernel (KernelChain, the reference's cross-correlation
/// chain), then one conv, BN and the activation.
///
/// Groups: only groups = 1. The reference fails for g > 1 (its later layers mix all O
/// channels, which a grouped kernel cannot represent), so g > 1 throws config_error.

#include <vector>

#include "orepa/blocks/orepa.hpp"

namespace orepa {

/// The OREPA large-kernel block: `OREPA_LargeConv<float, SiLU> stem(ConvOptions(3, 64, 7).stride(2));`.
template <class S = float, class Act = Identity>
class OREPA_LargeConv : public ConvBlock<S, Act, KernelChain<S>> {
 public:
  /// The options type the block is built from.
  using Options = ConvOptions;
  /// Builds the block from `opts`: (k-1)/2 squeezed 3x3 OREPA layers, layer j seeded with
  /// `seed + j`. Throws config_error unless kernel_size is odd and >= 3 and groups is 1,
  /// or on an invalid geometry.
  explicit OREPA_LargeConv(const ConvOptions& opts, Act act = {})
      : ConvBlock<S, Act, KernelChain<S>>("OREPA_LargeConv", opts.geometry(), chain_for(opts), act) {}

  /// The 3x3 layers (BranchSums) whose kernels are composed.
  std::vector<BranchSum<S>>& layers() { return this->source().layers(); }

  /// A deep copy: parameters, buffers and configuration, nothing saved for backward.
  OREPA_LargeConv clone() const { return OREPA_LargeConv(*this, detail::CloneTag{}); }

 protected:
  /// A deep copy of `o` (clone()).
  OREPA_LargeConv(const OREPA_LargeConv& o, detail::CloneTag t) : ConvBlock<S, Act, KernelChain<S>>(o, t) {}

 private:
  static KernelChain<S> chain_for(const ConvOptions& opts) {
    const auto g = opts.geometry();
    g.validate("OREPA_LargeConv");
    if (g.kernel < 3)
      throw config_error(detail::cat("OREPA_LargeConv: kernel_size must be an odd number >= 3, got ", g.kernel));
    if (g.groups != 1)
      throw config_error(detail::cat("OREPA_LargeConv: groups must be 1 (the reference's composition is undefined "
                                     "for grouped kernels), got ", g.groups));
    std::vector<BranchSum<S>> layers;
    for (std::int64_t j = 0; j < (g.kernel - 1) / 2; ++j) {
      const auto lg = OrepaOptions(j == 0 ? g.in_channels : g.out_channels, g.out_channels, 3).geometry();
      Rng rng(opts.seed() + std::uint64_t(j));
      layers.emplace_back(lg, make_orepa_branches<S>(lg, 0, rng), 0, "OREPA_LargeConv");
    }
    return KernelChain<S>(std::move(layers), g.out_channels);
  }
};

}  // namespace orepa
