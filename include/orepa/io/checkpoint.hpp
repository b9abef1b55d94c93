#pragma once
/// @file checkpoint.hpp
/// Whole checkpoints of the PyTorch reference: find every training-time block by its
/// tensor names (outermost block only when blocks nest), rebuild it with the geometry the
/// tensor shapes imply, and drive it through one type-erased interface (used by the
/// orepa-convert and orepa-run tools).

#include <algorithm>
#include <memory>

#include "orepa/blocks/conv_bn.hpp"
#include "orepa/blocks/dbb.hpp"
#include "orepa/blocks/orepa.hpp"
#include "orepa/blocks/orepa_1x1.hpp"
#include "orepa/blocks/orepa_large.hpp"
#include "orepa/blocks/repvgg.hpp"
#include "orepa/io/state_dict.hpp"

namespace orepa::io {

/// The training-time block classes of the reference implementation.
enum class BlockType { OREPA, OREPA_1x1, OREPA_LargeConv, RepVGGBlock_OREPA, ConvBN, DBB };

/// The reference class name ("OREPA", "OREPA_1x1", ...).
inline const char* to_string(BlockType t) {
  switch (t) {
    case BlockType::OREPA: return "OREPA";
    case BlockType::OREPA_1x1: return "OREPA_1x1";
    case BlockType::OREPA_LargeConv: return "OREPA_LargeConv";
    case BlockType::RepVGGBlock_OREPA: return "RepVGGBlock_OREPA";
    case BlockType::ConvBN: return "ConvBN";
    case BlockType::DBB: return "DBB";
  }
  return "?";
}

/// Parses a reference class name; throws config_error listing the valid ones.
inline BlockType parse_block_type(const std::string& s) {
  for (auto t : {BlockType::OREPA, BlockType::OREPA_1x1, BlockType::OREPA_LargeConv, BlockType::RepVGGBlock_OREPA,
                 BlockType::ConvBN, BlockType::DBB})
    if (s == to_string(t)) return t;
  throw config_error("block type: expected OREPA, OREPA_1x1, OREPA_LargeConv, RepVGGBlock_OREPA, ConvBN or DBB, got '" +
                     s + "'");
}

/// The stem of the deployed tensors (`<prefix><stem>.weight` / `.bias`), SPEC section 6.
inline const char* deployed_stem(BlockType t) {
  switch (t) {
    case BlockType::OREPA: return "orepa_reparam";
    case BlockType::OREPA_1x1: return "or1x1_reparam";
    case BlockType::OREPA_LargeConv: return "or_large_reparam";
    case BlockType::RepVGGBlock_OREPA: return "rbr_reparam";
    case BlockType::ConvBN: return "conv";
    case BlockType::DBB: return "dbb_reparam";
  }
  return "?";
}

/// A block found in a checkpoint: its name prefix (e.g. "model.3.") and class.
struct DetectedBlock {
  std::string prefix;  ///< tensor-name prefix of the block, "" or ending in '.' (e.g. "model.3.")
  BlockType type;      ///< the block's reference class
};

/// Every training-time block of a checkpoint, outermost only, sorted by prefix.
/// A block is recognised by a marker tensor: `weight_orepa_origin` + `vector` + `bn.weight`
/// (OREPA; without bn it is a weight-only layer), `weight_or1x1_origin` (OREPA_1x1),
/// `weight0.weight_orepa_origin` + `bn.weight` (OREPA_LargeConv),
/// `rbr_dense.weight_rbr_origin` (RepVGGBlock_OREPA), `dbb_origin.conv.weight` (DBB),
/// `conv.weight` + `bn.weight` (ConvBN).
inline std::vector<DetectedBlock> detect_blocks(const SafetensorsFile& file) {
  static const std::vector<std::tuple<std::string, BlockType, std::vector<std::string>>> markers = {
      {"weight_orepa_origin", BlockType::OREPA, {"vector", "bn.weight"}},
      {"weight_or1x1_origin", BlockType::OREPA_1x1, {"vector", "bn.weight"}},
      {"weight0.weight_orepa_origin", BlockType::OREPA_LargeConv, {"bn.weight"}},
      {"rbr_dense.weight_rbr_origin", BlockType::RepVGGBlock_OREPA, {}},
      {"dbb_origin.conv.weight", BlockType::DBB, {}},
      {"conv.weight", BlockType::ConvBN, {"bn.weight"}},
  };
  std::vector<DetectedBlock> found;
  for (const auto& name : file.names())
    for (const auto& [marker, type, others] : markers) {
      if (name.size() < marker.size() || name.compare(name.size() - marker.size(), marker.size(), marker) != 0)
        continue;
      const std::string prefix = name.substr(0, name.size() - marker.size());
      if (!prefix.empty() && prefix.back() != '.') continue;  // "xconv.weight" is not "x.conv.weight"
      if (std::all_of(others.begin(), others.end(), [&](const std::string& o) { return file.contains(prefix + o); }))
        found.push_back({prefix, type});
    }
  // Keep the outermost: drop a block whose prefix extends another block's prefix.
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.prefix < b.prefix; });
  std::vector<DetectedBlock> outer;
  for (const auto& d : found) {
    const bool nested = std::any_of(found.begin(), found.end(), [&](const DetectedBlock& o) {
      return o.prefix.size() < d.prefix.size() && d.prefix.compare(0, o.prefix.size(), o.prefix) == 0;
    });
    if (!nested) outer.push_back(d);
  }
  return outer;
}

