#pragma once
/// @file checkpoint.hpp
/// Whole checkpoints of the PyTorch reference: find every training-time block by its
/// tensor names (outermost block only when blocks nest), rebuild it with the structure
/// the tensors imply, and hand it over as an AnyBlock<float> (used by the orepa-convert
/// and orepa-run tools).

#include <algorithm>
#include <memory>
#include <optional>
#include <set>

#include "orepa/blocks/any_block.hpp"
#include "orepa/blocks/conv_bn.hpp"
#include "orepa/blocks/dbb.hpp"
#include "orepa/blocks/orepa.hpp"
#include "orepa/blocks/orepa_1x1.hpp"
#include "orepa/blocks/orepa_large.hpp"
#include "orepa/blocks/repvgg.hpp"
#include "orepa/core/linkage.hpp"
#include "orepa/io/state_dict.hpp"

namespace orepa::io {

/// The training-time block classes of the reference implementation.
enum class BlockType { OREPA, OREPA_1x1, OREPA_LargeConv, RepVGGBlock_OREPA, ConvBN, DBB };

/// The reference class name ("OREPA", "OREPA_1x1", ...).
OREPA_INLINE const char* to_string(BlockType t);
#if OREPA_DEFINITIONS
OREPA_INLINE const char* to_string(BlockType t) {
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
#endif  // OREPA_DEFINITIONS

/// Parses a reference class name; throws config_error listing the valid ones.
OREPA_INLINE BlockType parse_block_type(const std::string& s);
#if OREPA_DEFINITIONS
OREPA_INLINE BlockType parse_block_type(const std::string& s) {
  for (auto t : {BlockType::OREPA, BlockType::OREPA_1x1, BlockType::OREPA_LargeConv, BlockType::RepVGGBlock_OREPA,
                 BlockType::ConvBN, BlockType::DBB})
    if (s == to_string(t)) return t;
  throw config_error("block type: expected OREPA, OREPA_1x1, OREPA_LargeConv, RepVGGBlock_OREPA, ConvBN or DBB, got '" +
                     s + "'");
}
#endif  // OREPA_DEFINITIONS

/// The stem of the deployed tensors (`<prefix><stem>.weight` / `.bias`), SPEC section 6.
OREPA_INLINE const char* deployed_stem(BlockType t);
#if OREPA_DEFINITIONS
OREPA_INLINE const char* deployed_stem(BlockType t) {
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
#endif  // OREPA_DEFINITIONS

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
OREPA_INLINE std::vector<DetectedBlock> detect_blocks(const SafetensorsFile& file);
#if OREPA_DEFINITIONS
OREPA_INLINE std::vector<DetectedBlock> detect_blocks(const SafetensorsFile& file) {
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
#endif  // OREPA_DEFINITIONS

/// The settings a checkpoint cannot hold: they matter only to run a forward pass, never to
/// convert. Absent ones take the blocks' defaults (stride 1, autopad, dilation 1; groups
/// from the tensor shapes where they tell, else 1). Given ones are checked against what
/// the tensors show (a RepVGG block without identity path but with in == out channels was
/// trained with stride > 1; groups implied by the shapes).
struct BlockSettings {
  std::optional<std::int64_t> stride;                    ///< conv stride
  std::optional<std::int64_t> padding;                   ///< zero padding
  std::optional<std::int64_t> dilation;                  ///< conv dilation
  std::optional<std::int64_t> groups;                    ///< conv groups
  ActivationKind activation = ActivationKind::identity;  ///< identity, relu or silu (not custom)
};

/// What a loaded block is for: `forward` needs every setting a forward pass depends on
/// (an absent one that the tensors show must differ from its default is an error),
/// `convert` only needs the structure (the deployed kernel and bias do not depend on
/// stride, padding or dilation).
enum class LoadPurpose { forward, convert };

#if OREPA_DEFINITIONS
namespace detail {
// Calls make(act) with the activation object named by `kind`.
template <class F>
AnyBlock<float> with_activation(ActivationKind kind, F&& make) {
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
#endif  // OREPA_DEFINITIONS

/// The names of the training-time tensors of a block (parameters, buffers and
/// num_batches_tracked counters), under `prefix`.
template <class Block>
std::vector<std::string> training_tensor_names(const Block& b, const std::string& prefix) {
  const auto sd = b.state_dict();
  std::vector<std::string> names;
  for (const auto& n : sd.names()) names.push_back(prefix + n);
  return names;
}

/// The tensor-name namespaces a block of type `t` owns under its prefix: every tensor in
/// them belongs to the block, so one the block does not expect is an error (a converter
/// would otherwise leave a training-time tensor behind).
OREPA_INLINE std::vector<std::string> owned_namespaces(BlockType t);
#if OREPA_DEFINITIONS
OREPA_INLINE std::vector<std::string> owned_namespaces(BlockType t) {
  switch (t) {
    case BlockType::OREPA: return {"weight_orepa_", "id_tensor", "vector", "bn."};
    case BlockType::OREPA_1x1: return {"weight_or1x1_", "vector", "bn."};
    case BlockType::OREPA_LargeConv: return {"weight", "bn."};  // weight0., weight1., ...
    case BlockType::RepVGGBlock_OREPA: return {"rbr_dense.", "rbr_1x1.", "rbr_identity."};
    case BlockType::ConvBN: return {"conv.", "bn."};
    case BlockType::DBB: return {"dbb_origin.", "dbb_1x1.", "dbb_avg.", "dbb_1x1_kxk."};
  }
  return {};
}
#endif  // OREPA_DEFINITIONS

/// Rebuilds the float block of type `type` stored under `prefix` and loads its tensors.
///
/// The structure comes from the tensors alone: channels, kernel size and groups from the
/// shapes; which optional parts the block has from the tensors present (RepVGG's
/// `rbr_identity` and the rows of its `vector`, DBB's identity-based or plain 1x1 and its
/// `dbb_1x1` branch, the internal channels of the 1x1 -> k x k rows, OREPA_LargeConv's
/// depth). `settings` supply what a checkpoint cannot hold; see BlockSettings and
/// LoadPurpose. Loading is strict: every expected tensor present with its shape, and no
/// unexpected tensor in the block's own namespaces (owned_namespaces(); tensors of other
/// modules under the prefix are left alone). Throws format_error for tensors that do not
/// make a block and config_error for settings that contradict them, naming both.
/// (A template only so that a translation unit that never calls it does not instantiate
/// every block type with every activation: a quarter of the parse time of orepa.hpp.
/// orepa::precompiled holds load_block<>, so a program linking it does not parse the body.)
template <class = void>
AnyBlock<float> load_block(const SafetensorsFile& f, const std::string& prefix, BlockType type,
                           const BlockSettings& settings = {}, LoadPurpose purpose = LoadPurpose::forward);
#if OREPA_DEFINITIONS
template <class>
AnyBlock<float> load_block(const SafetensorsFile& f, const std::string& prefix, BlockType type,
                           const BlockSettings& settings, LoadPurpose purpose) {
  using detail::need;
  const std::string where = "'" + prefix + "' (" + to_string(type) + ") in " + f.label();
  auto shape = [&](const std::string& name, std::size_t rank) { return need(f, prefix + name, rank).shape; };
  // Groups from the shapes: `whole` channels seen per group as `per_group`.
  auto groups_of = [&](std::int64_t whole, std::int64_t per_group, const char* what) {
    if (per_group <= 0 || whole <= 0 || whole % per_group != 0)
      throw format_error(orepa::detail::cat(f.label(), ": inconsistent channels under '", prefix, "' (", what, ": ",
                                            whole, " vs ", per_group, " per group)"));
    const std::int64_t g = whole / per_group;
    if (settings.groups && *settings.groups != g)
      throw config_error(orepa::detail::cat("groups: the tensors under ", where, " imply groups ", g, " (", what,
                                            "), got ", *settings.groups));
    return g;
  };
  // The shared options: channels and kernel from the tensors, the rest from `settings`.
  auto base = [&](std::int64_t in, std::int64_t out, std::int64_t k, std::int64_t g) {
    ConvOptions o(in, out, k);
    o.groups(g).padding(settings.padding);
    if (settings.stride) o.stride(*settings.stride);
    if (settings.dilation) o.dilation(*settings.dilation);
    return o;
  };
  // Block class B<float, Act> built from options `c` with the run-time activation.
  auto make = [&](auto tag, const auto& c) {
    using Tag = decltype(tag);
    return detail::with_activation(settings.activation, [&](auto act) -> AnyBlock<float> {
      using B = typename Tag::template type<decltype(act)>;
      return B(c, act);
    });
  };
  std::optional<AnyBlock<float>> block;
  switch (type) {
    case BlockType::OREPA: {
      const auto o = shape("weight_orepa_origin", 4);
      const auto I = shape("weight_orepa_gconv_dw", 4)[0] / 8;
      const auto T = shape("weight_orepa_1x1_kxk_idconv1", 4)[0];
      block = make(detail::Tag<OREPA>{},
                   OrepaOptions(base(I, o[0], o[2], groups_of(I, o[1], "gconv_dw vs origin"))).internal_channels(T));
      break;
    }
    case BlockType::OREPA_1x1: {
      const auto o = shape("weight_or1x1_origin", 4);
      block = make(detail::Tag<OREPA_1x1>{}, base(o[1], o[0], o[2], groups_of(o[1], o[1], "origin")));
      break;
    }
    case BlockType::OREPA_LargeConv: {
      const auto o = shape("weight0.weight_orepa_origin", 4);
      const auto I = shape("weight0.weight_orepa_gconv_dw", 4)[0] / 8;
      std::int64_t L = 1;
      while (f.contains(prefix + "weight" + std::to_string(L) + ".weight_orepa_origin")) ++L;
      block = make(detail::Tag<OREPA_LargeConv>{},
                   base(I, o[0], 2 * L + 1, groups_of(I, o[1], "weight0 gconv_dw vs origin")));
      break;
    }
    case BlockType::RepVGGBlock_OREPA: {
      const auto o = shape("rbr_dense.weight_rbr_origin", 4);
      const auto I = shape("rbr_dense.weight_rbr_gconv_dw", 4)[0] / 8;
      const bool identity = f.contains(prefix + "rbr_identity.weight") || f.contains(prefix + "rbr_identity.bias") ||
                            f.contains(prefix + "rbr_identity.running_mean") ||
                            f.contains(prefix + "rbr_identity.running_var");
      const auto rows = shape("rbr_dense.vector", 2)[0];
      if (rows != (identity ? 6 : 5))
        throw format_error(orepa::detail::cat(f.label(), ": '", prefix, "rbr_dense.vector' has ", rows,
                                              " rows, but a block ", identity ? "with" : "without", " '", prefix,
                                              "rbr_identity.*' tensors has ", identity ? 6 : 5));
      const bool same_width = I == o[0];
      if (settings.stride && identity && *settings.stride != 1)
        throw config_error(orepa::detail::cat("stride: ", where, " has the identity path '", prefix,
                                              "rbr_identity.*', which the reference builds at stride 1 only; got ",
                                              *settings.stride));
      if (same_width && !identity && settings.stride.value_or(purpose == LoadPurpose::forward ? 1 : 0) == 1)
        throw config_error(orepa::detail::cat(
            "stride: ", where, " has ", I, " input and output channels but no '", prefix, "rbr_identity.*' tensors and a ",
            rows, "-row '", prefix, "rbr_dense.vector': it was trained with a stride > 1; ",
            settings.stride ? "got 1" : "give the stride it was trained with"));
      std::int64_t T = I;  // the identity-based 1x1, or a free conv1 of any width
      if (f.contains(prefix + "rbr_dense.weight_rbr_1x1_kxk_conv1")) T = shape("rbr_dense.weight_rbr_1x1_kxk_conv1", 4)[0];
      const auto opts = RepVGGOptions(base(I, o[0], o[2], groups_of(I, o[1], "gconv_dw vs origin")))
                            .identity(identity)
                            .internal_channels(T);
      block = make(detail::Tag<RepVGGBlock_OREPA>{}, opts);
      break;
    }
    case BlockType::ConvBN: {  // groups cannot be read off a plain conv weight: settings.groups (default 1)
      const auto o = shape("conv.weight", 4);
      const auto g = settings.groups.value_or(1);
      block = make(detail::Tag<ConvBN>{}, base(checked_mul(o[1], g, "in_channels"), o[0], o[2], g));
      break;
    }
    case BlockType::DBB: {
      const auto o = shape("dbb_origin.conv.weight", 4);
      // T from the 1x1 of dbb_1x1_kxk (identity-based exactly when T == I), groups from
      // the k x k conv after it ([O, T/g, k, k]), I from the origin's I/g.
      const bool id_based = f.contains(prefix + "dbb_1x1_kxk.idconv1.weight");
      const auto T = shape(id_based ? "dbb_1x1_kxk.idconv1.weight" : "dbb_1x1_kxk.conv1.weight", 4)[0];
      const auto g = groups_of(T, shape("dbb_1x1_kxk.conv2.weight", 4)[1], "dbb_1x1_kxk conv1 vs conv2");
      const auto I = checked_mul(o[1], g, "in_channels");
      if (id_based != (T == I))
        throw format_error(orepa::detail::cat(f.label(), ": '", prefix, "dbb_1x1_kxk.", id_based ? "idconv1" : "conv1",
                                              ".weight' has ", T, " output channels for ", I,
                                              " input channels; the identity-based idconv1 exists exactly when they agree"));
      const bool has_1x1 = f.contains(prefix + "dbb_1x1.conv.weight");
      if (has_1x1 != (g < o[0]))
        throw format_error(orepa::detail::cat(f.label(), ": under '", prefix, "' the shapes give groups ", g, " and ",
                                              o[0], " output channels, so the block ", g < o[0] ? "needs" : "has no",
                                              " 'dbb_1x1.*' branch, but it is ", has_1x1 ? "there" : "missing"));
      block = make(detail::Tag<DBB>{}, DbbOptions(base(I, o[0], o[2], g)).internal_channels(T));
      break;
    }
  }
  load_state_dict(*block, f, prefix, Unexpected::ignore);
  const auto names = training_tensor_names(*block, prefix);
  const std::set<std::string> expected(names.begin(), names.end());
  std::vector<std::string> stray;
  for (const auto& name : f.names())
    for (const auto& ns : owned_namespaces(type))
      if (name.compare(0, prefix.size() + ns.size(), prefix + ns) == 0 && !expected.count(name)) {
        stray.push_back(name);
        break;
      }
  if (!stray.empty()) {
    std::string list;
    for (const auto& n : stray) list += (list.empty() ? "" : ", ") + n;
    throw format_error(orepa::detail::cat(f.label(), ": ", stray.size(), " tensor(s) under ", where,
                                          " do not belong to the block it forms: ", list));
  }
  return std::move(*block);
}
#endif  // OREPA_DEFINITIONS

}  // namespace orepa::io
