#pragma once
/// @file online_block.hpp
/// OnlineBlock<S, Act>: an online re-parameterised block built from a list of branches
/// (OREPA, OREPA_1x1, the RepVGG dense part, or a user's own list). Every training
/// forward squeezes the branches into ONE kernel, W = sum_r v[r][o] * K_r, then runs
/// y = act(BN(conv(x, W))); backward applies each branch's adjoint to dL/dW.
/// This is the extension point: a new block is a new branch list (see
/// examples/custom_block.cpp).

#include "orepa/blocks/squeezed_block.hpp"
#include "orepa/branches/branch.hpp"
#include "orepa/branches/orepa_branches.hpp"

namespace orepa {

/// Structural settings of an online block beyond its geometry and branches.
struct OnlineBlockConfig {
  std::string type_name = "OnlineBlock";  ///< used in error messages ("OREPA", ...)
  bool weight_only = false;               ///< no BN / forward: only squeeze() (LargeConv's inner layers)
  std::int64_t vector_rows = 0;           ///< rows of `vector`; 0 = one per branch (extra rows stay 0, unused)
  std::string bn_prefix = "bn.";          ///< state-dict prefix of the BN tensors
};

/// A block whose branches are squeezed into one kernel on every forward pass.
template <class S, class Act = Identity>
class OnlineBlock : public SqueezedBlock<S, Act> {
 public:
  /// `branches` in the row order of `vector`; row r starts at branch r's initial_scale().
  /// Throws config_error on an invalid geometry, an empty list or too few vector rows.
  OnlineBlock(const ConvGeometry& g, BranchList<S> branches, const OnlineBlockConfig& cfg = {}, Act act = {})
      : SqueezedBlock<S, Act>(g, cfg.type_name, !cfg.weight_only, cfg.bn_prefix, act),
        branches_(std::move(branches)) {
    if (branches_.empty()) throw config_error(cfg.type_name + ": needs at least one branch");
    const auto rows = cfg.vector_rows ? cfg.vector_rows : std::int64_t(branches_.size());
    if (rows < std::int64_t(branches_.size()))
      throw config_error(detail::cat(cfg.type_name, ": vector_rows ", rows, " < number of branches ", branches_.size()));
    vector_ = Param<S>("vector", Tensor<S>({rows, g.out_channels}), ParamKind::scale);
    for (std::size_t r = 0; r < branches_.size(); ++r) {
      if (!branches_[r]) throw config_error(detail::cat(cfg.type_name, ": branch ", r, " is null"));
      for (std::int64_t o = 0; o < g.out_channels; ++o) vector_.value(std::int64_t(r), o) = S(branches_[r]->initial_scale());
    }
  }

  /// The branches, one per row of the scaling matrix.
  const BranchList<S>& branches() const { return branches_; }
  /// The branch-scaling matrix `vector` [rows, O].
  Param<S>& scales() { return vector_; }

  /// W = sum_r v[r][o] * K_r[o]. The library's branches add their scaled kernel in one
  /// pass (branches::ScaledAdjoint); a user branch's kernel goes through a zeroed temporary.
  void squeeze_into(Tensor<S>& w) const override {
    const auto shape = this->geometry().weight_shape();
    w.reset(shape);
    const std::int64_t O = shape[0], per_o = w.numel() / O;
    for (std::size_t r = 0; r < branches_.size(); ++r) {
      const S* v = vector_.value.data() + std::int64_t(r) * O;
      if (auto* fast = dynamic_cast<const branches::ScaledAdjoint<S>*>(branches_[r].get())) {
        fast->add_scaled_kernel(w, v);
        continue;
      }
      kernel_.reset(shape);
      branches_[r]->kernel(kernel_);
      for (std::int64_t o = 0; o < O; ++o) {
        S* dst = w.data() + o * per_o;
        const S* src = kernel_.data() + o * per_o;
        for (std::int64_t j = 0; j < per_o; ++j) dst[j] += v[o] * src[j];
      }
    }
  }

  /// dv[r][o] += <dW[o], K_r[o]>, and branch r's adjoint of v[r][o] * dW[o]. Costs a few
  /// kernel-sized products, independent of batch and image size. The library's branches
  /// (branches::ScaledAdjoint) do both in one pass without forming K_r again; a user
  /// branch gets its kernel recomputed for dv and the scaled gradient for its adjoint.
  void squeeze_backward(const Tensor<S>& grad_w) override {
    const auto shape = this->geometry().weight_shape();
    grad_w.expect_shape(shape, this->type_name() + "::squeeze_backward grad_weight");
    const std::int64_t O = shape[0], per_o = grad_w.numel() / O;
    for (std::size_t r = 0; r < branches_.size(); ++r) {
      const S* v = vector_.value.data() + std::int64_t(r) * O;
      S* dv = vector_.grad.data() + std::int64_t(r) * O;
      if (auto* fast = dynamic_cast<branches::ScaledAdjoint<S>*>(branches_[r].get())) {
        fast->scaled_kernel_backward(grad_w, v, dv);
        continue;
      }
      kernel_.reset(shape);
      branches_[r]->kernel(kernel_);
      grad_kernel_.resize(shape);
      for (std::int64_t o = 0; o < O; ++o) {
        const S* gw = grad_w.data() + o * per_o;
        const S* k = kernel_.data() + o * per_o;
        S* d = grad_kernel_.data() + o * per_o;
        S acc = 0;
        for (std::int64_t j = 0; j < per_o; ++j) {
          acc += gw[j] * k[j];
          d[j] = v[o] * gw[j];
        }
        dv[o] += acc;
      }
      branches_[r]->kernel_backward(grad_kernel_);
    }
  }

  /// The branches' tensors in branch order, then `vector`.
  ParamList<S> kernel_parameters() override {
    ParamList<S> all;
    for (auto& b : branches_)
      for (auto* p : b->params()) all.push_back(p);
    all.push_back(&vector_);
    return all;
  }

 private:
  BranchList<S> branches_;
  Param<S> vector_;
  mutable Tensor<S> kernel_, grad_kernel_;  // one branch kernel at a time (squeeze scratch)
};

}  // namespace orepa