/// The settings a checkpoint cannot tell: stride, padding (-1: k/2), dilation, groups
/// (0: inferred from the shapes where they determine it, else 1), activation.
struct BlockSettings {
  std::int64_t stride = 1;                               ///< conv stride
  std::int64_t padding = -1;                             ///< zero padding; -1 = kernel_size / 2
  std::int64_t dilation = 1;                             ///< conv dilation
  std::int64_t groups = 0;                               ///< 0 = inferred from the shapes (else 1)
  ActivationKind activation = ActivationKind::identity;  ///< identity, relu or silu (not custom)
};

/// A float block of any type behind one interface (what the tools need).
class AnyBlock {
 public:
  virtual ~AnyBlock() = default;
  /// The wrapped block's reference class.
  virtual BlockType type() const = 0;
  /// The block's (and the deployed conv's) geometry.
  virtual const ConvGeometry& geometry() const = 0;
  /// Training forward of x [N, I, H, W] (batch statistics, running statistics updated);
  /// returns the block's output buffer, valid until the next forward_train.
  virtual const Tensor<float>& forward_train(const Tensor<float>& x) = 0;
  /// Eval forward with running statistics, no state change.
  virtual Tensor<float> forward_eval(const Tensor<float>& x) const = 0;
  /// Deploys, then runs the deployed convolution.
  virtual Tensor<float> forward_deploy(const Tensor<float>& x) const = 0;
  /// Backward of the last forward_train: accumulates parameter gradients and returns
  /// dL/dx (the block's buffer); throws state_error without a forward_train.
  virtual const Tensor<float>& backward(const Tensor<float>& grad_out) = 0;
  /// BN-folded kernel and bias of the deployed conv.
  virtual std::pair<Tensor<float>, Tensor<float>> folded() const = 0;
  /// Every tensor of the block (parameters and buffers), state-dict names without the prefix.
  virtual ParamList<float> parameters() = 0;
  /// The block's BatchNorms (for num_batches_tracked).
  virtual std::vector<engine::BatchNorm<float>*> batch_norms() = 0;
  /// Zeroes every gradient of the block.
  virtual void zero_grad() = 0;
};

