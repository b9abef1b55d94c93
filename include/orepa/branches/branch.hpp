#pragma once
/// @file branch.hpp
/// `Branch<S>`: the extension point of the online blocks. A branch is a *linear* map from
/// its own parameters to a full [O, I/g, k, k] kernel (unscaled; the block multiplies
/// output channel o by its row of `vector`), together with the adjoint of that map,
/// which pushes a kernel gradient back into the branch's parameter gradients.
///
/// To add a branch of your own, derive from `Branch<S>`, hold your tensors as `Param<S>`
/// members and implement the four virtual functions; pass it to OnlineBlock with the
/// library's branches (see examples/custom_block.cpp).

#include <memory>
#include <string>

#include "orepa/core/conv_geometry.hpp"
#include "orepa/core/param.hpp"
#include "orepa/core/random.hpp"

namespace orepa {

/// One linear branch of an online re-parameterised block.
template <class S>
class Branch {
 public:
  virtual ~Branch() = default;
  /// Writes the unscaled kernel of this branch into `out`, shaped [O, I/g, k, k]
  /// (already sized and zeroed by the caller).
  virtual void kernel(Tensor<S>& out) const = 0;
  /// Adjoint of kernel(): accumulates (+=) into the gradients of this branch's
  /// parameters the contribution of dL/dK, `grad_kernel` shaped [O, I/g, k, k].
  virtual void kernel_backward(const Tensor<S>& grad_kernel) = 0;
  /// This branch's tensors (parameters and buffers), names as in the state dict.
  virtual ParamList<S> params() = 0;
  /// The initial value of this branch's row of the block's `vector`.
  virtual double initial_scale() const = 0;

  /// Const access to the tensors (same list as params()).
  std::vector<const Param<S>*> params() const {
    auto list = const_cast<Branch*>(this)->params();
    return {list.begin(), list.end()};
  }
};

/// A list of branches, in the row order of the block's `vector`.
template <class S>
using BranchList = std::vector<std::unique_ptr<Branch<S>>>;

}  // namespace orepa
