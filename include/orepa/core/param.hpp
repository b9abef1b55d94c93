#pragma once
/// @file param.hpp
/// Param<S>: a named tensor of a block (a trainable parameter with its gradient, or a
/// buffer without one), named exactly as in the PyTorch reference state dict.

#include <string>
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

/// A named tensor. Trainable ones carry `grad` of the same shape, accumulated by
/// backward until zeroed (PyTorch semantics); buffers have an empty `grad`.
template <class S>
struct Param {
  std::string name;
  Tensor<S> value;
  Tensor<S> grad;
  ParamKind kind = ParamKind::kernel;

  Param() = default;
  Param(std::string n, Tensor<S> v, ParamKind k = ParamKind::kernel)
      : name(std::move(n)), value(std::move(v)), kind(k) {
    if (kind != ParamKind::buffer) grad = Tensor<S>(value.shape());
  }
  bool trainable() const { return kind != ParamKind::buffer; }
  void zero_grad() { grad.zero(); }
};

/// Non-owning list of a block's named tensors, in state-dict order.
template <class S>
using ParamList = std::vector<Param<S>*>;

}  // namespace orepa
