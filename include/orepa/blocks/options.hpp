#pragma once
/// @file options.hpp (blocks)
/// Block options in the PyTorch C++ style: the required settings in the constructor,
/// chainable setters with documented defaults, validation when the block is built.
///
/// ConvOptionsBase holds what every block has: channels and kernel size (required),
/// stride, padding, dilation, groups and the initialisation seed. A block that has more
/// settings takes its own options type, which adds only those, so a setter that does not
/// apply to a block does not compile:
///
/// | block | options |
/// |---|---|
/// | OREPA | OrepaOptions: + internal_channels |
/// | RepVGGBlock_OREPA | RepVGGOptions: + internal_channels, identity |
/// | DBB | DbbOptions: + internal_channels |
/// | OREPA_1x1, OREPA_LargeConv, ConvBN | ConvOptions |
///
/// Every options type converts explicitly from any other (`OrepaOptions(conv_options)`),
/// keeping the shared settings, so one geometry can build blocks of several types.

#include <cstdint>
#include <optional>

#include "orepa/core/conv_geometry.hpp"
#include "orepa/core/options.hpp"

namespace orepa {

/// The settings of every block; `Derived` is the concrete options type (so setters chain).
template <class Derived>
class ConvOptionsBase {
 public:
  /// The required settings; the others keep their defaults until set.
  ConvOptionsBase(std::int64_t in_channels, std::int64_t out_channels, std::int64_t kernel_size)
      : in_channels_(in_channels), out_channels_(out_channels), kernel_size_(kernel_size) {}
  /// The shared settings of another options type (its block-specific ones are dropped).
  template <class Other>
  explicit ConvOptionsBase(const ConvOptionsBase<Other>& o)
      : in_channels_(o.in_channels()), out_channels_(o.out_channels()), kernel_size_(o.kernel_size()),
        stride_(o.stride()), padding_(o.padding()), dilation_(o.dilation()), groups_(o.groups()), seed_(o.seed()) {}

  /// @fn in_channels(const std::int64_t&)
  /// @brief Sets in_channels(); returns the options for chaining.
  /// @fn out_channels(const std::int64_t&)
  /// @brief Sets out_channels(); returns the options for chaining.
  /// @fn kernel_size(const std::int64_t&)
  /// @brief Sets kernel_size(); returns the options for chaining.
  /// @fn stride(const std::int64_t&)
  /// @brief Sets stride(); returns the options for chaining.
  /// @fn padding(const std::optional<std::int64_t>&)
  /// @brief Sets padding() (std::nullopt: autopad); returns the options for chaining.
  /// @fn dilation(const std::int64_t&)
  /// @brief Sets dilation(); returns the options for chaining.
  /// @fn groups(const std::int64_t&)
  /// @brief Sets groups(); returns the options for chaining.
  /// @fn seed(const std::uint64_t&)
  /// @brief Sets seed(); returns the options for chaining.

  /// Input channels I.
  OREPA_OPTION(std::int64_t, in_channels);
  /// Output channels O.
  OREPA_OPTION(std::int64_t, out_channels);
  /// Kernel size k (square k x k kernel).
  OREPA_OPTION(std::int64_t, kernel_size);
  /// Stride (default 1).
  OREPA_OPTION(std::int64_t, stride) = 1;
  /// Zero padding on every side; absent (default) means YOLO's autopad dilation * (k - 1) / 2,
  /// which keeps the size at stride 1.
  OREPA_OPTION(std::optional<std::int64_t>, padding);
  /// Dilation, PyTorch convention (default 1 = dense).
  OREPA_OPTION(std::int64_t, dilation) = 1;
  /// Groups (default 1); must divide both channel counts.
  OREPA_OPTION(std::int64_t, groups) = 1;
  /// Seed of the parameter initialisation (default 0).
  OREPA_OPTION(std::uint64_t, seed) = 0;

