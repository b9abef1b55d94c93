#pragma once
/// @file any_block.hpp
/// `AnyBlock<S>`: any block or layer (blocks/block.hpp) behind one type, move-only, for any
/// scalar. It is what Sequential stores, what the YOLO modules and block makers hold and
/// return, and what checkpoint loading (io/checkpoint.hpp) and the tools drive. The
/// convolution members (folded(), geometry()) work when the held type is a block
/// (is_conv()) and throw config_error otherwise; deploy() gives an AnyDeployed (a
/// `DeployedConv<S>` for a block).
///
///   AnyBlock<float> b = OREPA<float, SiLU>(OrepaOptions(16, 32, 3));
///   b.forward_train(x); b.backward(dy); auto deployed = b.deploy();
///   if (auto* o = b.target<OREPA<float, SiLU>>()) ...   // the concrete block

#include <memory>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>

#include "orepa/blocks/block.hpp"
#include "orepa/blocks/module_tree.hpp"
#include "orepa/deploy/any_deployed.hpp"

namespace orepa {

/// A type-erased block or layer.
template <class S>
class AnyBlock : public ModuleTensors<AnyBlock<S>, S> {
 public:
  /// Takes `block` over (moved in); it must model the layer concept for S.
  template <class B, class = std::enable_if_t<!std::is_same_v<std::decay_t<B>, AnyBlock>>>
  AnyBlock(B block) : impl_(std::make_unique<Model<B>>(std::move(block))) {  // NOLINT: implicit on purpose
    static_assert(is_layer<B, S>::value,
                  "AnyBlock<S>: the type needs the layer members of blocks/block.hpp for scalar S "
                  "(forward_train, forward_eval, backward, collect_tensors, state dicts, deploy, type_name)");
  }
  AnyBlock(const AnyBlock&) = delete;  // never copied silently: std::move it, or clone() for a copy
  AnyBlock& operator=(const AnyBlock&) = delete;
  /// Move constructor.
  AnyBlock(AnyBlock&&) noexcept = default;
  /// Move assignment; the previously held block is destroyed.
  AnyBlock& operator=(AnyBlock&&) noexcept = default;

  /// A deep copy of the held block (its clone(); config_error for a type without one).
  AnyBlock clone() const { return AnyBlock(impl_->clone()); }

  /// Training forward of the held block; its output (an alias of the block's buffer).
  Tensor<S> forward_train(ConstTensorView<S> x) { return impl_->forward_train(x); }
  /// Eval forward, no state change.
  Tensor<S> forward_eval(ConstTensorView<S> x) const { return impl_->forward_eval(x); }
  /// Backward of the last forward_train; accumulates gradients, returns dL/dx.
  Tensor<S> backward(ConstTensorView<S> grad_out) { return impl_->backward(grad_out); }
  /// Asks the held block to skip (false) or compute (true, the default) dL/dx in
  /// backward; false when the block has no set_input_grad() and always computes it.
  bool set_input_grad(bool needed) { return impl_->set_input_grad(needed); }
  /// Multiplies the held block's kernel by `gain` through its branch weights (ConvBlock::
  /// scale_kernel); false, nothing changed, for a block without branches (ConvBN, DBB).
  bool scale_kernel(S gain) { return impl_->scale_kernel(gain); }
  /// The held block's tensors under `prefix` (module.hpp).
  void collect_tensors(Tensors<S>& out, const std::string& prefix) { impl_->collect_tensors(out, prefix); }
  /// The held block's reference class name.
  std::string type_name() const { return impl_->type_name(); }
  /// The deployed form (a `DeployedConv<S>` for a block).
  AnyDeployed<S> deploy() const { return impl_->deploy(); }

  /// True when the held type is a block (has folded() and geometry()).
  bool is_conv() const { return impl_->geometry() != nullptr; }
  /// The held block's convolution geometry; config_error for a layer that is no block.
  const ConvGeometry& geometry() const {
    if (auto* g = impl_->geometry()) return *g;
    throw config_error(type_name() + " is not a convolution block: it has no geometry");
  }
  /// The held block's folded kernel and bias; config_error for a layer that is no block.
  Affine<S> folded() const { return impl_->folded(); }

