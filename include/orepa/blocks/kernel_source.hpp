#pragma once
/// @file kernel_source.hpp
/// Kernel sources: what produces the one convolution kernel W of a trunk or a path, and
/// takes dL/dW back into its parameters. Three kinds, one interface:
///
///     void squeeze_into(Tensor<S>& w) const;            // W, shaped [O, I/g, k, k]
///     void squeeze_backward(ConstTensorView<S> grad_w);  // dL/dW -> parameter gradients
///     void collect_tensors(Tensors<S>& out, const std::string& prefix);
///
/// - BranchSum: a list of branches scaled by `vector` and summed, W = sum_r v[r][o] K_r
///   (OREPA, OREPA_1x1, RepVGG's dense part, a user's branch list);
/// - KernelChain: OREPA_LargeConv's composition of squeezed 3x3 BranchSums;
/// - PlainKernel: a free weight (ConvBN, DBB's convolutions), optionally identity-based
///   (DBB's idconv1: W = weight + id, id never stored).

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "orepa/blocks/module.hpp"
#include "orepa/branches/branch.hpp"
#include "orepa/core/parallel.hpp"
#include "orepa/engine/onednn.hpp"
#include "orepa/engine/reference_conv.hpp"

namespace orepa {

/// W = sum_r v[r][o] * K_r[o] over a branch list; `vector` [rows, O] is named "vector".
template <class S>
class BranchSum {
 public:
  /// `branches` in the row order of `vector`; row r starts at branch r's initial_scale().
  /// `vector_rows` 0 means one row per branch (more rows stay 0, unused, as RepVGG's 6th).
  /// Throws config_error (naming `who`) for an empty list, a null branch or too few rows.
  BranchSum(const ConvGeometry& g, BranchList<S> branches, std::int64_t vector_rows = 0,
            const std::string& who = "BranchSum")
      : g_(g), branches_(std::move(branches)) {
    if (branches_.empty()) throw config_error(who + ": needs at least one branch");
    const auto rows = vector_rows ? vector_rows : std::int64_t(branches_.size());
    if (rows < std::int64_t(branches_.size()))
      throw config_error(detail::cat(who, ": vector_rows ", rows, " < number of branches ", branches_.size()));
    vector_ = Param<S>(Tensor<S>({rows, g.out_channels}), ParamKind::scale);
    for (std::size_t r = 0; r < branches_.size(); ++r) {
      if (!branches_[r]) throw config_error(detail::cat(who, ": branch ", r, " is null"));
      for (std::int64_t o = 0; o < g.out_channels; ++o)
        vector_.value(std::int64_t(r), o) = S(branches_[r]->initial_scale());
    }
  }

  /// A deep copy: every branch cloned (Branch::clone()).
  BranchSum(const BranchSum& o) : g_(o.g_), branches_(clone_branches(o.branches_)), vector_(o.vector_), gemm_(o.gemm_) {}
  /// Move constructor.
  BranchSum(BranchSum&&) noexcept = default;
  /// Move assignment.
  BranchSum& operator=(BranchSum&&) noexcept = default;

  /// The branches, one per row of the scaling matrix.
  const BranchList<S>& branches() const { return branches_; }
  /// The branch-scaling matrix `vector` [rows, O].
  Param<S>& scales() { return vector_; }

  /// The squeezed kernel W = sum_r v[r][o] * K_r[o], [O, I/g, k, k].
  Tensor<S> squeeze() const {
    Tensor<S> w;
    squeeze_into(w);
    return w;
  }
  /// W into `w` (resized to [O, I/g, k, k], buffer reused).
  void squeeze_into(Tensor<S>& w) const {
    w.resize(g_.weight_shape());
    const std::int64_t O = g_.out_channels, per = w.numel() / O;
    // Zeroed by the threads that fill the rows (parallel_ranges gives every branch the same split).
    parallel_ranges(O, [&](std::int64_t o0, std::int64_t o1, int) { std::fill(w.data() + o0 * per, w.data() + o1 * per, S(0)); });
    for (std::size_t r = 0; r < branches_.size(); ++r)
      branches_[r]->add_scaled_kernel(w, vector_.value.data() + std::int64_t(r) * O, gemm_);
  }
  /// dv[r][o] += <dW[o], K_r[o]> and every branch's adjoint of v[r][o] * dW[o]: a few
  /// kernel-sized products, independent of batch and image size.
  void squeeze_backward(ConstTensorView<S> grad_w) {
    grad_w.expect_shape(g_.weight_shape(), "squeeze_backward grad_weight");
    const std::int64_t O = g_.out_channels;
    for (std::size_t r = 0; r < branches_.size(); ++r)
      branches_[r]->scaled_kernel_backward(grad_w, vector_.value.data() + std::int64_t(r) * O,
                                           vector_.grad.data() + std::int64_t(r) * O, gemm_);
  }
  /// Multiplies W by `gain` exactly, through every branch (Branch::scale_kernel).
  void scale_kernel(S gain) {
    for (auto& b : branches_) b->scale_kernel(gain);
  }
  /// The branches' tensors in branch order, then `vector`.
  void collect_tensors(Tensors<S>& out, const std::string& prefix) {
    NamedParams<S> named;
    for (auto& b : branches_) b->collect_tensors(named, prefix);
    for (auto& [n, p] : named) out.add(n, *p);
    out.add(prefix + "vector", vector_);
  }

