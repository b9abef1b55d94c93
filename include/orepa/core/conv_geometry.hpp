#pragma once
/// @file conv_geometry.hpp
/// The hyper-parameters of a 2-D convolution (PyTorch conv2d semantics) and the shape
/// arithmetic and validation shared by the engine, the blocks and the deployed conv.

#include <cstdint>

#include "orepa/core/tensor.hpp"

namespace orepa {

/// Largest dilated kernel span and input height / width a convolution accepts (2^34, no
/// tensor within max_tensor_bytes can be larger). With max_conv_param below, it keeps the
/// output-size arithmetic far from int64 overflow for any geometry that passes validate().
inline constexpr std::int64_t max_conv_extent = max_tensor_bytes;

/// Largest stride, padding and dilation accepted (2^16). Real networks stay far below it;
/// oneDNN 2.6 keeps these values in 32-bit ints and read out of bounds for a 1x1 kernel
/// with a dilation near 2^31 (found by fuzz/fuzz_block_config), so absurd values stop here.
inline constexpr std::int64_t max_conv_param = std::int64_t(1) << 16;

/// Kernel size, stride, padding, dilation and groups of a convolution, plus its channels.
struct ConvGeometry {
  std::int64_t in_channels = 0;   ///< I
  std::int64_t out_channels = 0;  ///< O
  std::int64_t kernel = 1;        ///< k (square, k x k)
  /// s, the stride in both directions
  std::int64_t stride = 1;
  std::int64_t padding = 0;       ///< zero padding on every side
  std::int64_t dilation = 1;      ///< PyTorch convention: 1 = dense
  /// g, the number of groups (divides I and O)
  std::int64_t groups = 1;

  /// Throws config_error naming the first invalid field. `odd_kernel` adds the OREPA rule.
  void validate(const char* who, bool odd_kernel = true) const {
    auto bad = [&](const char* field, std::int64_t v, const char* want) {
      throw config_error(detail::cat(who, ": ", field, " must be ", want, ", got ", v));
    };
    if (in_channels < 1) bad("in_channels", in_channels, ">= 1");
    if (out_channels < 1) bad("out_channels", out_channels, ">= 1");
    if (kernel < 1) bad("kernel_size", kernel, ">= 1");
    if (odd_kernel && kernel % 2 == 0) bad("kernel_size", kernel, "odd");
    if (stride < 1) bad("stride", stride, ">= 1");
    if (dilation < 1) bad("dilation", dilation, ">= 1");
    if (padding < 0) bad("padding", padding, ">= 0");
    if (groups < 1) bad("groups", groups, ">= 1");
    if (stride > max_conv_param) bad("stride", stride, "<= 65536");
    if (padding > max_conv_param) bad("padding", padding, "<= 65536");
    if (dilation > max_conv_param) bad("dilation", dilation, "<= 65536");
    if (kernel > 1 && dilation > (max_conv_extent - 1) / (kernel - 1))
      throw config_error(detail::cat(who, ": dilation ", dilation, " makes the ", kernel, "x", kernel,
                                     " kernel span more than ", max_conv_extent, " pixels"));
    if (in_channels % groups != 0)
      throw config_error(detail::cat(who, ": groups ", groups, " must divide in_channels ", in_channels));
    if (out_channels % groups != 0)
      throw config_error(detail::cat(who, ": groups ", groups, " must divide out_channels ", out_channels));
    checked_numel({out_channels, in_channels / groups, kernel, kernel}, who);
  }
  /// Input channels per group, I/g.
  std::int64_t in_per_group() const { return in_channels / groups; }
  /// Output channels per group, O/g.
  std::int64_t out_per_group() const { return out_channels / groups; }
  /// Kernel shape [O, I/g, k, k].
  Shape weight_shape() const { return {out_channels, in_per_group(), kernel, kernel}; }
  /// Output extent for an input extent: floor((h + 2p - d(k-1) - 1)/s) + 1, or 0 when the
  /// kernel does not fit. Needs a validated geometry and 0 <= h <= max_conv_extent.
  std::int64_t out_extent(std::int64_t h) const {
    std::int64_t span = dilation * (kernel - 1) + 1;
    std::int64_t num = h + 2 * padding - span;
    return num < 0 ? 0 : num / stride + 1;
  }
  /// Checks `x` is [N, I, H, W] with an output of at least 1x1; returns [N, O, OH, OW].
  /// Throws shape_error for a bad input shape and config_error for an output no float
  /// tensor can hold (before any engine builds primitives or buffers for it).
  Shape output_shape(const Shape& x, const char* who) const {
    if (x.size() != 4 || x[1] != in_channels)
      throw shape_error(detail::cat(who, ": input must be [N, ", in_channels, ", H, W], got ",
                                    shape_str(x)));
    if (x[0] < 1) throw shape_error(detail::cat(who, ": input batch must be >= 1, got ", shape_str(x)));
    if (x[2] < 0 || x[3] < 0 || x[2] > max_conv_extent || x[3] > max_conv_extent)
      throw shape_error(detail::cat(who, ": input height and width must be in [0, ", max_conv_extent, "], got ",
                                    shape_str(x)));
    std::int64_t oh = out_extent(x[2]), ow = out_extent(x[3]);
    if (oh < 1 || ow < 1)
      throw shape_error(detail::cat(who, ": input ", shape_str(x), " is smaller than the ", kernel, "x",
                                    kernel, " kernel (dilation ", dilation, ", padding ", padding,
                                    "): output would be ", oh, "x", ow));
    Shape y{x[0], out_channels, oh, ow};
    if (checked_numel(y, who) > max_tensor_bytes / std::int64_t(sizeof(float)))
      throw config_error(detail::cat(who, ": the output ", shape_str(y), " of input ", shape_str(x),
                                     " exceeds the ", max_tensor_bytes, "-byte tensor limit"));
    return y;
  }
  /// True when every field equals the other geometry's.
  bool operator==(const ConvGeometry& o) const {
    return in_channels == o.in_channels && out_channels == o.out_channels && kernel == o.kernel &&
           stride == o.stride && padding == o.padding && dilation == o.dilation && groups == o.groups;
  }
};

}  // namespace orepa
