#pragma once
/// @file sequential.hpp
/// `Sequential<S>`: a chain of blocks and layers of different types, each held as an
/// AnyBlock, and its deployed counterpart `InferenceChain<S>`.
///
///   Sequential<float> net;
///   net.add(OREPA<float, ReLU>(OrepaOptions(3, 16, 3)));
///   net.add(GlobalAvgPool<float>());
///   net.add(Linear<float>(16, 10));
///   const auto& logits = net.forward_train(x);   // ... loss, net.backward(dlogits)
///   InferenceChain<float> infer = net.deploy();  // blocks -> DeployedConv
///
/// Anything with the layer members of blocks/block.hpp goes in (blocks, GlobalAvgPool,
/// Linear, the YOLO modules, Sequential itself, user types). Tensor names are the layer
/// index then the layer's own name ("0.weight_orepa_origin", "2.weight"), as PyTorch's
/// nn.Sequential state dict.

#include <deque>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "orepa/blocks/any_block.hpp"
#include "orepa/deploy/deployed_conv.hpp"
#include "orepa/deploy/printing.hpp"

namespace orepa {

/// The deployed form of a Sequential: one deployed stage per layer (blocks as their
/// DeployedConv). Independent of the Sequential's later training (stages are snapshots).
/// Activations pass between stages in the plain layout the first stage's primitive
/// prefers (channels-last where oneDNN runs convolutions on NHWC, as on AVX-512), so
/// consecutive deployed convolutions run without reorders; a stage that does not declare
/// a preferred_format() (see AnyDeployed::takes_any_format) gets NCHW. The output comes
/// back in the input's layout. Between int8 stages (deployed convolutions and YOLO modules
/// in int8, see AnyDeployed::int8_input) activations pass as 8-bit codes: each int8 stage
/// writes its output in the next one's input quantization, so the chain quantizes where
/// its first int8 stage reads float and returns to float before the first stage that
/// cannot take codes (GlobalAvgPool, say). Safe to call from several threads when every
/// stage is (the library's are).
template <class S>
class InferenceChain {
 public:
  /// An empty chain (forward returns its input).
  InferenceChain() = default;
  /// Appends a stage.
  void add(AnyDeployed<S> stage) { stages_.push_back(std::move(stage)); }
  /// Runs every stage in order. NaN and Inf propagate: an image (first index) whose
  /// values reach an int8 stage holding one gets an all-NaN output, since 8-bit codes
  /// cannot carry them (fp32 and bf16 stages propagate them as PyTorch does).
  Tensor<S> forward(ConstTensorView<S> x) const {
    if (stages_.empty()) return x.clone();
    Tensor<S> in;
    ConstTensorView<S> first = x;
    try {
      if (x.dim() == 4) first = in_format(x, preferred_format(x.sizes()), in);
    } catch (...) {
      detail::rethrow_in_child("InferenceChain", "0", stages_.front().type_name());
    }
    Tensor<S> y;
    if constexpr (std::is_same_v<S, float>) {
      detail::NonFiniteImages seen;
      seen.batch = x.dim() > 0 ? x.size(0) : 1;
      {
        detail::ScopedNonFiniteImages scope(&seen);
        y = run_stages(first);
      }
      detail::poison_images(y, seen.images, seen.batch, seen.all);
    } else {
      y = run_stages(first);
    }
    if (y.dim() == 4 && y.memory_format() != x.memory_format()) return y.to(x.memory_format());
    return y;
  }
  /// The layout the first stage prefers for input shape `x_shape`.
  MemoryFormat preferred_format(const Shape& x_shape) const {
    return stages_.empty() ? MemoryFormat::contiguous : stages_.front().preferred_format(x_shape);
  }
  /// Number of stages (one per layer of the Sequential).
  std::size_t size() const { return stages_.size(); }
  /// Stage `i` (throws std::out_of_range for a bad `i`).
  const AnyDeployed<S>& stage(std::size_t i) const { return stages_.at(i); }
  /// Visits the deployed convolutions of every stage; stage i's are named `prefix` + "i." ...
  void visit_convs(const std::string& prefix, const ConvVisitor<S>& f) const {
    for (std::size_t i = 0; i < stages_.size(); ++i) stages_[i].visit_convs(prefix + std::to_string(i) + ".", f);
  }
  /// The chain with every deployed convolution (in every stage and module) mapped by `f`.
  InferenceChain map_convs(const std::string& prefix, const ConvMapper<S>& f) const {
    InferenceChain c;
    for (std::size_t i = 0; i < stages_.size(); ++i) c.add(stages_[i].map_convs(prefix + std::to_string(i) + ".", f));
    return c;
  }
  /// The chain in `o`'s precision: every deployed convolution, in every stage and module,
  /// runs in it (int8: over the calibrated range of its name); the other layers stay fp32.
  InferenceChain with_options(const DeployOptions& o) const {
    return map_convs("", [&](const std::string& name, const DeployedConv<S>& conv) {
      DeployedConv<S> c(conv);
      c.apply(o, name);
      return AnyDeployed<S>(std::move(c));
    });
  }

