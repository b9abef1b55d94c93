#pragma once
/// @file yolo.hpp
/// A YOLO-style convenience factory in the spirit of YOLOv5's `Conv(c1, c2, k, s)`:
/// picks the block the reference model builder would (OREPA_1x1 for k = 1,
/// OREPA_LargeConv for k >= 7, OREPA otherwise), SiLU by default, autopad.

#include <memory>

#include "orepa/blocks/orepa.hpp"
#include "orepa/blocks/orepa_1x1.hpp"
#include "orepa/blocks/orepa_large.hpp"

namespace orepa {

/// The OREPA-family block for `opts` (padding absent = autopad): OREPA_1x1 for k = 1,
/// OREPA_LargeConv for k >= 7, OREPA otherwise. k must be odd (OREPA blocks are
/// centred; use ConvBN for YOLOv5's even 6x6 stem). Throws config_error on an invalid
/// configuration.
template <class S = float, class Act = SiLU>
std::unique_ptr<SqueezedBlock<S, Act>> yolo_conv(const ConvOptions& opts, Act act = {}) {
  const auto k = opts.kernel_size();
  if (k < 1 || k % 2 == 0)
    throw config_error(detail::cat("yolo_conv: kernel_size must be odd and >= 1 for OREPA blocks, got ", k,
                                   " (use ConvBN for even kernels)"));
  if (k == 1) return std::make_unique<OREPA_1x1<S, Act>>(opts, act);
  if (k >= 7) return std::make_unique<OREPA_LargeConv<S, Act>>(opts, act);
  return std::make_unique<OREPA<S, Act>>(OrepaOptions(opts), act);
}

}  // namespace orepa
