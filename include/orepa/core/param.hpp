#pragma once
/// @file param.hpp
/// `Param<S>`: a tensor of a block, either a trainable parameter with its gradient or a
/// buffer without one (running statistics, fixed priors, identity tensors). A Param has
/// no name of its own: the block that owns it names it when it lists its tensors
/// (`named_parameters()`, `named_buffers()`), with the reference state-dict names, as
/// PyTorch modules do.

#include <string>
#include <utility>
#include <vector>

#include "orepa/core/tensor.hpp"

namespace orepa {

/// What a tensor is for; optimizers use it to form parameter groups (for instance no
/// weight decay on scaling vectors and BN parameters).
enum class ParamKind {
  kernel,  ///< a convolution or linear weight
  scale,   ///< an OREPA branch-scaling `vector`
  norm,    ///< BN weight / bias
  bias,    ///< a linear layer bias
  buffer,  ///< not trained: running statistics, fixed priors, identity tensors
};

/// A block's tensor. Trainable ones carry `grad` of the same shape, accumulated by
/// backward until zeroed (PyTorch semantics); buffers have an empty `grad`.
template <class S>
struct Param {
  Tensor<S> value;                     ///< The tensor itself.
  Tensor<S> grad;                      ///< dL/dvalue, same shape as `value`; empty for a buffer.
  ParamKind kind = ParamKind::kernel;  ///< What the tensor is for (buffer = not trained).

  /// An empty kernel parameter.
  Param() = default;
  /// Takes value `v` and kind `k`; unless `k` is ParamKind::buffer, `grad` is allocated
  /// with `v`'s shape (zero-filled).
  explicit Param(Tensor<S> v, ParamKind k = ParamKind::kernel) : value(std::move(v)), kind(k) {
    if (kind != ParamKind::buffer) grad = Tensor<S>(value.sizes());
  }
  /// True unless this is a buffer.
  bool trainable() const { return kind != ParamKind::buffer; }
  /// Sets every element of `grad` to 0 (a no-op on a buffer's empty grad).
  void zero_grad() { grad.zero(); }
};

/// Non-owning list of tensors, in state-dict order.
template <class S>
using ParamList = std::vector<Param<S>*>;

/// Tensors with their state-dict names, in state-dict order.
template <class S>
using NamedParams = std::vector<std::pair<std::string, Param<S>*>>;

}  // namespace orepa
