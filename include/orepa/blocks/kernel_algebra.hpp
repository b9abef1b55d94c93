#pragma once
/// @file kernel_algebra.hpp
/// The algebra every block's folded() goes through (SPEC sections 5 and 6). A folded
/// convolution is an Affine: y = conv(x, weight) + bias. Each piece of a block folds as
/// one such map, and consecutive pieces compose:
///   - fold_bn:        BN after a conv scales output channel o by s = gamma / sqrt(var + eps)
///                     and gives bias beta - mean * s (plus s * the conv's own bias);
///   - merge_1x1_kxk:  a 1x1 conv followed by a k x k conv (same groups) is one k x k conv,
///                     K[o, i] = sum_t k2[o, t] * k1[t, i], b = b2 + sum_{t,h,w} k2[o,t,h,w] * b1[t]
///                     (exact for the blocks because the layer between them pads with b1);
///   - pad_to_centre:  a 1x1 kernel zero-padded to the centre of a k x k one;
///   - identity_kernel / avg_kernel: the identity and the k x k average pool as kernels.
/// Deployment folds through deployable_fold(), which first refuses tensors no fold can
/// turn into a usable kernel (check_deployable()): one check for every block type.

#include <cstdint>
#include <string>
#include <utility>

#include "orepa/blocks/batch_norm.hpp"