namespace detail {
template <class B>
class AnyBlockOf final : public AnyBlock {
 public:
  AnyBlockOf(BlockType t, B b) : type_(t), b_(std::move(b)) {}
  BlockType type() const override { return type_; }
  const ConvGeometry& geometry() const override { return b_.geometry(); }
  const Tensor<float>& forward_train(const Tensor<float>& x) override { return b_.forward_train(x); }
  Tensor<float> forward_eval(const Tensor<float>& x) const override { return b_.forward_eval(x); }
  Tensor<float> forward_deploy(const Tensor<float>& x) const override { return b_.deploy().forward(x); }
  const Tensor<float>& backward(const Tensor<float>& g) override { return b_.backward(g); }
  std::pair<Tensor<float>, Tensor<float>> folded() const override { return b_.folded(); }
  ParamList<float> parameters() override { return b_.parameters(); }
  std::vector<engine::BatchNorm<float>*> batch_norms() override { return b_.batch_norms(); }
  void zero_grad() override { b_.zero_grad(); }

 private:
  BlockType type_;
  B b_;
};

// Calls make<Act>() with the activation type named by `kind`.
template <class F>
std::unique_ptr<AnyBlock> with_activation(ActivationKind kind, F&& make) {
  switch (kind) {
    case ActivationKind::identity: return make(Identity{});
    case ActivationKind::relu: return make(ReLU{});
    case ActivationKind::silu: return make(SiLU{});
    default: throw config_error("activation: only identity, relu and silu can be chosen at run time");
  }
}

// Names a block class template for load_block's factory.
template <template <class, class> class B>
struct Tag {
  template <class Act>
  using type = B<float, Act>;
};

inline const TensorEntry& need(const SafetensorsFile& f, const std::string& name, std::size_t rank) {
  if (!f.contains(name)) throw format_error(f.label() + ": tensor '" + name + "' is needed to rebuild the block");
  const auto& e = f.entry(name);
  if (e.shape.size() != rank)
    throw format_error(orepa::detail::cat(f.label(), ": tensor '", name, "' must have rank ", rank, ", got shape ",
                                          shape_str(e.shape)));
  return e;
}
}  // namespace detail