 private:
  ConvGeometry g_;
  BranchList<S> branches_;
  Param<S> vector_;
  GemmFn<S> gemm_ = engine::fast_gemm<S>();
};

/// OREPA_LargeConv's kernel (SPEC section 3): L squeezed 3x3 layers `weight0.` ..
/// `weight{L-1}.` composed into one k x k kernel, k = 2L + 1, exactly as the reference:
/// K = W_0 transposed to [I, O, 3, 3]; K = xcorr2d(K, W_j, padding 2) for each next layer
/// (conv2d semantics, batch I, O channels); transposed back to [O, I, k, k]. Being a
/// cross-correlation, this is NOT the kernel of the layers applied in sequence (that needs
/// each W_j, j >= 1, flipped in both spatial axes); it is what reference checkpoints were
/// trained with, so it is reproduced for parity.
template <class S>
class KernelChain {
 public:
  /// The layers in order: layer 0 maps I -> O, the others O -> O (3x3, groups 1).
  explicit KernelChain(std::vector<BranchSum<S>> layers, std::int64_t out_channels)
      : layers_(std::move(layers)), O_(out_channels) {}

  /// The layers, each a BranchSum.
  std::vector<BranchSum<S>>& layers() { return layers_; }

  /// The composed k x k kernel [O, I, k, k] into `w`.
  void squeeze_into(Tensor<S>& w) const {
    layers_[0].squeeze_into(tmp_);
    Tensor<S> k = transposed01(tmp_);
    for (std::size_t j = 1; j < layers_.size(); ++j) {
      layers_[j].squeeze_into(tmp_);
      k = reference::conv2d(k, tmp_, step_geometry());
    }
    w = transposed01(k);
  }
  /// Pushes dL/dW back through the chain into every layer's parameter gradients (the
  /// chain's inputs are recomputed: kernel-sized, cheap).
  void squeeze_backward(ConstTensorView<S> grad_w) {
    std::vector<Tensor<S>> inputs, weights(layers_.size());
    layers_[0].squeeze_into(tmp_);
    inputs.push_back(transposed01(tmp_));
    for (std::size_t j = 1; j < layers_.size(); ++j) {
      layers_[j].squeeze_into(weights[j]);
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
  /// Multiplies the composed kernel by `gain` exactly (it is linear in each layer).
  void scale_kernel(S gain) { layers_[0].scale_kernel(gain); }
  /// Every layer's tensors, named `weight0.` .. `weight{L-1}.` + the OREPA names.
  void collect_tensors(Tensors<S>& out, const std::string& prefix) {
    for (std::size_t j = 0; j < layers_.size(); ++j) layers_[j].collect_tensors(out, prefix + "weight" + std::to_string(j) + ".");
  }

 private:
  // One composition step: O -> O channels, 3x3, padding 2 (the kernel grows by 2).
  ConvGeometry step_geometry() const {
    ConvGeometry s;
    s.in_channels = s.out_channels = O_;
    s.kernel = 3;
    s.padding = 2;
    return s;
  }
  // [a, b, h, w] -> [b, a, h, w].
  static Tensor<S> transposed01(ConstTensorView<S> t) {
    const auto A = t.size(0), B = t.size(1), hw = t.size(2) * t.size(3);
    Tensor<S> r({B, A, t.size(2), t.size(3)});
    for (std::int64_t a = 0; a < A; ++a)
      for (std::int64_t b = 0; b < B; ++b) std::copy_n(t.data() + (a * B + b) * hw, hw, r.data() + (b * A + a) * hw);
    return r;
  }

  std::vector<BranchSum<S>> layers_;
  std::int64_t O_;
  mutable Tensor<S> tmp_;  // one layer's squeezed kernel
};

/// A free kernel `weight` [O, I/g, k, k] (ParamKind::kernel) named `name` (e.g.
/// "conv.weight"), initialised like PyTorch's nn.Conv2d (kaiming_uniform, a = sqrt(5)).
/// Identity-based (DBB's idconv1, 1x1 with I == O): the kernel applied is weight + id with
/// id[t, t mod Ig] = 1, rebuilt, never stored; the weight starts at zero.
template <class S>
class PlainKernel {
 public:
  /// The `a` of PyTorch's default conv initialisation, kaiming_uniform_(w, a = sqrt(5)).
  static constexpr double torch_default_a = 2.2360679774997896964;

  /// Kernel of geometry `g` named `name`. Throws config_error for an identity-based
  /// kernel that is not 1x1 with in == out channels.
  PlainKernel(const ConvGeometry& g, std::string name, Rng& rng, bool identity_based = false)
      : weight_(Tensor<S>(g.weight_shape())), name_(std::move(name)), identity_(identity_based) {
    if (identity_ && (g.kernel != 1 || g.in_channels != g.out_channels))
      throw config_error(detail::cat(name_, ": an identity-based kernel must be 1x1 with in == out channels, got ",
                                     g.in_channels, " -> ", g.out_channels, " k", g.kernel));
    if (!identity_) kaiming_uniform(weight_.value, torch_default_a, rng);
  }
  /// The stored weight.
  Param<S>& weight() { return weight_; }
  /// True when the kernel applied is weight + id.
  bool identity_based() const { return identity_; }

  /// The kernel applied: the weight (+ id when identity-based).
  void squeeze_into(Tensor<S>& w) const {
    w.assign(weight_.value);
    if (!identity_) return;
    const std::int64_t C = w.size(0), Cg = w.size(1);
    for (std::int64_t t = 0; t < C; ++t) w[t * Cg + t % Cg] += S(1);
  }
  /// dL/dweight += dL/dW.
  void squeeze_backward(ConstTensorView<S> grad_w) {
    grad_w.expect_shape(weight_.value.sizes(), name_ + " gradient");
    for (std::int64_t j = 0; j < grad_w.numel(); ++j) weight_.grad[j] += grad_w[j];
  }
  /// The weight under `prefix` + its name.
  void collect_tensors(Tensors<S>& out, const std::string& prefix) { out.add(prefix + name_, weight_); }

 private:
  Param<S> weight_;
  std::string name_;
  bool identity_;
};

}  // namespace orepa
