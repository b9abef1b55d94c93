#pragma once
/// @file orepa_large.hpp
/// OREPA_LargeConv (SPEC section 3): the deep-stem large kernel. L = (k-1)/2 weight-only
/// 3x3 OREPA layers `weight0.` .. `weight{L-1}.` (layer 0 maps I -> O, the others O -> O)
/// are composed into one k x k kernel, then one conv, BN and the activation.
///
/// Composition, exactly as the reference does it: K = W_0 transposed to [I, O, 3, 3];
/// for each next layer K = xcorr2d(K, W_j, padding 2) (conv2d semantics with batch I and
/// O channels); finally transposed back to [O, I, k, k]. Because it is a
/// cross-correlation, this is NOT the kernel of the L layers applied in sequence (that
/// would need each W_j, j >= 1, flipped in both spatial axes); it is what checkpoints of
/// the reference were trained with, so it is reproduced for parity.
///
/// Groups: only groups = 1. The reference fails for g > 1 (its later layers mix all O
/// channels, which a grouped kernel cannot represent), so g > 1 throws config_error.

#include <vector>

#include "orepa/blocks/orepa.hpp"
#include "orepa/engine/reference_conv.hpp"

namespace orepa {

/// The OREPA large-kernel block: `OREPA_LargeConv<float, SiLU> stem(ConvOptions(3, 64, 7).stride(2));`.
template <class S = float, class Act = Identity>
class OREPA_LargeConv : public SqueezedBlock<S, Act> {
 public:
  /// The options type the block is built from.
  using Options = ConvOptions;
  /// Builds the block from `opts`: (k-1)/2 weight-only 3x3 OREPA layers, layer j seeded
  /// with `seed + j`. Throws config_error unless kernel_size is odd and >= 3 and groups
  /// is 1, or on an invalid geometry.
  explicit OREPA_LargeConv(const ConvOptions& opts, Act act = {})
      : SqueezedBlock<S, Act>(checked(opts), "OREPA_LargeConv", true, "bn.", act) {
    const auto g = this->geometry();
    const std::int64_t L = (g.kernel - 1) / 2;
    layers_.reserve(std::size_t(L));
    for (std::int64_t j = 0; j < L; ++j) {
      auto o = OrepaOptions(j == 0 ? g.in_channels : g.out_channels, g.out_channels, 3);
      layers_.emplace_back(o.weight_only(true).seed(opts.seed() + std::uint64_t(j)));
      for (auto* p : layers_.back().parameters()) p->name = "weight" + std::to_string(j) + "." + p->name;
    }
  }

  /// The inner weight-only 3x3 OREPA layers.
  std::vector<OREPA<S, Identity>>& layers() { return layers_; }

  /// Composes the layers' squeezed 3x3 kernels into the k x k kernel [O, I, k, k] in
  /// `w` (the reference's cross-correlation chain, see the file comment).
  void squeeze_into(Tensor<S>& w) const override {
    Tensor<S> k = transposed01(layers_[0].squeeze());
    for (std::size_t j = 1; j < layers_.size(); ++j) k = reference::conv2d(k, layers_[j].squeeze(), step_geometry());
    w = transposed01(k);
  }

  /// Adjoint of squeeze_into(): pushes dL/dW, `grad_w` [O, I, k, k], back through the
  /// chain and accumulates it into every layer's parameter gradients. Throws
  /// shape_error on a wrong `grad_w` shape.
  void squeeze_backward(const Tensor<S>& grad_w) override {
    grad_w.expect_shape(this->geometry().weight_shape(), "OREPA_LargeConv::squeeze_backward grad_weight");
    // Recompute the chain's inputs K_0 .. K_{L-2} (kernel-sized, cheap).
    std::vector<Tensor<S>> inputs{transposed01(layers_[0].squeeze())};
    std::vector<Tensor<S>> weights{Tensor<S>()};
    for (std::size_t j = 1; j < layers_.size(); ++j) {
      weights.push_back(layers_[j].squeeze());
      if (j + 1 < layers_.size()) inputs.push_back(reference::conv2d(inputs.back(), weights[j], step_geometry()));
    }
    Tensor<S> dk = transposed01(grad_w);
    for (std::size_t j = layers_.size() - 1; j >= 1; --j) {
      const auto& kin = inputs[j - 1];
      layers_[j].squeeze_backward(reference::conv2d_backward_weights(kin, dk, step_geometry()));
      dk = reference::conv2d_backward_data(dk, weights[j], step_geometry(), kin.sizes());
    }
    layers_[0].squeeze_backward(transposed01(dk));
  }

  /// Every layer's tensors in layer order, named `weight0.` .. `weight{L-1}.` + the OREPA name.
  ParamList<S> kernel_parameters() override {
    ParamList<S> all;
    for (auto& l : layers_)
      for (auto* p : l.parameters()) all.push_back(p);
    return all;
  }

 private:
  static ConvGeometry checked(const ConvOptions& opts) {
    auto g = opts.geometry();
    g.validate("OREPA_LargeConv");
    if (g.kernel < 3)
      throw config_error(detail::cat("OREPA_LargeConv: kernel_size must be an odd number >= 3, got ", g.kernel));
    if (g.groups != 1)
      throw config_error(detail::cat("OREPA_LargeConv: groups must be 1 (the reference's composition is undefined "
                                     "for grouped kernels), got ", g.groups));
    return g;
  }
  // One composition step: O -> O channels, 3x3, padding 2 (the kernel grows by 2).
  ConvGeometry step_geometry() const {
    ConvGeometry s;
    s.in_channels = s.out_channels = this->geometry().out_channels;
    s.kernel = 3;
    s.padding = 2;
    return s;
  }
  // [a, b, h, w] -> [b, a, h, w].
  static Tensor<S> transposed01(const Tensor<S>& t) {
    const auto A = t.size(0), B = t.size(1), hw = t.size(2) * t.size(3);
    Tensor<S> r({B, A, t.size(2), t.size(3)});
    for (std::int64_t a = 0; a < A; ++a)
      for (std::int64_t b = 0; b < B; ++b)
        std::copy_n(t.data() + (a * B + b) * hw, hw, r.data() + (b * A + a) * hw);
    return r;
  }

  std::vector<OREPA<S, Identity>> layers_;
};

}  // namespace orepa
