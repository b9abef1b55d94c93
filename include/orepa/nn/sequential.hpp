#pragma once
/// @file sequential.hpp
/// `Sequential<S>`: a chain of layers of different types (blocks, pooling, linear heads,
/// your own), each stored by value behind a small virtual interface, and its deployed
/// counterpart `InferenceChain<S>`.
///
///   Sequential<float> net;
///   net.add(OREPA<float, ReLU>(OrepaOptions(3, 16, 3)));
///   net.add(GlobalAvgPool<float>());
///   net.add(Linear<float>(16, 10));
///   const auto& logits = net.forward_train(x);   // ... loss, net.backward(dlogits)
///   InferenceChain<float> infer = net.deploy();  // blocks -> DeployedConv
///
/// A layer is any object with the block member set: forward_train, forward_eval,
/// backward, parameters, zero_grad (see is_layer). Layers that also have deploy() are
/// replaced by what it returns in the inference chain.

#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/param.hpp"
#include "orepa/core/tensor.hpp"

namespace orepa {

/// True when `T` has the layer member set for scalar `S` (blocks, GlobalAvgPool, Linear,
/// Sequential, user types):
///   `const Tensor<S>& forward_train(const Tensor<S>&)`;  `Tensor<S> forward_eval(const Tensor<S>&) const`;
///   `const Tensor<S>& backward(const Tensor<S>&)`;  `ParamList<S> parameters()`;  `void zero_grad()`.
template <class S, class T, class = void>
struct is_layer : std::false_type {};
template <class S, class T>
struct is_layer<
    S, T,
    std::void_t<decltype(static_cast<const Tensor<S>&>(std::declval<T&>().forward_train(std::declval<const Tensor<S>&>()))),
                decltype(Tensor<S>(std::declval<const T&>().forward_eval(std::declval<const Tensor<S>&>()))),
                decltype(static_cast<const Tensor<S>&>(std::declval<T&>().backward(std::declval<const Tensor<S>&>()))),
                decltype(ParamList<S>(std::declval<T&>().parameters())), decltype(std::declval<T&>().zero_grad())>>
    : std::true_type {};

/// True when a const `T` has deploy() returning an object `d` with
/// `Tensor<S> d.forward(const Tensor<S>&) const` (the blocks: DeployedConv).
template <class S, class T, class = void>
struct has_deploy : std::false_type {};
template <class S, class T>
struct has_deploy<S, T,
                  std::void_t<decltype(Tensor<S>(std::declval<const decltype(std::declval<const T&>().deploy())&>().forward(
                      std::declval<const Tensor<S>&>())))>> : std::true_type {};

/// One inference step: deployed layer or eval forward, x -> y.
template <class S>
using InferenceStage = std::function<Tensor<S>(const Tensor<S>&)>;

/// The type-erased interface Sequential stores its layers behind (implemented by
/// LayerAdapter; user code normally never derives from it).
template <class S>
class Layer {
 public:
  virtual ~Layer() = default;
  /// Training forward; the result is the layer's buffer, valid until its next call.
  virtual const Tensor<S>& forward_train(const Tensor<S>& x) = 0;
  /// Eval forward, no state change.
  virtual Tensor<S> forward_eval(const Tensor<S>& x) const = 0;
  /// Backward of the last forward_train: accumulates parameter gradients, returns dL/dx.
  virtual const Tensor<S>& backward(const Tensor<S>& grad_out) = 0;
  /// The layer's tensors (parameters and buffers).
  virtual ParamList<S> parameters() = 0;
  /// Zeroes every gradient of the layer.
  virtual void zero_grad() = 0;
  /// True when the layer has deploy() (its inference stage is the deployed object).
  virtual bool deployable() const = 0;
  /// The inference stage of this layer (see LayerAdapter::inference_stage).
  virtual InferenceStage<S> inference_stage() const = 0;
  /// typeid of the wrapped object (for error messages of Sequential::get).
  virtual const std::type_info& type() const = 0;
};

/// Holds a layer object `T` by value and forwards the `Layer<S>` interface to it.
template <class S, class T>
class LayerAdapter final : public Layer<S> {
  static_assert(is_layer<S, T>::value,
                "LayerAdapter<S, T>: T needs forward_train, forward_eval (const), backward, parameters and "
                "zero_grad with Tensor<S> arguments (see orepa::is_layer)");

