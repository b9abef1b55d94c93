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

/// YOLO's autopad: the padding that keeps the size at stride 1, d*(k-1)/2.
/// Throws config_error when d * (k - 1) overflows (a hostile dilation).
inline std::int64_t autopad(std::int64_t k, std::int64_t d = 1) {
  return checked_mul(d, k - 1, "yolo_conv: dilation * (kernel_size - 1)") / 2;
}

/// An OREPA-family block for a c1 -> c2 k x k conv with stride s (groups g, dilation d),
/// padded with autopad. k must be odd (OREPA blocks are centred; use ConvBN for YOLOv5's
/// even 6x6 stem). All returned blocks share the SqueezedBlock interface.
template <class S = float, class Act = SiLU>
std::unique_ptr<SqueezedBlock<S, Act>> yolo_conv(std::int64_t c1, std::int64_t c2, std::int64_t k = 1,
                                                 std::int64_t s = 1, std::int64_t g = 1, std::int64_t d = 1,
                                                 std::uint64_t seed = 0, Act act = {}) {
  if (k < 1 || k % 2 == 0)
    throw config_error(detail::cat("yolo_conv: kernel_size must be odd and >= 1 for OREPA blocks, got ", k,
                                   " (use ConvBN for even kernels)"));
  const auto opts = ConvOptions(c1, c2, k).stride(s).groups(g).dilation(d).padding(autopad(k, d)).seed(seed);
  if (k == 1) return std::make_unique<OREPA_1x1<S, Act>>(opts, act);
  if (k >= 7) return std::make_unique<OREPA_LargeConv<S, Act>>(opts, act);
  return std::make_unique<OREPA<S, Act>>(opts, act);
}

}  // namespace orepa
