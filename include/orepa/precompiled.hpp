#pragma once
/// @file precompiled.hpp
/// The float instantiations that the optional compiled library `orepa::precompiled`
/// (src/precompiled.cpp) holds: tensors, BN, the deployed convolution, Sequential, the
/// optimizers, the YOLO C3 / Bottleneck, and every block with Identity, ReLU or SiLU.
///
/// Linking `orepa::precompiled` defines OREPA_PRECOMPILED; then this header (which
/// orepa.hpp includes last) declares those instantiations `extern template`, and a
/// program's translation units no longer optimise and emit them again; the bodies of the
/// heavy non-template code (the training and BN engines, the matmul, the calibrator: see
/// core/linkage.hpp) are compiled in the library too and not even parsed by the program.
/// A one-block program compiles in about half the time (benchmarks/compile_time.sh).
/// Without the macro nothing changes and the library stays header-only. Defining
/// OREPA_PRECOMPILED without linking the library gives undefined references at link time.

#include "orepa/orepa.hpp"

/// \cond DO_NOT_DOCUMENT_THIS
#define OREPA_PRECOMPILED_BLOCKS(X, A)                                                                        \
  X(class ConvBN<float, A>) X(class OREPA<float, A>) X(class OREPA_1x1<float, A>)                             \
  X(class OREPA_LargeConv<float, A>) X(class DBB<float, A>) X(class RepVGGBlock_OREPA<float, A>)              \
  X(class Trunk<float, A>) X(class ConvBlock<float, A, BranchSum<float>>)                                     \
  X(class ConvBlock<float, A, PlainKernel<float>>) X(class ConvBlock<float, A, KernelChain<float>>)           \
  X(class OnlineBlock<float, A>) X(class MultiPathBlock<float, A>)

// X(declaration) for every instantiation the library compiles.
#define OREPA_PRECOMPILED_INSTANCES(X)                                                                        \
  X(class Tensor<float>) X(class TensorView<float>) X(class TensorView<const float>) X(struct Param<float>)    \
  X(class BatchNorm2d<float>) X(class DeployedConv<float>) X(class AnyDeployed<float>)                        \
  X(class AnyBlock<float>) X(class BranchSum<float>) X(class KernelChain<float>) X(class PlainKernel<float>)  \
  X(class branches::Origin<float>) X(class branches::OneByOneThenFilter<float>) X(class branches::Avg<float>) \
  X(class branches::Prior<float>) X(class branches::OneByOneKxk<float>) X(class branches::OneByOne<float>)    \
  X(class branches::DepthwiseSeparable<float>) X(class branches::LowRankIdentity<float>)                      \
  X(class Path<float>) X(class Sequential<float>) X(class InferenceChain<float>) X(class Linear<float>)       \
  X(class GlobalAvgPool<float>) X(class SoftmaxCrossEntropy<float>) X(class Optimizer<float>)                 \
  X(class SGD<float>) X(class AdamW<float>) X(class Bottleneck<float>) X(class C3<float>)                     \
  X(class DeployedBottleneck<float>) X(class DeployedC3<float>) OREPA_PRECOMPILED_BLOCKS(X, Identity)         \
  OREPA_PRECOMPILED_BLOCKS(X, ReLU) OREPA_PRECOMPILED_BLOCKS(X, SiLU)

#if defined(OREPA_PRECOMPILED) && !defined(OREPA_PRECOMPILING)
#define OREPA_EXTERN_INSTANCE(...) extern template __VA_ARGS__;
namespace orepa {
OREPA_PRECOMPILED_INSTANCES(OREPA_EXTERN_INSTANCE)
}  // namespace orepa
#undef OREPA_EXTERN_INSTANCE
#endif
/// \endcond