 public:
  /// Takes `obj` over (moved in).
  explicit LayerAdapter(T obj) : obj_(std::move(obj)) {}
  /// The wrapped object.
  T& get() { return obj_; }
  /// The wrapped object, read-only.
  const T& get() const { return obj_; }

  // The Layer<S> interface, forwarded to the object.

  const Tensor<S>& forward_train(const Tensor<S>& x) override { return obj_.forward_train(x); }
  Tensor<S> forward_eval(const Tensor<S>& x) const override { return obj_.forward_eval(x); }
  const Tensor<S>& backward(const Tensor<S>& grad_out) override { return obj_.backward(grad_out); }
  ParamList<S> parameters() override { return obj_.parameters(); }
  void zero_grad() override { obj_.zero_grad(); }
  bool deployable() const override { return has_deploy<S, T>::value; }
  const std::type_info& type() const override { return typeid(T); }

  /// With deploy(): the deployed object (a snapshot of the current weights). Otherwise a
  /// snapshot copy of the layer running forward_eval when T is copyable, else a call of
  /// this adapter's forward_eval (which then must outlive the stage).
  InferenceStage<S> inference_stage() const override {
    if constexpr (has_deploy<S, T>::value) {
      // shared_ptr: std::function needs a copyable callable; deployed objects may be move-only.
      auto d = std::make_shared<const std::decay_t<decltype(obj_.deploy())>>(obj_.deploy());
      return [d](const Tensor<S>& x) { return Tensor<S>(d->forward(x)); };
    } else if constexpr (std::is_copy_constructible_v<T>) {
      auto copy = std::make_shared<const T>(obj_);
      return [copy](const Tensor<S>& x) { return copy->forward_eval(x); };
    } else {
      return [this](const Tensor<S>& x) { return obj_.forward_eval(x); };
    }
  }

 private:
  T obj_;
};

/// The deployed form of a Sequential: one stage per layer, blocks replaced by their
/// deployed convolution, other layers running forward_eval. Independent of the
/// Sequential's later training (stages are snapshots), except for layers that neither
/// deploy nor copy (see LayerAdapter::inference_stage).
template <class S>
class InferenceChain {
 public:
  InferenceChain() = default;
  /// Appends a stage; `deployed` records whether it came from deploy().
  void add(InferenceStage<S> stage, bool deployed = false) {
    stages_.push_back(std::move(stage));
    deployed_.push_back(deployed);
  }
  /// Runs every stage in order. Safe from several threads when every stage is (the
  /// deployed convolutions and the library's layers are).
  Tensor<S> forward(const Tensor<S>& x) const {
    if (stages_.empty()) return x;
    Tensor<S> y = stages_.front()(x);
    for (std::size_t i = 1; i < stages_.size(); ++i) y = stages_[i](y);
    return y;
  }
  /// Number of stages (one per layer of the Sequential).
  std::size_t size() const { return stages_.size(); }
  /// Whether stage `i` is a deployed object (true) or an eval forward (false).
  bool deployed(std::size_t i) const { return deployed_.at(i); }

 private:
  std::vector<InferenceStage<S>> stages_;
  std::vector<bool> deployed_;
};

/// A chain of layers run in order; itself a layer (so chains nest) with deploy().
template <class S>
class Sequential {
 public:
  /// An empty chain (forward and backward throw state_error until a layer is added).
  Sequential() = default;
  /// Move constructor (a Sequential owns its layers and is not copyable).
  Sequential(Sequential&&) noexcept = default;
  /// Move assignment; the previous layers are destroyed.
  Sequential& operator=(Sequential&&) noexcept = default;

  /// Appends `layer` (moved or copied in) and returns a reference to the stored object.
  template <class T>
  std::decay_t<T>& add(T&& layer) {
    using L = std::decay_t<T>;
    static_assert(is_layer<S, L>::value,
                  "Sequential<S>::add: the layer needs forward_train, forward_eval (const), backward, parameters "
                  "and zero_grad with Tensor<S> arguments (see orepa::is_layer); check the scalar type too");
    auto adapter = std::make_unique<LayerAdapter<S, L>>(L(std::forward<T>(layer)));
    L& ref = adapter->get();
    layers_.push_back(std::move(adapter));
    return ref;
  }