  /// Weights and biases of every stage.
  std::int64_t num_parameters() const {
    std::int64_t n = 0;
    for (const auto& s : stages_) n += s.num_parameters();
    return n;
  }

 private:
  // Every stage in order: float between stages (NCHW for one that takes no other
  // layout), 8-bit codes between two int8 ones.
  Tensor<S> run_stages(ConstTensorView<S> x) const {
    StageOutput<S> held;
    StageInput<S> in = x;
    std::size_t i = 0;
    try {
      run_each_stage(in, held, i);
    } catch (...) {
      detail::rethrow_in_child("InferenceChain", std::to_string(i), stages_[i].type_name());
    }
    return std::get<Tensor<S>>(std::move(held));
  }
  // The loop of run_stages; `i` is the stage running.
  void run_each_stage(StageInput<S>& in, StageOutput<S>& held, std::size_t& i) const {
    for (i = 0; i < stages_.size(); ++i) {
      StageOutput<S> y;
      if (stages_[i].int8_input() || std::holds_alternative<const Int8Codes*>(in)) {
        const auto next = i + 1 < stages_.size() ? stages_[i + 1].int8_input() : std::nullopt;
        y = stages_[i].forward_int8(in, next ? &*next : nullptr);
      } else {
        ConstTensorView<S> v = std::get<ConstTensorView<S>>(in);
        Tensor<S> contiguous_copy;
        if (v.dim() == 4 && !v.is_contiguous() && !stages_[i].takes_any_format())
          v = in_format(v, MemoryFormat::contiguous, contiguous_copy);
        y = stages_[i].forward(v);
      }
      held = std::move(y);
      in = as_input(held);
    }
  }

  std::vector<AnyDeployed<S>> stages_;
};

/// A chain of layers run in order; itself a layer (so chains nest) with deploy().
template <class S>
class Sequential : public ModuleTensors<Sequential<S>, S> {
 public:
  /// An empty chain (forward and backward throw state_error until a layer is added).
  Sequential() = default;
  Sequential(const Sequential&) = delete;  // never copied silently: std::move it, or clone() for a copy
  Sequential& operator=(const Sequential&) = delete;
  /// Move constructor.
  Sequential(Sequential&&) noexcept = default;
  /// Move assignment; the previous layers are destroyed.
  Sequential& operator=(Sequential&&) noexcept = default;
  /// A deep copy: every layer cloned (nothing saved for backward).
  Sequential clone() const {
    Sequential c;
    for (const auto& l : layers_) c.layers_.push_back(l.clone());
    return c;
  }

  /// Moves `layer` in (the Sequential owns it from now on, as libtorch's push_back shares
  /// it) and returns a reference to the stored object, valid as long as the Sequential.
  /// Train the network through that reference or through get<T>(i); the moved-from
  /// object is left empty. For a copy, add `layer.clone()`.
  template <class T>
  std::decay_t<T>& add(T&& layer) {
    using L = std::decay_t<T>;
    static_assert(!std::is_lvalue_reference_v<T>,
                  "Sequential::add moves the layer in: write net.add(std::move(layer)) and use the reference add() "
                  "returns, or net.add(layer.clone()) for a copy");
    static_assert(is_layer<L, S>::value || std::is_same_v<L, AnyBlock<S>>,
                  "Sequential<S>::add: the layer needs the layer members of blocks/block.hpp for scalar S");
    layers_.emplace_back(std::move(layer));
    if constexpr (std::is_same_v<L, AnyBlock<S>>) return layers_.back();
    else return *layers_.back().template target<L>();
  }

