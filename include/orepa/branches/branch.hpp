#pragma once
/// @file branch.hpp
/// `Branch<S>`: the extension point of the online blocks. A branch is a *linear* map K
/// from its own parameters to a full [O, I/g, k, k] kernel; the block scales output
/// channel o of it by v[o], its row of `vector`. A branch implements that scaled map and
/// its adjoint, one virtual pair:
///
///   - add_scaled_kernel:     W[o] += v[o] * K[o]                              (squeeze)
///   - scaled_kernel_backward: grads += K^T(v[o] * dW[o]),  dv[o] += <dW[o], K[o]>  (its adjoint)
///
/// Branches are pure algebra: they know core/ only. The one dense product they may need
/// comes in as a GemmFn (the block passes oneDNN's matmul for float). A branch of your own
/// usually derives from SimpleBranch instead and writes its unscaled kernel and that
/// kernel's adjoint; the scaled pair is derived (see examples/custom_block.cpp).

#include <memory>
#include <string>
#include <typeinfo>
#include <vector>

#include "orepa/core/conv_geometry.hpp"
#include "orepa/core/gemm.hpp"
#include "orepa/core/param.hpp"
#include "orepa/core/random.hpp"

namespace orepa {

/// One linear branch of an online re-parameterised block.
template <class S>
class Branch {
 public:
  virtual ~Branch() = default;
  /// w[o] += v[o] * K[o] for every output channel o; w is [O, I/g, k, k], v holds O values.
  virtual void add_scaled_kernel(TensorView<S> w, const S* v, GemmFn<S> gemm) const = 0;
  /// The adjoint of add_scaled_kernel for dL/dW = `grad_w` [O, I/g, k, k]: accumulates
  /// (+=) K^T applied to v[o] * grad_w[o] into this branch's parameter gradients, and
  /// adds <grad_w[o], K[o]> to dv[o].
  virtual void scaled_kernel_backward(ConstTensorView<S> grad_w, const S* v, S* dv, GemmFn<S> gemm) = 0;
  /// Appends this branch's tensors (parameters and buffers) under `prefix` + their names.
  virtual void collect_tensors(NamedParams<S>& out, const std::string& prefix) = 0;
  /// The initial value of this branch's row of the block's `vector`.
  virtual double initial_scale() const = 0;
  /// Multiplies this branch's kernel K by `gain` through its parameters (an initialisation
  /// choice, yolo::norm_matched_init). The default scales every trainable tensor, exact
  /// for a branch linear in its parameters; a branch whose kernel is a product of
  /// parameters overrides it to scale one factor.
  virtual void scale_kernel(S gain) {
    NamedParams<S> named;
    collect_tensors(named, "");
    for (auto& [name, p] : named)
      if (p->trainable()) scale_values(*p, gain);
  }
  /// A deep copy (what a block's clone() copies its branches with). A branch of your own
  /// overrides it to be cloneable, usually as `return std::make_unique<MyBranch>(*this);`;
  /// without that, cloning a block that holds it throws config_error.
  virtual std::unique_ptr<Branch> clone() const {
    throw config_error(detail::cat("Branch::clone: ", readable_type_name(typeid(*this)),
                                   " does not override clone(), so a block holding it cannot be cloned"));
  }
};

/// p.value *= gain, element-wise.
template <class S>
void scale_values(Param<S>& p, S gain) {
  for (std::int64_t j = 0; j < p.value.numel(); ++j) p.value[j] *= gain;
}

/// Deep copies of every branch of `list` (Branch::clone()).
template <class S>
std::vector<std::unique_ptr<Branch<S>>> clone_branches(const std::vector<std::unique_ptr<Branch<S>>>& list) {
  std::vector<std::unique_ptr<Branch<S>>> copy;
  for (const auto& b : list) copy.push_back(b->clone());
  return copy;
}

/// A list of branches, in the row order of the block's `vector`.
template <class S>
using BranchList = std::vector<std::unique_ptr<Branch<S>>>;

/// A branch given by its unscaled kernel and that kernel's adjoint; the scaled pair of
/// Branch is derived from them (at the cost of forming the kernel once per call).
template <class S>
class SimpleBranch : public Branch<S> {
 public:
  /// Writes the unscaled kernel of this branch into `out` [O, I/g, k, k] (zeroed by the caller).
  virtual void kernel(TensorView<S> out) const = 0;
  /// Adjoint of kernel(): accumulates (+=) into this branch's parameter gradients the
  /// contribution of dL/dK = `grad_kernel` [O, I/g, k, k].
  virtual void kernel_backward(ConstTensorView<S> grad_kernel) = 0;

  /// w[o] += v[o] * K[o], with K from kernel().
  void add_scaled_kernel(TensorView<S> w, const S* v, GemmFn<S>) const final {
    kernel_.reset(w.sizes());
    kernel(kernel_);
    const std::int64_t O = w.size(0), per = w.numel() / O;
    for (std::int64_t o = 0; o < O; ++o)
      for (std::int64_t j = o * per; j < (o + 1) * per; ++j) w[j] += v[o] * kernel_[j];
  }
  /// dv[o] += <dW[o], K[o]> with K from kernel(), and kernel_backward(v[o] * dW[o]).
  void scaled_kernel_backward(ConstTensorView<S> grad_w, const S* v, S* dv, GemmFn<S>) final {
    kernel_.reset(grad_w.sizes());
    kernel(kernel_);
    scaled_.resize(grad_w.sizes());
    const std::int64_t O = grad_w.size(0), per = grad_w.numel() / O;
    for (std::int64_t o = 0; o < O; ++o) {
      S acc = 0;
      for (std::int64_t j = o * per; j < (o + 1) * per; ++j) {
        acc += grad_w[j] * kernel_[j];
        scaled_[j] = v[o] * grad_w[j];
      }
      dv[o] += acc;
    }
    kernel_backward(scaled_);
  }

 private:
  mutable Tensor<S> kernel_;  // scratch: the unscaled kernel
  Tensor<S> scaled_;          // scratch: v-scaled kernel gradient
};

/// The unscaled kernel [O, I/g, k, k] of branch `b` for geometry `g` (every scale 1):
/// for inspection and tests.
template <class S>
Tensor<S> branch_kernel(const Branch<S>& b, const ConvGeometry& g) {
  Tensor<S> w(g.weight_shape());
  const std::vector<S> ones(std::size_t(g.out_channels), S(1));
  b.add_scaled_kernel(w, ones.data(), &eigen_gemm<S>);
  return w;
}

}  // namespace orepa