 public:
  /// The convolution geometry these options describe (padding resolved). Not validated:
  /// the block that takes the options validates it and names itself in the error.
  ConvGeometry geometry() const {
    ConvGeometry g;
    g.in_channels = in_channels_;
    g.out_channels = out_channels_;
    g.kernel = kernel_size_;
    g.stride = stride_;
    g.padding = padding_ ? *padding_ : autopad(kernel_size_, dilation_);
    g.dilation = dilation_;
    g.groups = groups_;
    return g;
  }
  /// The derived options object (what the setters return).
  Derived& self() { return static_cast<Derived&>(*this); }

  /// YOLO's autopad d * (k - 1) / 2, or 0 for a kernel size or dilation out of range
  /// (then the block's validation reports that value; the product cannot overflow).
  static std::int64_t autopad(std::int64_t k, std::int64_t d) {
    if (k < 1 || k > max_conv_extent || d < 1 || d > max_conv_param) return 0;
    return d * (k - 1) / 2;
  }
};

/// Options of the blocks with no settings beyond the geometry: OREPA_1x1,
/// OREPA_LargeConv and ConvBN.
struct ConvOptions : ConvOptionsBase<ConvOptions> {
  using ConvOptionsBase<ConvOptions>::ConvOptionsBase;
  /// @fn name(const std::string&)
  /// @brief Sets name(); returns the options for chaining.

  /// The tensor-name path of the convolution slot these options are for, relative to the
  /// outermost module that builds it through a BlockMaker ("cv1.", "m.0.cv2."; default
  /// empty). Modules that build their convolutions through a maker set it, and a module
  /// holding another extends it, so a maker can tell the slots apart (a checkpoint's
  /// tensor names decide each slot's block type when a YOLO model is loaded).
  OREPA_OPTION(std::string, name);
};

/// Options of OREPA: the geometry plus the 1x1 -> k x k branch's width.
struct OrepaOptions : ConvOptionsBase<OrepaOptions> {
  using ConvOptionsBase<OrepaOptions>::ConvOptionsBase;

  /// @fn internal_channels(const std::int64_t&)
  /// @brief Sets internal_channels() (0: the reference rule); returns the options for chaining.

  /// Internal channels T of the 1x1 -> k x k branch; 0 (default) means the reference
  /// rule (T = I when groups <= 4, else 2 I).
  OREPA_OPTION(std::int64_t, internal_channels) = 0;
};

/// Options of RepVGGBlock_OREPA: the geometry plus the structure of its paths. Both
/// default to the reference rule; a checkpoint reader sets them from the tensors it finds.
struct RepVGGOptions : ConvOptionsBase<RepVGGOptions> {
  using ConvOptionsBase<RepVGGOptions>::ConvOptionsBase;

  /// @fn internal_channels(const std::int64_t&)
  /// @brief Sets internal_channels() (0: T = I); returns the options for chaining.
  /// @fn identity(const std::optional<bool>&)
  /// @brief Sets identity() (std::nullopt: the reference rule); returns the options for chaining.

  /// Internal channels T of the dense part's 1x1 -> k x k row; 0 (default) means T = I
  /// (identity-initialised `weight_rbr_1x1_kxk_idconv1` + `id_tensor`); any other T gives
  /// a free `weight_rbr_1x1_kxk_conv1` and no id_tensor.
  OREPA_OPTION(std::int64_t, internal_channels) = 0;
  /// Whether the block has the identity BN path `rbr_identity`; absent (default) means the
  /// reference rule: in_channels == out_channels and stride 1. Present, it must agree
  /// with the channels (an identity needs I == O); with a different stride the block is
  /// one the reference cannot build, but folds and runs all the same.
  OREPA_OPTION(std::optional<bool>, identity);
};

/// Options of DBB: the geometry plus the width of its 1x1 -> k x k branch.
struct DbbOptions : ConvOptionsBase<DbbOptions> {
  using ConvOptionsBase<DbbOptions>::ConvOptionsBase;

  /// @fn internal_channels(const std::int64_t&)
  /// @brief Sets internal_channels() (0: the reference rule); returns the options for chaining.

  /// Internal channels T of dbb_1x1_kxk; 0 (default) means the reference rule (I when
  /// groups < out_channels, else 2 I). T == I gives the identity-based idconv1, any other T
  /// a plain conv1.
  OREPA_OPTION(std::int64_t, internal_channels) = 0;
};

}  // namespace orepa
