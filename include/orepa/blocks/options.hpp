#pragma once
/// @file options.hpp (blocks)
/// ConvOptions: the configuration shared by every block: channels and kernel size
/// (required), stride, padding, dilation, groups, seed (optional, with defaults).

#include <cstdint>

#include "orepa/core/conv_geometry.hpp"
#include "orepa/core/options.hpp"

namespace orepa {

/// Options of a k x k block. Padding defaults to k/2 (YOLO's autopad for dilation 1).
struct ConvOptions {
  ConvOptions(std::int64_t in_channels, std::int64_t out_channels, std::int64_t kernel_size)
      : in_channels_(in_channels), out_channels_(out_channels), kernel_size_(kernel_size) {}

  OREPA_OPTION(std::int64_t, in_channels);
  OREPA_OPTION(std::int64_t, out_channels);
  OREPA_OPTION(std::int64_t, kernel_size);
  /// Stride (default 1).
  OREPA_OPTION(std::int64_t, stride) = 1;
  /// Zero padding on every side; -1 (default) means kernel_size / 2.
  OREPA_OPTION(std::int64_t, padding) = -1;
  /// Dilation, PyTorch convention (default 1 = dense).
  OREPA_OPTION(std::int64_t, dilation) = 1;
  /// Groups (default 1); must divide both channel counts.
  OREPA_OPTION(std::int64_t, groups) = 1;
  /// Seed of the parameter initialisation (default 0).
  OREPA_OPTION(std::uint64_t, seed) = 0;
  /// OREPA only: internal channels T of the 1x1 -> k x k branch; 0 (default) means the
  /// reference rule (T = I when groups <= 4, else 2 I).
  OREPA_OPTION(std::int64_t, internal_channels) = 0;
  /// OREPA only: no BN, the block only yields its squeezed kernel (used by OREPA_LargeConv).
  OREPA_OPTION(bool, weight_only) = false;

 public:
  /// The convolution geometry these options describe (padding resolved).
  ConvGeometry geometry() const {
    ConvGeometry g;
    g.in_channels = in_channels_;
    g.out_channels = out_channels_;
    g.kernel = kernel_size_;
    g.stride = stride_;
    g.padding = padding_ == -1 ? kernel_size_ / 2 : padding_;
    g.dilation = dilation_;
    g.groups = groups_;
    return g;
  }
};

/// The reference class name is the name users search for.
using OrepaOptions = ConvOptions;

}  // namespace orepa