/// Rebuilds the block of type `type` stored under `prefix` (geometry from the tensor
/// shapes, the rest from `settings`) and loads its tensors (strictly: every expected
/// tensor present with its shape; other tensors under the prefix are ignored).
inline std::unique_ptr<AnyBlock> load_block(const SafetensorsFile& f, const std::string& prefix, BlockType type,
                                            const BlockSettings& settings = {}) {
  using detail::need;
  auto opts = [&](std::int64_t in, std::int64_t out, std::int64_t k, std::int64_t groups) {
    if (settings.groups > 0 && settings.groups != groups && groups > 0)
      throw config_error(orepa::detail::cat("groups: the checkpoint's shapes under '", prefix, "' imply ", groups,
                                            ", got --groups ", settings.groups));
    return ConvOptions(in, out, k)
        .stride(settings.stride)
        .padding(settings.padding)
        .dilation(settings.dilation)
        .groups(groups > 0 ? groups : (settings.groups > 0 ? settings.groups : 1));
  };
  // I / Ig from the depthwise weight [8I, 1, k, k] and the origin [O, Ig, k, k].
  auto groups_from = [&](std::int64_t I, std::int64_t Ig, const std::string& what) {
    if (Ig <= 0 || I % Ig != 0)
      throw format_error(orepa::detail::cat(f.label(), ": inconsistent channels under '", prefix, "' (", what, ")"));
    return I / Ig;
  };
  // Wraps block class B<float, Act> built from `c` with the run-time activation.
  auto make = [&](auto tag, const ConvOptions& c) {
    using Tag = decltype(tag);
    return detail::with_activation(settings.activation, [&](auto act) -> std::unique_ptr<AnyBlock> {
      using B = typename Tag::template type<decltype(act)>;
      return std::make_unique<detail::AnyBlockOf<B>>(type, B(c, act));
    });
  };
  auto dim = [&](const std::string& name, std::size_t axis) { return need(f, prefix + name, 4).shape[axis]; };
  std::unique_ptr<AnyBlock> block;
  switch (type) {
    case BlockType::OREPA: {
      const auto& o = need(f, prefix + "weight_orepa_origin", 4).shape;
      const auto I = dim("weight_orepa_gconv_dw", 0) / 8;
      const auto T = dim("weight_orepa_1x1_kxk_idconv1", 0);
      block = make(detail::Tag<OREPA>{},
                   opts(I, o[0], o[2], groups_from(I, o[1], "origin vs gconv_dw")).internal_channels(T));
      break;
    }
    case BlockType::OREPA_1x1: {
      const auto& o = need(f, prefix + "weight_or1x1_origin", 4).shape;
      block = make(detail::Tag<OREPA_1x1>{}, opts(o[1], o[0], o[2], 1));
      break;
    }
    case BlockType::OREPA_LargeConv: {
      const auto& o = need(f, prefix + "weight0.weight_orepa_origin", 4).shape;
      const auto I = dim("weight0.weight_orepa_gconv_dw", 0) / 8;
      std::int64_t L = 1;
      while (f.contains(prefix + "weight" + std::to_string(L) + ".weight_orepa_origin")) ++L;
      block = make(detail::Tag<OREPA_LargeConv>{},
                   opts(I, o[0], 2 * L + 1, groups_from(I, o[1], "weight0 origin vs gconv_dw")));
      break;
    }
    case BlockType::RepVGGBlock_OREPA: {
      const auto& o = need(f, prefix + "rbr_dense.weight_rbr_origin", 4).shape;
      const auto I = dim("rbr_dense.weight_rbr_gconv_dw", 0) / 8;
      block = make(detail::Tag<RepVGGBlock_OREPA>{}, opts(I, o[0], o[2], groups_from(I, o[1], "origin vs gconv_dw")));
      break;
    }
    case BlockType::ConvBN: {  // groups cannot be read off a plain conv weight: --groups (default 1)
      const auto& o = need(f, prefix + "conv.weight", 4).shape;
      const auto g = settings.groups > 0 ? settings.groups : 1;
      block = make(detail::Tag<ConvBN>{}, opts(checked_mul(o[1], g, "in_channels"), o[0], o[2], g));
      break;
    }
    case BlockType::DBB: {
      const auto& o = need(f, prefix + "dbb_origin.conv.weight", 4).shape;
      // I: the identity-based 1x1 is [I, Ig]; without it and without dbb_1x1 (g >= O) I == O;
      // otherwise from --groups.
      std::int64_t I, T;
      if (f.contains(prefix + "dbb_1x1_kxk.idconv1.weight")) {
        I = T = dim("dbb_1x1_kxk.idconv1.weight", 0);
      } else {
        T = dim("dbb_1x1_kxk.conv1.weight", 0);
        I = f.contains(prefix + "dbb_1x1.conv.weight") ? checked_mul(o[1], settings.groups > 0 ? settings.groups : 1)
                                                       : o[0];
      }
      block = make(detail::Tag<DBB>{}, opts(I, o[0], o[2], groups_from(I, o[1], "origin vs 1x1_kxk")).internal_channels(T));
      break;
    }
  }
  struct View {  // adapts the AnyBlock to load_state_dict's Block concept
    AnyBlock& b;
    ParamList<float> parameters() { return b.parameters(); }
    std::vector<engine::BatchNorm<float>*> batch_norms() { return b.batch_norms(); }
  } view{*block};
  load_state_dict(view, f, prefix, Unexpected::ignore);
  return block;
}

/// The names of the training-time tensors of a loaded block (parameters, buffers and
/// num_batches_tracked), under `prefix`.
inline std::vector<std::string> training_tensor_names(AnyBlock& b, const std::string& prefix) {
  std::vector<std::string> names;
  for (auto* p : b.parameters()) names.push_back(prefix + p->name);
  for (auto* bn : b.batch_norms()) names.push_back(prefix + bn->prefix() + "num_batches_tracked");
  return names;
}

}  // namespace orepa::io
