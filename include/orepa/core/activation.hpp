#pragma once
/// @file activation.hpp
/// Element-wise activations: Identity, ReLU, SiLU (x * sigmoid(x), YOLOv5/v8's default),
/// or any user functor with the same three members. A block is templated on one.
///
/// An activation type provides
///   - `template <class S> S operator()(S x) const` - the value;
///   - `template <class S> S derivative(S x) const` - d act / d x at the pre-activation x;
///   - `static constexpr ActivationKind kind` - lets deploy fuse the three built-ins into
///     oneDNN; user functors use ActivationKind::custom and are applied after the conv.

#include <cmath>
#include <string>

#include "orepa/core/error.hpp"

namespace orepa {

/// Which built-in activation a type is (custom = a user functor).
enum class ActivationKind { identity, relu, silu, custom };

/// y = x.
struct Identity {
  /// Built-in: deploy adds no post-op.
  static constexpr ActivationKind kind = ActivationKind::identity;
  /// Name accepted by parse_activation().
  static constexpr const char* name = "identity";
  /// Returns `x` unchanged.
  template <class S> S operator()(S x) const { return x; }
  /// Always 1.
  template <class S> S derivative(S) const { return S(1); }
};

/// y = max(x, 0); derivative 0 at x <= 0 as in PyTorch.
struct ReLU {
  /// Built-in: deploy fuses it as oneDNN eltwise_relu.
  static constexpr ActivationKind kind = ActivationKind::relu;
  /// Name accepted by parse_activation().
  static constexpr const char* name = "relu";
  /// max(x, 0).
  template <class S> S operator()(S x) const { return x > S(0) ? x : S(0); }
  /// 1 for x > 0, else 0.
  template <class S> S derivative(S x) const { return x > S(0) ? S(1) : S(0); }
};

/// y = x * sigmoid(x) (PyTorch nn.SiLU, oneDNN eltwise_swish with alpha 1).
struct SiLU {
  /// Built-in: deploy fuses it as oneDNN eltwise_swish (alpha 1).
  static constexpr ActivationKind kind = ActivationKind::silu;
  /// Name accepted by parse_activation().
  static constexpr const char* name = "silu";
  /// x * sigmoid(x), computed as x / (1 + exp(-x)).
  template <class S> S operator()(S x) const { return x / (S(1) + std::exp(-x)); }
  /// sigmoid(x) * (1 + x * (1 - sigmoid(x))).
  template <class S> S derivative(S x) const {
    S s = S(1) / (S(1) + std::exp(-x));
    return s * (S(1) + x * (S(1) - s));
  }
};

/// Parses "identity" / "relu" / "silu" (PyTorch/YOLO names; "linear" and "swish" too).
inline ActivationKind parse_activation(const std::string& s) {
  if (s == "identity" || s == "linear" || s == "none") return ActivationKind::identity;
  if (s == "relu") return ActivationKind::relu;
  if (s == "silu" || s == "swish") return ActivationKind::silu;
  throw config_error("activation: expected identity, relu or silu, got '" + s + "'");
}

}  // namespace orepa
