#pragma once
/// @file activation.hpp
/// Element-wise activations: Identity, ReLU, SiLU (x * sigmoid(x), YOLOv5/v8's default),
/// Sigmoid, or any user functor with the same three members. A block is templated on one.
///
/// An activation type provides
///   - `template <class S> S operator()(S x) const` - the value;
///   - `template <class S> S derivative(S x) const` - d act / d x at the pre-activation x;
///   - `static constexpr ActivationKind kind` - lets deploy fuse the three built-ins into
///     oneDNN; user functors use ActivationKind::custom and are applied after the conv.

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>

#include "orepa/core/error.hpp"

namespace orepa {

/// Which built-in activation a type is (custom = a user functor).
enum class ActivationKind { identity, relu, silu, sigmoid, custom };

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

/// y = 1 / (1 + exp(-x)) (PyTorch torch.sigmoid, oneDNN eltwise_logistic): what a YOLO
/// Detect head applies to its outputs.
struct Sigmoid {
  /// Built-in: deploy fuses it as oneDNN eltwise_logistic.
  static constexpr ActivationKind kind = ActivationKind::sigmoid;
  /// Its printed name.
  static constexpr const char* name = "sigmoid";
  /// 1 / (1 + exp(-x)).
  template <class S> S operator()(S x) const { return S(1) / (S(1) + std::exp(-x)); }
  /// sigmoid(x) (1 - sigmoid(x)).
  template <class S> S derivative(S x) const {
    const S s = (*this)(x);
    return s * (S(1) - s);
  }
};

/// An activation chosen at run time, what a deployed convolution applies: one of the
/// built-ins (fused into oneDNN by the deployed conv) or any user functor, type-erased.
/// Built from an activation object: `AnyActivation<float>(SiLU{})`.
template <class S>
class AnyActivation {
 public:
  /// The identity.
  AnyActivation() = default;
  /// The activation `act` (an Identity, ReLU, SiLU, Sigmoid or user functor object).
  template <class Act, class = decltype(Act::kind)>
  AnyActivation(const Act& act) : kind_(Act::kind) {  // NOLINT: implicit on purpose
    if constexpr (Act::kind == ActivationKind::custom) custom_ = [act](S x) { return act(x); };
  }
  /// The built-in kind, or custom.
  ActivationKind kind() const { return kind_; }
  /// The activation of `x`.
  S operator()(S x) const {
    switch (kind_) {
      case ActivationKind::identity: return x;
      case ActivationKind::relu: return ReLU{}(x);
      case ActivationKind::silu: return SiLU{}(x);
      case ActivationKind::sigmoid: return Sigmoid{}(x);
      case ActivationKind::custom: return custom_(x);
    }
    return x;
  }
  /// Applies the activation to `n` values in place.
  void apply(S* y, std::int64_t n) const {
    if (kind_ == ActivationKind::identity) return;
    for (std::int64_t j = 0; j < n; ++j) y[j] = (*this)(y[j]);
  }

 private:
  ActivationKind kind_ = ActivationKind::identity;
  std::function<S(S)> custom_;
};

/// Parses "identity" / "relu" / "silu" (PyTorch/YOLO names; "linear" and "swish" too).
inline ActivationKind parse_activation(const std::string& s) {
  if (s == "identity" || s == "linear" || s == "none") return ActivationKind::identity;
  if (s == "relu") return ActivationKind::relu;
  if (s == "silu" || s == "swish") return ActivationKind::silu;
  throw config_error("activation: expected identity, relu or silu, got '" + s + "'");
}

}  // namespace orepa
