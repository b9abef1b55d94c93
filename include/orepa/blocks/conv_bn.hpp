#pragma once
/// @file conv_bn.hpp
/// `ConvBN<S, Act>`: the plain baseline block y = act(BN(conv(x, W))) (SPEC section 5),
/// state-dict names `conv.weight` [O, I/g, k, k] (no conv bias) and `bn.*`; deployed as
/// one conv with W' = W * s[o], b = beta - running_mean * s, s = gamma / sqrt(var + eps).
///
/// It is a SqueezedBlock whose "squeeze" is the identity on `conv.weight`, so it trains on
/// exactly the same conv + BN + activation machinery as the OREPA blocks: the training
/// cost comparison between them measures the squeeze, nothing else.
///
/// Initialisation: PyTorch's default nn.Conv2d init (kaiming_uniform with a = sqrt(5),
/// i.e. bound 1/sqrt(fan_in)) from Rng(seed); BN weight 1, bias 0, running mean 0, var 1.
/// Any kernel size (odd or even), stride, padding (default k/2), dilation and groups.
///
/// Thread safety: a block is not safe to use from several threads at once (training and
/// eval forwards reuse the block's buffers). Deploy it for concurrent inference.

#include <string>

#include "orepa/blocks/options.hpp"
#include "orepa/blocks/squeezed_block.hpp"
#include "orepa/core/random.hpp"

namespace orepa {

/// The `a` of PyTorch's default conv initialisation, kaiming_uniform_(w, a = sqrt(5)).
inline constexpr double torch_default_conv_a = 2.2360679774997896964;

/// The plain conv + BN (+ activation) block: `ConvBN<float, SiLU> b(ConvOptions(16, 32, 3).stride(2));`.
template <class S = float, class Act = Identity>
class ConvBN : public SqueezedBlock<S, Act> {
 public:
  /// The options type the block is built from.
  using Options = ConvOptions;
  /// Builds the block from `opts` (`seed` drives the conv init). `prefix` is prepended to
  /// every tensor name (`prefix + "conv.weight"`, BN prefix `prefix + "bn."`) for a ConvBN
  /// nested in another block, e.g. RepVGG's "rbr_1x1.". Throws config_error on an
  /// invalid geometry.
  explicit ConvBN(const ConvOptions& opts, Act act = {}, const std::string& prefix = "")
      : SqueezedBlock<S, Act>(opts.geometry(), "ConvBN", true, prefix + "bn.", act, /*odd_kernel=*/false),
        weight_(prefix + "conv.weight", Tensor<S>(this->geometry().weight_shape())) {
    Rng rng(opts.seed());
    kaiming_uniform(weight_.value, torch_default_conv_a, rng);
  }

  /// The kernel is `conv.weight` itself.
  void squeeze_into(Tensor<S>& w) const override {
    w.resize(weight_.value.sizes());
    std::copy(weight_.value.begin(), weight_.value.end(), w.begin());
  }
  /// dL/d(conv.weight) is dL/dW.
  void squeeze_backward(const Tensor<S>& grad_w) override {
    grad_w.expect_shape(weight_.value.sizes(), "ConvBN::squeeze_backward grad_weight");
    for (std::int64_t j = 0; j < grad_w.numel(); ++j) weight_.grad[j] += grad_w[j];
  }
  /// `conv.weight` (then SqueezedBlock adds the BN tensors).
  ParamList<S> kernel_parameters() override { return {&weight_}; }

 private:
  Param<S> weight_;
};

}  // namespace orepa