namespace orepa {

/// A folded convolution: weight [O, I/g, k, k] and bias [O].
template <class S>
struct Affine {
  Tensor<S> weight;  ///< [O, I/g, k, k]
  Tensor<S> bias;    ///< [O]
};

/// The identity over `channels` channels in `groups` groups as a 1x1 kernel
/// [C, C/g, 1, 1] with 1 at [c, c mod (C/g)], and a zero bias.
template <class S>
Affine<S> identity_kernel(std::int64_t channels, std::int64_t groups) {
  const std::int64_t per = channels / groups;
  Affine<S> a{Tensor<S>({channels, per, 1, 1}), Tensor<S>({channels})};
  for (std::int64_t c = 0; c < channels; ++c) a.weight[c * per + c % per] = S(1);
  return a;
}

/// The k x k average pool over `channels` channels in `groups` groups as a kernel:
/// A[o, o mod (C/g), :, :] = 1/k^2, shape [C, C/g, k, k].
template <class S>
Tensor<S> avg_kernel(std::int64_t channels, std::int64_t k, std::int64_t groups) {
  const std::int64_t per = channels / groups;
  Tensor<S> a({channels, per, k, k});
  for (std::int64_t o = 0; o < channels; ++o)
    for (std::int64_t j = 0; j < k * k; ++j) a[(o * per + o % per) * k * k + j] = S(1.0 / double(k * k));
  return a;
}

/// `a` followed by `bn` (eval statistics): row o of the weight and the bias scaled by s[o],
/// plus BN's shift.
template <class S>
Affine<S> fold_bn(Affine<S> a, const BatchNorm2d<S>& bn) {
  const std::int64_t O = a.weight.size(0), per_o = a.weight.numel() / O;
  if (O != bn.channels())
    throw shape_error(detail::cat("fold_bn: kernel ", shape_str(a.weight.sizes()), " has ", O,
                                  " output channels, BN has ", bn.channels()));
  Tensor<S> scale, shift;
  bn.fold(scale, shift);
  for (std::int64_t j = 0; j < a.weight.numel(); ++j) a.weight[j] *= scale[j / per_o];
  for (std::int64_t o = 0; o < O; ++o) a.bias[o] = a.bias[o] * scale[o] + shift[o];
  return a;
}

/// A 1x1 conv `first` (weight [T, Ig, 1, 1]) followed by the conv `second` (weight
/// [O, T/g, k, k]), both with `groups`, as one conv [O, Ig, k, k]. Throws shape_error
/// unless they chain.
template <class S>
Affine<S> merge_1x1_kxk(const Affine<S>& first, const Affine<S>& second, std::int64_t groups) {
  const Tensor<S>&k1 = first.weight, &k2 = second.weight;
  const std::int64_t T = k1.size(0), Ig = k1.size(1), O = k2.size(0), Tg = k2.size(1), kh = k2.size(2),
                     kw = k2.size(3);
  if (k1.size(2) != 1 || k1.size(3) != 1 || T != Tg * groups || O % groups != 0)
    throw shape_error(detail::cat("merge_1x1_kxk: kernels ", shape_str(k1.sizes()), " and ", shape_str(k2.sizes()),
                                  " do not chain with groups ", groups));
  const std::int64_t Og = O / groups, area = kh * kw;
  Affine<S> m{Tensor<S>({O, Ig, kh, kw}), second.bias};
  for (std::int64_t o = 0; o < O; ++o) {
    const std::int64_t t0 = (o / Og) * Tg;  // first internal channel of o's group
    for (std::int64_t u = 0; u < Tg; ++u) {
      const S* w2 = k2.data() + (o * Tg + u) * area;
      const S* w1 = k1.data() + (t0 + u) * Ig;
      for (std::int64_t j = 0; j < area; ++j) {
        m.bias[o] += w2[j] * first.bias[t0 + u];
        for (std::int64_t i = 0; i < Ig; ++i) m.weight[(o * Ig + i) * area + j] += w2[j] * w1[i];
      }
    }
  }
  return m;
}

/// A 1x1 kernel [O, Ig, 1, 1] zero-padded to the centre of a k x k one (a k x k kernel
/// is returned unchanged).
template <class S>
Tensor<S> pad_to_centre(Tensor<S> k1, std::int64_t k) {
  if (k1.size(2) == k) return k1;
  const std::int64_t O = k1.size(0), Ig = k1.size(1);
  Tensor<S> K({O, Ig, k, k});
  for (std::int64_t j = 0; j < O * Ig; ++j) K[j * k * k + (k / 2) * k + k / 2] = k1[j];
  return K;
}

/// Checks that the tensors of `block` (any block or layer: its parameters, buffers and
/// BatchNorms as collect_tensors lists them under `prefix`) fold into a usable kernel.
/// Throws value_error naming the tensor (`prefix` + its state-dict name), the first bad
/// index and its value when a parameter or buffer holds a NaN or Inf (a NaN running mean
/// included), or when a BN's running_var is negative or running_var + eps is not > 0 (the
/// fold scales by 1 / sqrt(running_var + eps): NaN, Inf, or a huge factor from a negative
/// variance that eps almost cancels).
template <class Block>
void check_deployable(const Block& block, const std::string& prefix = "") {
  using S = typename decltype(block.state_dict())::Scalar;
  Tensors<S> t;
  const_cast<Block&>(block).collect_tensors(t, prefix);  // lists pointers; nothing is written
  for (const auto* list : {&t.parameters, &t.buffers})
    for (const auto& [name, p] : *list)
      if (const std::int64_t i = first_non_finite(p->value); i >= 0)
        throw value_error(detail::cat(block.type_name(), ": tensor '", name, "' holds ", p->value[i], " at index ",
                                      index_str(p->value.sizes(), i),
                                      "; a block with non-finite weights or statistics cannot be deployed"));
  for (const auto& [bn_prefix, bn] : t.batch_norms) {
    const Tensor<S>& var = bn->running_var.value;
    for (std::int64_t c = 0; c < var.numel(); ++c) {
      const double v = double(var[c]), sum = v + bn->eps;
      if (v >= 0 && sum > 0) continue;
      throw value_error(detail::cat(block.type_name(), ": tensor '", bn_prefix, "running_var' holds ", var[c],
                                    " at index [", c, "]: ",
                                    v < 0 ? "a variance is never negative, and folding BN would scale by 1 / sqrt("
                                          : "folding BN would scale by 1 / sqrt(",
                                    "running_var + eps) = 1 / sqrt(", sum, ")"));
    }
  }
}

/// `block.folded()` for deployment: check_deployable() first, then the folded kernel and
/// bias themselves (value_error when finite tensors fold into an Inf, e.g. a huge gamma
/// over a tiny variance, naming the block by `prefix` and the first bad index).
template <class Block>
auto deployable_fold(const Block& block, const std::string& prefix = "") {
  check_deployable(block, prefix);
  auto f = block.folded();
  for (const auto* part : {&f.weight, &f.bias})
    if (const std::int64_t i = first_non_finite(*part); i >= 0)
      throw value_error(detail::cat(block.type_name(), prefix.empty() ? "" : " '" + prefix + "'", ": the folded ",
                                    part == &f.weight ? "kernel" : "bias", " holds ", (*part)[i], " at index ",
                                    index_str(part->sizes(), i),
                                    " although every tensor is finite: the BN fold overflows the float range"));
  return f;
}

}  // namespace orepa
