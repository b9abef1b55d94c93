#pragma once
/// @file yolo.hpp
/// Block makers: functions from a ConvOptions to an AnyBlock, so a network definition
/// (the YOLO modules, a user's model) can be built from any block family. yolo_conv is
/// YOLOv5's `Conv(c1, c2, k, s)` in OREPA form: the block the reference model builder
/// picks (OREPA_1x1 for k = 1, OREPA_LargeConv for k >= 7, OREPA otherwise), SiLU by
/// default, autopad.

#include <functional>
#include <string>

#include "orepa/blocks/any_block.hpp"
#include "orepa/blocks/conv_bn.hpp"
#include "orepa/blocks/dbb.hpp"
#include "orepa/blocks/orepa.hpp"
#include "orepa/blocks/orepa_1x1.hpp"
#include "orepa/blocks/orepa_large.hpp"
#include "orepa/blocks/repvgg.hpp"

namespace orepa {

/// A function building a block for a convolution's options (channels, kernel, stride,
/// groups, seed; padding unset = autopad).
template <class S>
using BlockMaker = std::function<AnyBlock<S>(const ConvOptions&)>;

/// The OREPA-family block for `opts`: OREPA_1x1 for k = 1, OREPA_LargeConv for k >= 7,
/// OREPA otherwise. k must be odd (OREPA blocks are centred; use ConvBN for YOLOv5's even
/// 6x6 stem). Throws config_error on an invalid configuration.
template <class S = float, class Act = SiLU>
AnyBlock<S> yolo_conv(const ConvOptions& opts, Act act = {}) {
  const auto k = opts.kernel_size();
  if (k < 1 || k % 2 == 0)
    throw config_error(detail::cat("yolo_conv: kernel_size must be odd and >= 1 for OREPA blocks, got ", k,
                                   " (use ConvBN for even kernels)"));
  if (k == 1) return OREPA_1x1<S, Act>(opts, act);
  if (k >= 7) return OREPA_LargeConv<S, Act>(opts, act);
  return OREPA<S, Act>(OrepaOptions(opts), act);
}

/// Maker of `Block` (any block type with an `Options` type): the options converted to
/// Block::Options, the activation `act`.
template <template <class, class> class Block, class S = float, class Act = SiLU>
BlockMaker<S> maker_of(Act act = {}) {
  return [act](const ConvOptions& opts) -> AnyBlock<S> {
    using B = Block<S, Act>;
    return B(typename B::Options(opts), act);
  };
}

/// Maker of the OREPA family (yolo_conv).
template <class S = float, class Act = SiLU>
BlockMaker<S> orepa_maker(Act act = {}) {
  return [act](const ConvOptions& opts) { return yolo_conv<S, Act>(opts, act); };
}

/// Maker of the DBB baseline: DBB for k > 1; for k = 1 a plain ConvBN (DBB
/// re-parameterises k x k convolutions; a 1x1 conv stays a conv, as in the DBB paper).
template <class S = float, class Act = SiLU>
BlockMaker<S> dbb_maker(Act act = {}) {
  return [act](const ConvOptions& opts) -> AnyBlock<S> {
    if (opts.kernel_size() == 1) return ConvBN<S, Act>(opts, act);
    return DBB<S, Act>(DbbOptions(opts), act);
  };
}

}  // namespace orepa
