#pragma once
/// @file any_deployed.hpp
/// `AnyDeployed<S>`: any deployed object (a DeployedConv, a deployed YOLO module, an
/// InferenceChain, ...) behind one type: `Tensor<S> forward(ConstTensorView<S>) const`.
/// Copies share the same immutable object, so an AnyDeployed is cheap to copy and, like
/// the objects it holds, safe to call from several threads.
///
/// The deployed convolutions inside a held object are reachable by name (visit_convs)
/// and replaceable (map_convs) when the object offers those members, as DeployedConv,
/// InferenceChain and the deployed YOLO modules do: the names are the tensor-name
/// prefixes of the training-time network ("3.", "2.cv1.", "2.m.0.cv2."), which is how a
/// Calibration addresses layers.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>

#include "orepa/core/tensor.hpp"

namespace orepa {

template <class S>
class DeployedConv;
template <class S>
class AnyDeployed;
/// Called with each deployed convolution's name and the convolution.
template <class S>
using ConvVisitor = std::function<void(const std::string&, const DeployedConv<S>&)>;
/// Gives the replacement of a deployed convolution, from its name and itself.
template <class S>
using ConvMapper = std::function<AnyDeployed<S>(const std::string&, const DeployedConv<S>&)>;

/// A type-erased deployed module.
template <class S>
class AnyDeployed {
 public:
  /// Holds `d` (moved in); D needs `Tensor<S> forward(ConstTensorView<S>) const`.
  template <class D, class = std::enable_if_t<!std::is_same_v<std::decay_t<D>, AnyDeployed>>>
  AnyDeployed(D d) : impl_(std::make_shared<const Model<D>>(std::move(d))) {}  // NOLINT: implicit on purpose

  /// Runs the held object.
  Tensor<S> forward(ConstTensorView<S> x) const { return impl_->forward(x); }
  /// The held object's num_parameters() (weights and biases it holds), 0 if it has none.
  std::int64_t num_parameters() const { return impl_->num_parameters(); }
  /// The memory format the held object prefers for input shape `x_shape`: its
  /// preferred_format() if it has one (DeployedConv and the modules built of them), else
  /// contiguous.
  MemoryFormat preferred_format(const Shape& x_shape) const { return impl_->preferred_format(x_shape); }
  /// True when the held object takes 4-D inputs in every memory format: objects that
  /// declare a preferred_format() do; any other is given contiguous (NCHW) tensors only.
  bool takes_any_format() const { return impl_->takes_any_format(); }
  /// Calls `f` on every deployed convolution inside, named `prefix` + its path.
  void visit_convs(const std::string& prefix, const ConvVisitor<S>& f) const { impl_->visit_convs(prefix, f); }
  /// A copy in which every deployed convolution inside is replaced by f(name, conv);
  /// an object without convolutions (or without map_convs) is returned as is.
  AnyDeployed map_convs(const std::string& prefix, const ConvMapper<S>& f) const {
    if (auto m = impl_->map_convs(prefix, f)) return *m;
    return *this;
  }
  /// The held object as a `D`, or nullptr when it is of another type.
  template <class D>
  const D* target() const {
    auto* m = dynamic_cast<const Model<D>*>(impl_.get());
    return m ? &m->d : nullptr;
  }

 private:
  template <class D, class = void>
  struct has_count : std::false_type {};
  template <class D>
  struct has_count<D, std::void_t<decltype(std::declval<const D&>().num_parameters())>> : std::true_type {};
  template <class D, class = void>
  struct has_format : std::false_type {};
  template <class D>
  struct has_format<D, std::void_t<decltype(std::declval<const D&>().preferred_format(Shape()))>> : std::true_type {};
  template <class D, class = void>
  struct has_convs : std::false_type {};
  template <class D>
  struct has_convs<D, std::void_t<decltype(std::declval<const D&>().map_convs(std::string(), ConvMapper<S>()))>>
      : std::true_type {};
  struct Concept {
    virtual ~Concept() = default;
    virtual Tensor<S> forward(ConstTensorView<S> x) const = 0;
    virtual std::int64_t num_parameters() const = 0;
    virtual MemoryFormat preferred_format(const Shape& x_shape) const = 0;
    virtual bool takes_any_format() const = 0;
    virtual void visit_convs(const std::string& prefix, const ConvVisitor<S>& f) const = 0;
    virtual std::unique_ptr<AnyDeployed> map_convs(const std::string& prefix, const ConvMapper<S>& f) const = 0;
  };
  template <class D>
  struct Model final : Concept {
    explicit Model(D x) : d(std::move(x)) {}
    Tensor<S> forward(ConstTensorView<S> x) const override { return Tensor<S>(d.forward(x)); }
    std::int64_t num_parameters() const override {
      if constexpr (has_count<D>::value) return d.num_parameters();
      else return 0;
    }
    MemoryFormat preferred_format(const Shape& x_shape) const override {
      if constexpr (has_format<D>::value) return d.preferred_format(x_shape);
      else return MemoryFormat::contiguous;
    }
    bool takes_any_format() const override { return has_format<D>::value; }
    void visit_convs(const std::string& prefix, const ConvVisitor<S>& f) const override {
      if constexpr (has_convs<D>::value) d.visit_convs(prefix, f);
    }
    std::unique_ptr<AnyDeployed> map_convs(const std::string& prefix, const ConvMapper<S>& f) const override {
      if constexpr (has_convs<D>::value) return std::make_unique<AnyDeployed>(d.map_convs(prefix, f));
      else return nullptr;
    }
    D d;
  };
  std::shared_ptr<const Concept> impl_;
};

}  // namespace orepa