  /// Number of layers.
  std::size_t size() const { return layers_.size(); }
  /// True when no layer has been added.
  bool empty() const { return layers_.empty(); }
  /// The type-erased layer `i` (throws config_error when out of range).
  Layer<S>& layer(std::size_t i) { return *layers_[checked(i, "layer")]; }
  /// The type-erased layer `i`, read-only (throws config_error when out of range).
  const Layer<S>& layer(std::size_t i) const { return *layers_[checked(i, "layer")]; }

  /// Layer `i` as its stored type `T`; throws config_error when out of range or of
  /// another type.
  template <class T>
  T& get(std::size_t i) {
    return const_cast<T&>(static_cast<const Sequential&>(*this).template get<T>(i));
  }
  /// Layer `i` as its stored type `T`, read-only; throws config_error when out of range
  /// or of another type.
  template <class T>
  const T& get(std::size_t i) const {
    const Layer<S>& l = *layers_[checked(i, "get")];
    if (auto* a = dynamic_cast<const LayerAdapter<S, T>*>(&l)) return a->get();
    throw config_error(detail::cat("Sequential::get: layer ", i, " holds a ", l.type().name(), ", not a ",
                                   typeid(T).name()));
  }

  /// Training forward through every layer; returns the last layer's output buffer.
  const Tensor<S>& forward_train(const Tensor<S>& x) {
    require_layers("forward_train");
    const Tensor<S>* y = &x;
    for (auto& l : layers_) y = &l->forward_train(*y);
    return *y;
  }
  /// Eval forward through every layer (no state change).
  Tensor<S> forward_eval(const Tensor<S>& x) const {
    require_layers("forward_eval");
    Tensor<S> y = layers_.front()->forward_eval(x);
    for (std::size_t i = 1; i < layers_.size(); ++i) y = layers_[i]->forward_eval(y);
    return y;
  }
  /// Backward through every layer in reverse; accumulates parameter gradients and
  /// returns dL/dx of the first layer.
  const Tensor<S>& backward(const Tensor<S>& grad_out) {
    require_layers("backward");
    const Tensor<S>* g = &grad_out;
    for (auto it = layers_.rbegin(); it != layers_.rend(); ++it) g = &(*it)->backward(*g);
    return *g;
  }

  /// Every layer's tensors in layer order (unprefixed: the pointers are the layers' own
  /// Param objects, whose names stay those of their layer; see named_parameters()).
  ParamList<S> parameters() {
    ParamList<S> all;
    for (auto& l : layers_)
      for (auto* p : l->parameters()) all.push_back(p);
    return all;
  }
  /// Every tensor with its name prefixed by the layer index, as PyTorch's nn.Sequential
  /// state dict: "0.weight_orepa_origin", ..., "2.weight", "2.bias".
  std::vector<std::pair<std::string, Param<S>*>> named_parameters() {
    std::vector<std::pair<std::string, Param<S>*>> all;
    for (std::size_t i = 0; i < layers_.size(); ++i)
      for (auto* p : layers_[i]->parameters()) all.emplace_back(std::to_string(i) + "." + p->name, p);
    return all;
  }
  /// The tensor with prefixed name `name` ("0.vector"); throws config_error if absent.
  Param<S>& param(const std::string& name) {
    for (auto& [n, p] : named_parameters())
      if (n == name) return *p;
    throw config_error("Sequential: no tensor named '" + name + "'");
  }
  /// Zeroes every gradient of every layer.
  void zero_grad() {
    for (auto& l : layers_) l->zero_grad();
  }

  /// The inference chain: layers with deploy() replaced by their deployed object, the
  /// others running forward_eval (see LayerAdapter::inference_stage).
  InferenceChain<S> deploy() const {
    InferenceChain<S> chain;
    for (auto& l : layers_) chain.add(l->inference_stage(), l->deployable());
    return chain;
  }

 private:
  std::size_t checked(std::size_t i, const char* who) const {
    if (i >= layers_.size())
      throw config_error(detail::cat("Sequential::", who, ": index ", i, " out of range (", layers_.size(), " layers)"));
    return i;
  }
  void require_layers(const char* who) const {
    if (layers_.empty()) throw state_error(detail::cat("Sequential::", who, ": the chain has no layers"));
  }

  std::vector<std::unique_ptr<Layer<S>>> layers_;
};

}  // namespace orepa
