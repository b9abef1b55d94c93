#pragma once
/// @file conv_bn.hpp
/// ConvBN<S, Act>: the plain baseline block y = act(BN(conv(x, W))) (SPEC section 5),
/// state-dict names `conv.weight` [O, I/g, k, k] (no conv bias) and `bn.*`; deployed as
/// one conv with W' = W * s[o], b = beta - running_mean * s, s = gamma / sqrt(var + eps).
///
/// It is a ConvBlock whose kernel source is the plain `conv.weight`, so it trains on
/// exactly the same trunk as the OREPA blocks: the training cost comparison between them
/// measures the squeeze, nothing else.
///
/// Initialisation: PyTorch's default nn.Conv2d init (kaiming_uniform with a = sqrt(5),
/// i.e. bound 1/sqrt(fan_in)) from Rng(seed); BN weight 1, bias 0, running mean 0, var 1.
/// Any kernel size (odd or even), stride, padding, dilation and groups.

#include "orepa/blocks/conv_block.hpp"
#include "orepa/blocks/options.hpp"

namespace orepa {

/// The plain conv + BN (+ activation) block: `ConvBN<float, SiLU> b(ConvOptions(16, 32, 3).stride(2));`.
template <class S = float, class Act = Identity>
class ConvBN : public ConvBlock<S, Act, PlainKernel<S>> {
 public:
  /// The options type the block is built from.
  using Options = ConvOptions;
  /// Builds the block from `opts` (`seed` drives the conv init). Throws config_error on
  /// an invalid geometry.
  explicit ConvBN(const ConvOptions& opts, Act act = {})
      : ConvBlock<S, Act, PlainKernel<S>>("ConvBN", opts.geometry(), kernel_for(opts), act, /*any_kernel=*/true) {}

  /// The weight `conv.weight` with its gradient.
  Param<S>& weight() { return this->source().weight(); }

  /// A deep copy: parameters, buffers and configuration, nothing saved for backward.
  ConvBN clone() const { return ConvBN(*this, detail::CloneTag{}); }

 protected:
  /// A deep copy of `o` (clone()).
  ConvBN(const ConvBN& o, detail::CloneTag t) : ConvBlock<S, Act, PlainKernel<S>>(o, t) {}

 private:
  static PlainKernel<S> kernel_for(const ConvOptions& opts) {
    const auto g = opts.geometry();
    g.validate("ConvBN", false);
    Rng rng(opts.seed());
    return PlainKernel<S>(g, "conv.weight", rng);
  }
};

}  // namespace orepa