  /// Number of layers.
  std::size_t size() const { return layers_.size(); }
  /// True when no layer has been added.
  bool empty() const { return layers_.empty(); }
  /// Layer `i` (throws config_error when out of range).
  AnyBlock<S>& layer(std::size_t i) { return layers_[checked(i, "layer")]; }
  /// Layer `i`, read-only (throws config_error when out of range).
  const AnyBlock<S>& layer(std::size_t i) const { return layers_[checked(i, "layer")]; }
  /// Layer `i` as its stored type `T`; throws config_error when out of range or of
  /// another type.
  template <class T>
  T& get(std::size_t i) {
    if (auto* t = layers_[checked(i, "get")].template target<T>()) return *t;
    throw config_error(detail::cat("Sequential::get: layer ", i, " holds a ", layers_[i].type_name(), " (",
                                   readable_type_name(layers_[i].type()), "), not a ", readable_type_name(typeid(T))));
  }

  /// "Sequential".
  std::string type_name() const { return "Sequential"; }

  /// Training forward through every layer; returns the last layer's output (an alias of
  /// its buffer, see Tensor).
  Tensor<S> forward_train(ConstTensorView<S> x) {
    require_layers("forward_train");
    std::size_t i = 0;
    try {
      Tensor<S> y = layers_.front().forward_train(x);
      for (i = 1; i < layers_.size(); ++i) y = layers_[i].forward_train(y);
      return y;
    } catch (...) {
      rethrow_in_layer(i);
    }
  }
  /// Eval forward through every layer (no state change).
  Tensor<S> forward_eval(ConstTensorView<S> x) const {
    require_layers("forward_eval");
    std::size_t i = 0;
    try {
      Tensor<S> y = layers_.front().forward_eval(x);
      for (i = 1; i < layers_.size(); ++i) y = layers_[i].forward_eval(y);
      return y;
    } catch (...) {
      rethrow_in_layer(i);
    }
  }
  /// Backward through every layer in reverse; accumulates parameter gradients and
  /// returns dL/dx of the first layer.
  Tensor<S> backward(ConstTensorView<S> grad_out) {
    require_layers("backward");
    std::size_t i = layers_.size() - 1;
    try {
      Tensor<S> g = layers_.back().backward(grad_out);
      while (i-- > 0) g = layers_[i].backward(g);
      return g;
    } catch (...) {
      rethrow_in_layer(i);
    }
  }

  /// Calls `v` on every layer, named by its index (module_tree.hpp).
  void visit_children(ModuleVisitor<S>& v) {
    for (std::size_t i = 0; i < layers_.size(); ++i) v(std::to_string(i), layers_[i]);
  }

  /// Every layer's tensors under `prefix` + its index + ".".
  void collect_tensors(Tensors<S>& out, const std::string& prefix) {
    for (std::size_t i = 0; i < layers_.size(); ++i) layers_[i].collect_tensors(out, prefix + std::to_string(i) + ".");
  }

  /// The inference chain: every layer deployed (a snapshot of the current weights).
  /// value_error naming the tensor ("3.bn.running_var") when one cannot be deployed
  /// (check_deployable()).
  InferenceChain<S> deploy() const {
    check_deployable(*this);
    InferenceChain<S> chain;
    for (const auto& l : layers_) chain.add(l.deploy());
    return chain;
  }
  /// The inference chain in `o`'s precision (InferenceChain::with_options): every
  /// deployed convolution, in every layer and module, runs in it, with, for int8, the
  /// calibrated range of its name ("3." for layer 3, "2.m.0.cv1." inside a C3).
  InferenceChain<S> deploy(const DeployOptions& o) const { return deploy().with_options(o); }

 private:
  std::size_t checked(std::size_t i, const char* who) const {
    if (i >= layers_.size())
      throw config_error(detail::cat("Sequential::", who, ": index ", i, " out of range (", layers_.size(), " layers)"));
    return i;
  }
  // Rethrows the exception from layer i with the layer's path (core/error_path.hpp).
  [[noreturn]] void rethrow_in_layer(std::size_t i) const {
    detail::rethrow_in_child("Sequential", std::to_string(i), layers_[i].type_name());
  }
  void require_layers(const char* who) const {
    if (layers_.empty()) throw state_error(detail::cat("Sequential::", who, ": the chain has no layers"));
  }

  std::deque<AnyBlock<S>> layers_;  // a deque: references add() returned stay valid as layers are added
};

/// Prints an inference chain: one line (or one indented group) per stage, its deployed
/// convolutions named by their tensor paths, with parameter counts (deploy/printing.hpp).
template <class S>
std::ostream& operator<<(std::ostream& os, const InferenceChain<S>& chain) {
  os << "InferenceChain(" << detail::parameter_note(chain.num_parameters()) << "\n";
  for (std::size_t i = 0; i < chain.size(); ++i) {
    os << "  (" << i << "): ";
    detail::print_deployed(os, chain.stage(i), 2);
  }
  return os << ")";
}

}  // namespace orepa