  /// The held object as a `B`, or nullptr when it is of another type.
  template <class B>
  B* target() {
    auto* m = dynamic_cast<Model<B>*>(impl_.get());
    return m ? &m->b : nullptr;
  }
  /// Read-only form of target().
  template <class B>
  const B* target() const {
    auto* m = dynamic_cast<const Model<B>*>(impl_.get());
    return m ? &m->b : nullptr;
  }
  /// The held block, for the module tree (printing, named_modules()).
  ModuleRef<S> module_ref() { return impl_->module_ref(); }
  /// typeid of the held object (for messages).
  const std::type_info& type() const { return impl_->type(); }

 private:
  struct Concept {
    virtual ~Concept() = default;
    virtual Tensor<S> forward_train(ConstTensorView<S> x) = 0;
    virtual Tensor<S> forward_eval(ConstTensorView<S> x) const = 0;
    virtual Tensor<S> backward(ConstTensorView<S> g) = 0;
    virtual bool set_input_grad(bool needed) = 0;
    virtual bool scale_kernel(S gain) = 0;
    virtual void collect_tensors(Tensors<S>& out, const std::string& prefix) = 0;
    virtual std::string type_name() const = 0;
    virtual AnyDeployed<S> deploy() const = 0;
    virtual const ConvGeometry* geometry() const = 0;
    virtual Affine<S> folded() const = 0;
    virtual const std::type_info& type() const = 0;
    virtual ModuleRef<S> module_ref() = 0;
    virtual std::unique_ptr<Concept> clone() const = 0;
  };
  template <class B, class = void>
  struct has_clone : std::false_type {};
  template <class B>
  struct has_clone<B, std::void_t<decltype(B(std::declval<const B&>().clone()))>> : std::true_type {};
  template <class B, class = void>
  struct has_input_grad : std::false_type {};
  template <class B>
  struct has_input_grad<B, std::void_t<decltype(std::declval<B&>().set_input_grad(true))>> : std::true_type {};
  template <class B, class = void>
  struct has_scale_kernel : std::false_type {};
  template <class B>
  struct has_scale_kernel<B, std::void_t<decltype(std::declval<B&>().scale_kernel(S(1)))>> : std::true_type {};
  template <class B>
  struct Model final : Concept {
    explicit Model(B x) : b(std::move(x)) {}
    Tensor<S> forward_train(ConstTensorView<S> x) override { return b.forward_train(x); }
    Tensor<S> forward_eval(ConstTensorView<S> x) const override { return b.forward_eval(x); }
    Tensor<S> backward(ConstTensorView<S> g) override { return b.backward(g); }
    bool set_input_grad(bool needed) override {
      if constexpr (has_input_grad<B>::value) b.set_input_grad(needed);
      return has_input_grad<B>::value;
    }
    bool scale_kernel(S gain) override {
      if constexpr (has_scale_kernel<B>::value) b.scale_kernel(gain);
      return has_scale_kernel<B>::value;
    }
    void collect_tensors(Tensors<S>& out, const std::string& prefix) override { b.collect_tensors(out, prefix); }
    std::string type_name() const override { return b.type_name(); }
    AnyDeployed<S> deploy() const override { return AnyDeployed<S>(b.deploy()); }
    const ConvGeometry* geometry() const override {
      if constexpr (is_block<B, S>::value) return &b.geometry();
      else return nullptr;
    }
    Affine<S> folded() const override {
      if constexpr (is_block<B, S>::value) return b.folded();
      else throw config_error(b.type_name() + " is not a convolution block: it has no folded kernel");
    }
    const std::type_info& type() const override { return typeid(B); }
    ModuleRef<S> module_ref() override { return ModuleRef<S>(b); }
    std::unique_ptr<Concept> clone() const override {
      if constexpr (has_clone<B>::value) return std::make_unique<Model<B>>(b.clone());
      else if constexpr (std::is_copy_constructible_v<B>) return std::make_unique<Model<B>>(b);
      else throw config_error(b.type_name() + " (" + readable_type_name(typeid(B)) + ") has no clone() and cannot be copied");
    }
    B b;
  };
  explicit AnyBlock(std::unique_ptr<Concept> impl) : impl_(std::move(impl)) {}
  std::unique_ptr<Concept> impl_;
};

}  // namespace orepa
