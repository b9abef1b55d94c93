#pragma once
/// @file block.hpp
/// The block concept: what every block type of orepa is (OREPA, OREPA_1x1,
/// OREPA_LargeConv, RepVGGBlock_OREPA, ConvBN, DBB, a user's OnlineBlock), and what
/// AnyBlock holds, Sequential chains and the checkpoint tools drive. For a block `b` of
/// scalar `S` (float runs oneDNN, double the reference loops) and `x` a
/// `ConstTensorView<S>` (a Tensor converts implicitly):
///
/// | member | meaning |
/// |---|---|
/// | `Tensor<S> b.forward_train(x)` | training forward (batch statistics; running statistics updated); the output, an alias of the block's buffer that stays valid while held (core/tensor.hpp) |
/// | `Tensor<S> b.forward_eval(x) const` | eval forward (running statistics), no state change |
/// | `Tensor<S> b.backward(dy)` | backward of the last forward_train: accumulates every parameter gradient, returns dL/dx (an alias of the block's buffer) |
/// | `ParamList<S> b.parameters()` / `b.buffers()` | trainable tensors / buffers (running statistics, fixed priors, identity tensors), in state-dict order |
/// | `NamedParams<S> b.named_parameters(prefix)` / `b.named_buffers(prefix)` | the same with the reference's state-dict names |
/// | `StateDict<S> b.state_dict() const` / `b.load_state_dict(sd)` | every tensor and counter by name; loading is strict and all-or-nothing, listing missing, unexpected and mis-shaped entries |
/// | `b.zero_grad()` | zeroes every gradient |
/// | `Affine<S> b.folded() const` | the BN-folded kernel and bias of the deployed convolution |
/// | `DeployedConv<S> b.deploy() const` | the deployed single convolution (thread-safe, fused bias and activation) |
/// | `std::string b.type_name() const` | the reference class name ("OREPA", "DBB", ...) |
/// | `const ConvGeometry& b.geometry() const` | the deployed convolution's geometry |
/// | `b.collect_tensors(out, prefix)` / `b.batch_norms()` | the tensor-listing primitive (module.hpp) and the BatchNorms |
///
/// A *layer* (GlobalAvgPool, Linear, Sequential, the YOLO modules) has the same members
/// except folded() and geometry(), and its deploy() returns any object with
/// `Tensor<S> forward(ConstTensorView<S>) const`.
///
/// How the block types are built (docs/design.md): one trunk (conv -> BN -> activation)
/// holding a kernel source (a branch list, OREPA_LargeConv's chain, or a plain weight),
/// or, for DBB and RepVGGBlock_OREPA, a sum of paths over the same pieces.

#include <string>
#include <type_traits>
#include <utility>

#include "orepa/blocks/kernel_algebra.hpp"
#include "orepa/blocks/module.hpp"
#include "orepa/core/state_dict.hpp"
#include "orepa/deploy/deployed_conv.hpp"

namespace orepa {

/// True when `T` has the layer members for scalar `S` (see the file comment).
template <class T, class S, class = void>
struct is_layer : std::false_type {};
/// \cond DO_NOT_DOCUMENT_THIS
template <class T, class S>
struct is_layer<
    T, S,
    std::void_t<
        decltype(static_cast<const Tensor<S>&>(std::declval<T&>().forward_train(std::declval<ConstTensorView<S>>()))),
        decltype(Tensor<S>(std::declval<const T&>().forward_eval(std::declval<ConstTensorView<S>>()))),
        decltype(static_cast<const Tensor<S>&>(std::declval<T&>().backward(std::declval<ConstTensorView<S>>()))),
        decltype(ParamList<S>(std::declval<T&>().parameters())), decltype(ParamList<S>(std::declval<T&>().buffers())),
        decltype(NamedParams<S>(std::declval<T&>().named_parameters(std::string()))),
        decltype(NamedParams<S>(std::declval<T&>().named_buffers(std::string()))),
        decltype(StateDict<S>(std::declval<const T&>().state_dict())),
        decltype(std::declval<T&>().load_state_dict(std::declval<const StateDict<S>&>())),
        decltype(std::declval<T&>().zero_grad()), decltype(std::string(std::declval<const T&>().type_name())),
        decltype(std::declval<T&>().collect_tensors(std::declval<Tensors<S>&>(), std::string())),
        decltype(Tensor<S>(std::declval<const T&>().deploy().forward(std::declval<ConstTensorView<S>>())))>>
    : std::true_type {};
/// \endcond

/// True when `T` models the block concept for scalar `S`: a layer with folded() and
/// geometry() whose deploy() is a `DeployedConv<S>`.
template <class T, class S, class = void>
struct is_block : std::false_type {};
/// \cond DO_NOT_DOCUMENT_THIS
template <class T, class S>
struct is_block<T, S,
                std::enable_if_t<is_layer<T, S>::value &&
                                 std::is_same_v<decltype(std::declval<const T&>().folded()), Affine<S>> &&
                                 std::is_convertible_v<decltype(std::declval<const T&>().geometry()), const ConvGeometry&> &&
                                 std::is_same_v<decltype(std::declval<const T&>().deploy()), DeployedConv<S>>>>
    : std::true_type {};
/// \endcond

}  // namespace orepa
