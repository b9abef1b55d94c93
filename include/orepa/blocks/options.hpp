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
  /// The required settings; the others keep their defaults until set.
  ConvOptions(std::int64_t in_channels, std::int64_t out_channels, std::int64_t kernel_size)
      : in_channels_(in_channels), out_channels_(out_channels), kernel_size_(kernel_size) {}

  /// @fn in_channels(const std::int64_t&)
  /// @brief Sets in_channels(); returns `*this` for chaining.
  /// @fn out_channels(const std::int64_t&)
  /// @brief Sets out_channels(); returns `*this` for chaining.
  /// @fn kernel_size(const std::int64_t&)
  /// @brief Sets kernel_size(); returns `*this` for chaining.
  /// @fn stride(const std::int64_t&)
  /// @brief Sets stride(); returns `*this` for chaining.
  /// @fn padding(const std::int64_t&)
  /// @brief Sets padding() (-1: kernel_size / 2); returns `*this` for chaining.
  /// @fn dilation(const std::int64_t&)
  /// @brief Sets dilation(); returns `*this` for chaining.
  /// @fn groups(const std::int64_t&)
  /// @brief Sets groups(); returns `*this` for chaining.
  /// @fn seed(const std::uint64_t&)
  /// @brief Sets seed(); returns `*this` for chaining.
  /// @fn internal_channels(const std::int64_t&)
  /// @brief Sets internal_channels() (0: the reference rule); returns `*this` for chaining.
  /// @fn weight_only(const bool&)
  /// @brief Sets weight_only(); returns `*this` for chaining.

  /// Input channels I.
  OREPA_OPTION(std::int64_t, in_channels);
  /// Output channels O.
  OREPA_OPTION(std::int64_t, out_channels);
  /// Kernel size k (square k x k kernel).
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
