#pragma once
/// @file model.hpp (yolo)
/// `yolo::Model<S>`: a YOLOv5 detection network built from its model yaml (config.hpp),
/// trained, evaluated and deployed as one graph; `yolo::DeployedModel<S>` its deployed
/// form (fp32, bf16 or int8, thread-safe).
///
///   auto cfg = yolo::read_model_config("yolov5n-orepa.yaml");
///   yolo::Model<float> model(cfg, yolo::ModelOptions<float>().blocks("orepa"));
///   std::vector<Tensor<float>> maps = model.forward_train(images);   // raw [N, na, H, W, 5 + nc]
///   ... loss ..., model.backward(loss.grad);                           // every parameter's gradient
///   yolo::DetectOutput<float> out = model.forward_eval(images);        // decoded [N, rows, 5 + nc]
///   yolo::DeployedModel<float> fast = model.deploy();                  // every conv one fused primitive
///
/// How a yaml becomes a graph (YOLOv5's parse_model): each row's module name resolves
/// through a ModuleRegistry; repeats scale by depth_multiple (round half to even, at least
/// 1, only when > 1), output channels by width_multiple rounded up to a multiple of 8;
/// `from` gives each layer's inputs, and the output of every layer a later layer reads is
/// kept during a forward, nothing else. The block maker (ModelOptions::blocks) decides
/// what every `Conv` becomes, inside C3, Bottleneck and SPPF too; `OREPA` rows always
/// build the OREPA family (with ConvBN where OREPA cannot: even kernels, a padding other
/// than k / 2). Every BatchNorm, OREPA's inner ones included, has YOLOv5's eps 1e-3 and
/// momentum 0.03 (initialize_weights), in training, eval and folding.
///
/// Tensor names are YOLOv5's state-dict names: `model.<layer>.<module path>`, e.g.
/// `model.2.m.0.cv1.bn.running_var`, `model.24.m.1.weight`, `model.24.anchors`.
/// load_model() builds the network of a yaml for a checkpoint: each convolution slot's
/// block type comes from the checkpoint's tensor names (recipes that replace convs inside
/// C3 / SPPF in Python leave no trace in the yaml), then the checkpoint loads strictly.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "orepa/io/checkpoint.hpp"
#include "orepa/io/safetensors.hpp"
#include "orepa/nn/sequential.hpp"
#include "orepa/yolo/config.hpp"
#include "orepa/yolo/modules.hpp"

namespace orepa::yolo {

/// YOLOv5's BatchNorm epsilon (initialize_weights; not in the state dict).
inline constexpr double bn_eps = 1e-3;
/// YOLOv5's BatchNorm momentum (initialize_weights; not in the state dict).
inline constexpr double bn_momentum = 0.03;

/// YOLOv5's make_divisible: x rounded up to a multiple of `divisor`.
inline std::int64_t make_divisible(double x, std::int64_t divisor = 8) {
  return std::int64_t(std::ceil(x / double(divisor))) * divisor;
}
/// Most repeats a row may have after depth scaling (as before it: config.hpp).
inline constexpr std::int64_t max_repeats = 1000;

/// YOLOv5's repeat scaling: n > 1 becomes max(round(n * depth_multiple), 1) (Python's
/// round, half to even); n = 1 stays 1. Throws config_error when the result exceeds
/// max_repeats.
inline std::int64_t scaled_repeats(std::int64_t n, double depth_multiple) {
  if (n <= 1) return n;
  const double r = std::nearbyint(double(n) * depth_multiple);
  if (!(r <= double(max_repeats)))
    throw config_error(orepa::detail::cat("repeats ", n, " x depth_multiple ", depth_multiple, " = ", r, " exceed ",
                                          max_repeats));
  return std::max<std::int64_t>(std::int64_t(r), 1);
}

/// The block maker of a YOLO model by name: what every `Conv` slot becomes. All use SiLU.
///   - "convbn": ConvBN (plain YOLOv5);
///   - "orepa": OREPA_1x1 for k = 1, OREPA for odd k >= 3 (OREPA_LargeConv for k >= 7),
///     ConvBN where OREPA cannot be built (even k such as the 6x6 stem, padding != k / 2);
///   - "dbb": DBB for odd k >= 3 with padding k / 2, else ConvBN;
///   - "repvgg": RepVGGBlock_OREPA (SiLU) for 3x3 with padding 1 and one group, else ConvBN.
/// Throws config_error for another name.
template <class S = float>
BlockMaker<S> block_maker(const std::string& name) {
  const auto centred = [](const ConvOptions& o) {
    const auto k = o.kernel_size();
    return k % 2 == 1 && o.geometry().padding == o.dilation() * (k - 1) / 2;
  };
  const auto convbn = [](const ConvOptions& o) -> AnyBlock<S> { return ConvBN<S, SiLU>(o); };
  if (name == "convbn" || name == "conv") return convbn;
  if (name == "orepa")
    return [=](const ConvOptions& o) -> AnyBlock<S> {
      if (!centred(o)) return convbn(o);
      return yolo_conv<S, SiLU>(ConvOptions(o).padding(std::nullopt));
    };
  if (name == "dbb")
    return [=](const ConvOptions& o) -> AnyBlock<S> {
      if (o.kernel_size() < 3 || !centred(o)) return convbn(o);
      return DBB<S, SiLU>(DbbOptions(o));
    };
  if (name == "repvgg")
    return [=](const ConvOptions& o) -> AnyBlock<S> {
      if (o.kernel_size() != 3 || o.geometry().padding != 1 || o.groups() != 1 || o.dilation() != 1) return convbn(o);
      return RepVGGBlock_OREPA<S, SiLU>(RepVGGOptions(o));
    };
  throw config_error("yolo::block_maker: unknown block family '" + name + "' (orepa, convbn, dbb or repvgg)");
}

/// `maker` with an initialisation for training from scratch at the learning rates tuned
/// for plain convolutions: each block of branches (OREPA, OREPA_1x1, OREPA_LargeConv) has
/// its kernel scaled once after it is made (AnyBlock::scale_kernel, exact), so that its
/// BN-folded kernel has the mean squared norm per output channel of PyTorch's default
/// conv initialisation, 1/3 (kaiming_uniform, a = sqrt(5)). Other blocks (ConvBN, DBB,
/// RepVGG) are left as made.
///
/// Why: a BatchNorm follows the kernel, so the output hardly depends on the kernel's
/// scale, but an SGD step turns the kernel by about lr / |kernel|^2. The reference
/// initialisation (kaiming a = 0, the 1x1 branch at scale 1) gives OREPA's 3x3 kernel
/// ~11x and OREPA_1x1's ~3.8x that squared norm, so at one learning rate they turn that
/// much slower than ConvBN's kernels.
template <class S = float>
BlockMaker<S> norm_matched_init(BlockMaker<S> maker) {
  return [maker = std::move(maker)](const ConvOptions& o) -> AnyBlock<S> {
    AnyBlock<S> b = maker(o);
    const Tensor<S> k = b.folded().weight;
    double sq = 0;
    for (std::int64_t j = 0; j < k.numel(); ++j) sq += double(k[j]) * double(k[j]);
    const double per_channel = sq / double(k.size(0));
    if (per_channel > 0) b.scale_kernel(S(std::sqrt((1.0 / 3.0) / per_channel)));  // an all-zero kernel stays
    return b;
  };
}

/// What a module factory is given for one yaml row.
template <class S>
struct ModuleSpec {
  const ModelConfig* config = nullptr;     ///< the whole model file
  std::size_t index = 0;                   ///< the layer's index
  const LayerRow* row = nullptr;           ///< its row
  std::vector<std::int64_t> in_channels;   ///< channels of each input (one per `from`)
  std::int64_t number = 1;                 ///< repeats after depth scaling
  BlockMaker<S> maker;                     ///< what a `Conv` slot becomes (ConvOptions::name(): its path in the module)
  BlockMaker<S> orepa;                     ///< what an `OREPA` row's conv becomes
  std::uint64_t seed = 0;                  ///< the layer's seed

  /// "file: layer i (Module)", for messages.
  std::string where() const {
    return orepa::detail::cat(config ? config->source : "<model>", ": layer ", index, " (", row ? row->module : "", ")");
  }
  /// Argument j, or nullptr when the row has fewer.
  const Arg* arg(std::size_t j) const { return j < row->args.size() ? &row->args[j] : nullptr; }
  /// Argument j as an integer, `fallback` when absent or None.
  std::int64_t int_arg(std::size_t j, std::int64_t fallback) const {
    const Arg* a = arg(j);
    return a && !a->is_none() ? a->as_int(orepa::detail::cat(where(), " argument ", j)) : fallback;
  }
  /// The single input's channels (config_error when the row has several inputs).
  std::int64_t input_channels() const {
    if (in_channels.size() != 1) throw config_error(where() + ": takes one input, `from` lists " + std::to_string(in_channels.size()));
    return in_channels[0];
  }
  /// Output channels from argument 0: scaled by width_multiple and made divisible by 8
  /// (YOLOv5's rule for the convolution-like modules).
  std::int64_t scaled_out_channels() const {
    if (!arg(0)) throw config_error(where() + ": needs its output channels as the first argument");
    const double c2 = arg(0)->as_number(where() + " argument 0 (output channels)");
    if (!(c2 >= 1)) throw config_error(where() + ": output channels must be >= 1, got " + arg(0)->describe());
    const double scaled = c2 * config->width_multiple;
    if (!(scaled <= double(max_tensor_bytes)))  // no tensor of that many channels can exist
      throw config_error(orepa::detail::cat(where(), ": output channels ", arg(0)->describe(), " x width_multiple ",
                                            config->width_multiple, " = ", scaled, " is too large"));
    return make_divisible(scaled);
  }
  /// Throws config_error unless the row has between `lo` and `hi` arguments.
  void require_args(std::size_t lo, std::size_t hi, const char* signature) const {
    const std::size_t n = row->args.size();
    if (n < lo || n > hi)
      throw config_error(orepa::detail::cat(where(), ": expected arguments ", signature, ", got ", n, " (",
                                            Arg{Arg::Kind::list, 0, "", row->args}.describe(), ")"));
  }
};

/// What a module factory builds: a layer (any module of the layer concept, one input), or
/// one of the graph's own multi-input modules.
template <class S>
struct ModuleBuild {
  std::optional<AnyBlock<S>> layer;             ///< a one-input layer
  bool concat = false;                          ///< a channel concatenation of the inputs
  bool detect = false;                          ///< the Detect head (built by the model: it needs the strides)
  std::int64_t detect_classes = 0;              ///< Detect: classes
  std::vector<std::vector<double>> detect_anchors;  ///< Detect: per level (w, h) pixel pairs
  std::int64_t out_channels = 0;                ///< output channels (not for Detect)
};

/// Builds a module from its spec.
template <class S>
using ModuleFactory = std::function<ModuleBuild<S>(const ModuleSpec<S>&)>;

/// Module names of model yamls and their factories. builtin() has Conv, OREPA,
/// OREPA_1x1, C3, Bottleneck, SPPF, nn.Upsample, Concat and Detect; add() registers a
/// module of your own (any layer: one input, the layer members of blocks/block.hpp).
template <class S>
class ModuleRegistry {
 public:
  /// An empty registry.
  ModuleRegistry() = default;
  /// The built-in modules.
  static ModuleRegistry builtin();

  /// Registers `factory` under `name` (replacing one of that name). `repeats_itself`:
  /// the module takes the row's repeats as its own argument (C3); otherwise a row with
  /// number > 1 builds that many modules in a row (YOLOv5's nn.Sequential, names `i.j.`).
  ModuleRegistry& add(const std::string& name, ModuleFactory<S> factory, bool repeats_itself = false) {
    if (name.empty()) throw config_error("ModuleRegistry::add: empty module name");
    entries_[name] = Entry{std::move(factory), repeats_itself};
    return *this;
  }
  /// True when `name` is registered.
  bool contains(const std::string& name) const { return entries_.count(name) > 0; }
  /// The registered names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (const auto& [k, e] : entries_) n.push_back(k);
    return n;
  }
  /// The factory of `name` and whether it repeats itself; config_error naming `where`
  /// and listing the known names otherwise.
  std::pair<const ModuleFactory<S>*, bool> at(const std::string& name, const std::string& where) const {
    auto it = entries_.find(name);
    if (it == entries_.end()) {
      std::string known;
      for (const auto& n : names()) known += (known.empty() ? "" : ", ") + n;
      throw config_error(where + ": unknown module '" + name + "' (known: " + known +
                         "; register your own with ModuleRegistry::add)");
    }
    return {&it->second.factory, it->second.repeats_itself};
  }

 private:
  struct Entry {
    ModuleFactory<S> factory;
    bool repeats_itself = false;
  };
  std::map<std::string, Entry> entries_;
};

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {

// A conv slot row [c2, k = 1, s = 1, p = None, g = 1, d = 1, act = True] built by `maker`.
template <class S>
ModuleBuild<S> conv_row(const ModuleSpec<S>& s, const BlockMaker<S>& maker) {
  s.require_args(1, 7, "[c2, k, s, p, g, d, act]");
  const std::int64_t c1 = s.input_channels(), c2 = s.scaled_out_channels();
  ConvOptions o(c1, c2, s.int_arg(1, 1));
  o.stride(s.int_arg(2, 1)).groups(s.int_arg(4, 1)).dilation(s.int_arg(5, 1)).seed(s.seed);
  if (const Arg* p = s.arg(3); p && !p->is_none()) o.padding(p->as_int(s.where() + " argument 3 (padding)"));
  if (const Arg* act = s.arg(6); act && !(act->kind == Arg::Kind::boolean && act->number != 0))
    throw config_error(s.where() + ": only act=True (SiLU) is supported, got " + act->describe());
  ModuleBuild<S> b;
  b.layer.emplace(maker(o));
  b.out_channels = c2;
  return b;
}

}  // namespace detail
/// \endcond

template <class S>
ModuleRegistry<S> ModuleRegistry<S>::builtin() {
  ModuleRegistry r;
  r.add("Conv", [](const ModuleSpec<S>& s) { return detail::conv_row(s, s.maker); });
  r.add("OREPA", [](const ModuleSpec<S>& s) { return detail::conv_row(s, s.orepa); });
  r.add("OREPA_1x1", [](const ModuleSpec<S>& s) {
    if (s.int_arg(1, 1) != 1) throw config_error(s.where() + ": OREPA_1x1 has kernel size 1");
    return detail::conv_row(s, s.orepa);
  });
  r.add(
      "C3",
      [](const ModuleSpec<S>& s) {
        s.require_args(1, 4, "[c2, shortcut, g, e]");
        const std::int64_t c2 = s.scaled_out_channels();
        const bool shortcut = s.arg(1) ? s.arg(1)->as_bool(s.where() + " argument 1 (shortcut)") : true;
        if (s.int_arg(2, 1) != 1) throw config_error(s.where() + ": C3 with groups != 1 is not supported");
        const double e = s.arg(3) ? s.arg(3)->as_number(s.where() + " argument 3 (e)") : 0.5;
        ModuleBuild<S> b;
        b.layer.emplace(C3<S>(s.input_channels(), c2, s.number, shortcut, e, s.seed, s.maker));
        b.out_channels = c2;
        return b;
      },
      true);
  r.add("Bottleneck", [](const ModuleSpec<S>& s) {
    s.require_args(1, 4, "[c2, shortcut, g, e]");
    const std::int64_t c2 = s.scaled_out_channels();
    const bool shortcut = s.arg(1) ? s.arg(1)->as_bool(s.where() + " argument 1 (shortcut)") : true;
    if (s.int_arg(2, 1) != 1) throw config_error(s.where() + ": Bottleneck with groups != 1 is not supported");
    const double e = s.arg(3) ? s.arg(3)->as_number(s.where() + " argument 3 (e)") : 0.5;
    ModuleBuild<S> b;
    b.layer.emplace(Bottleneck<S>(s.input_channels(), c2, shortcut, e, s.seed, s.maker));
    b.out_channels = c2;
    return b;
  });
  r.add("SPPF", [](const ModuleSpec<S>& s) {
    s.require_args(1, 2, "[c2, k]");
    const std::int64_t c2 = s.scaled_out_channels();
    ModuleBuild<S> b;
    b.layer.emplace(SPPF<S>(s.input_channels(), c2, s.int_arg(1, 5), s.seed, s.maker));
    b.out_channels = c2;
    return b;
  });
  r.add("nn.Upsample", [](const ModuleSpec<S>& s) {
    s.require_args(2, 3, "[size, scale_factor, mode]");
    if (!s.arg(0)->is_none()) throw config_error(s.where() + ": only size None (a scale factor) is supported");
    if (s.arg(2) && s.arg(2)->as_string(s.where() + " argument 2 (mode)") != "nearest")
      throw config_error(s.where() + ": only mode 'nearest' is supported, got " + s.arg(2)->describe());
    ModuleBuild<S> b;
    b.layer.emplace(Upsample<S>(s.int_arg(1, 2)));
    b.out_channels = s.input_channels();
    return b;
  });
  r.add("Concat", [](const ModuleSpec<S>& s) {
    s.require_args(0, 1, "[dimension]");
    if (s.int_arg(0, 1) != 1) throw config_error(s.where() + ": only dimension 1 (channels) is supported");
    if (s.in_channels.size() < 2) throw config_error(s.where() + ": Concat needs at least two inputs in `from`");
    ModuleBuild<S> b;
    b.concat = true;
    for (auto c : s.in_channels) b.out_channels += c;
    return b;
  });
  r.add("Detect", [](const ModuleSpec<S>& s) {
    s.require_args(2, 3, "[nc, anchors]");
    ModuleBuild<S> b;
    b.detect = true;
    b.detect_classes = s.int_arg(0, 80);
    const Arg& a = *s.arg(1);
    const std::string what = s.where() + " argument 1 (anchors)";
    if (a.kind != Arg::Kind::list) throw config_error(what + ": expected per level a list of (w, h) pixel pairs");
    for (const auto& level : a.items) {
      if (level.kind != Arg::Kind::list) throw config_error(what + ": expected per level a list of (w, h) pixel pairs");
      std::vector<double> v;
      for (const auto& x : level.items) v.push_back(x.as_number(what));
      b.detect_anchors.push_back(std::move(v));
    }
    if (b.detect_anchors.size() != s.in_channels.size())
      throw config_error(orepa::detail::cat(what, ": ", b.detect_anchors.size(), " anchor levels for ",
                                            s.in_channels.size(), " inputs"));
    return b;
  });
  return r;
}

/// How a Model is built.
template <class S>
struct ModelOptions {
  /// @fn maker(const BlockMaker<S>&)
  /// @brief Sets maker(); returns the options for chaining.
  /// @fn orepa_maker(const BlockMaker<S>&)
  /// @brief Sets orepa_maker(); returns the options for chaining.
  /// @fn registry(const ModuleRegistry<S>&)
  /// @brief Sets registry(); returns the options for chaining.
  /// @fn seed(const std::uint64_t&)
  /// @brief Sets seed(); returns the options for chaining.
  /// @fn classes(const std::optional<std::int64_t>&)
  /// @brief Sets classes(); returns the options for chaining.
  /// @fn bn_eps(const double&)
  /// @brief Sets bn_eps(); returns the options for chaining.
  /// @fn bn_momentum(const double&)
  /// @brief Sets bn_momentum(); returns the options for chaining.

  /// The options object (what the setters return).
  ModelOptions& self() { return *this; }
  /// Sets maker() to the named family (block_maker(): orepa, convbn, dbb, repvgg).
  ModelOptions& blocks(const std::string& family) { return maker(block_maker<S>(family)); }

  /// What every `Conv` slot becomes (default ConvBN, plain YOLOv5). It sees
  /// ConvOptions::name() as the slot's full tensor prefix ("model.2.m.0.cv1.").
  OREPA_OPTION(BlockMaker<S>, maker) = block_maker<S>("convbn");
  /// What the convolutions of `OREPA` / `OREPA_1x1` rows become (default the OREPA family).
  OREPA_OPTION(BlockMaker<S>, orepa_maker) = block_maker<S>("orepa");
  /// The module names (default ModuleRegistry::builtin()).
  OREPA_OPTION(ModuleRegistry<S>, registry) = ModuleRegistry<S>::builtin();
  /// Seed of the initialisation (default 0).
  OREPA_OPTION(std::uint64_t, seed) = 0;
  /// Classes, overriding the yaml's nc (YOLOv5's Model(cfg, nc=...)).
  OREPA_OPTION(std::optional<std::int64_t>, classes);
  /// Every BatchNorm's epsilon (default YOLOv5's 1e-3).
  OREPA_OPTION(double, bn_eps) = yolo::bn_eps;
  /// Every BatchNorm's momentum (default YOLOv5's 0.03).
  OREPA_OPTION(double, bn_momentum) = yolo::bn_momentum;
};

template <class S>
class DeployedModel;

/// A YOLOv5 detection network built from a model yaml (see the file comment).
template <class S = float>
class Model : public ModuleTensors<Model<S>, S> {
 public:
  /// Builds the network of `cfg`. Throws config_error naming the file and layer for an
  /// unknown module, arguments of the wrong kind or arity, a missing Detect head.
  explicit Model(ModelConfig cfg, const ModelOptions<S>& opts = ModelOptions<S>())
      : cfg_(std::move(cfg)) {
    if (opts.classes()) {
      const std::int64_t nc = *opts.classes();
      if (nc < 1) throw config_error(orepa::detail::cat("yolo::Model: classes must be >= 1, got ", nc));
      for (auto& row : cfg_.layers)
        if (row.module == "Detect" && !row.args.empty()) row.args[0] = Arg{Arg::Kind::number, double(nc), "", {}};
      cfg_.nc = nc;
    }
    build(opts);
  }
  Model(const Model&) = delete;  // never copied silently: std::move it, or clone() for a copy
  Model& operator=(const Model&) = delete;
  /// Move constructor.
  Model(Model&&) noexcept = default;
  /// Move assignment.
  Model& operator=(Model&&) noexcept = default;

  /// A deep copy (every layer cloned), nothing saved for backward.
  Model clone() const { return Model(*this, orepa::detail::CloneTag{}); }

  /// "DetectionModel".
  std::string type_name() const { return "DetectionModel"; }
  /// The model file (with the classes option applied).
  const ModelConfig& config() const { return cfg_; }
  /// Number of layers (yaml rows).
  std::size_t size() const { return nodes_.size(); }
  /// The module name of layer i (its yaml row's).
  const std::string& module_name(std::size_t i) const { return cfg_.layers.at(i).module; }
  /// Layer i, when it is a one-input layer (config_error for Concat and Detect).
  AnyBlock<S>& layer(std::size_t i) {
    if (i >= nodes_.size() || !nodes_[i].layer)
      throw config_error(orepa::detail::cat("yolo::Model::layer: layer ", i, " is not a one-input layer"));
    return *nodes_[i].layer;
  }
  /// The Detect head.
  Detect<S>& detect() { return *detect_; }
  /// The Detect head, read-only.
  const Detect<S>& detect() const { return *detect_; }
  /// The strides of the detection levels (8, 16, 32 for YOLOv5's P3-P5).
  const std::vector<double>& strides() const { return detect_->strides(); }
  /// Classes.
  std::int64_t classes() const { return detect_->classes(); }
  /// Image channels the network reads.
  std::int64_t input_channels() const { return cfg_.input_channels; }
  /// The indices of the layers whose outputs a later layer reads (YOLOv5's `save`).
  const std::vector<std::size_t>& saved_layers() const { return save_; }

  /// Training forward of images x [N, ch, H, W] (H, W multiples of the largest stride):
  /// the raw maps [N, na, H / s, W / s, 5 + nc] of the Detect head.
  std::vector<Tensor<S>> forward_train(ConstTensorView<S> x) {
    check_input(x.sizes(), "forward_train");
    // Float trains channels-last from the image on: the fused conv + BN + activation
    // pipelines then run on NHWC with no reorder between layers.
    input_format_ = x.memory_format();
    Tensor<S> nhwc;
    if constexpr (std::is_same_v<S, float>) x = in_format(x, MemoryFormat::channels_last, nhwc);
    std::vector<Tensor<S>> raw;
    run(x, [&](std::size_t i, const std::vector<ConstTensorView<S>>& in, Tensor<S>& out) {
      Node& n = nodes_[i];
      if (n.layer) out = n.layer->forward_train(in[0]);
      else if (n.concat) concat_into(in, n.cat, out);
      else raw = detect_->forward_train(in);
    });
    has_forward_ = true;
    return raw;
  }
  /// Whether backward computes d loss / d image (default true). A trainer sets false:
  /// the layers reading the image then skip their backward-data convolution (YOLOv5n's
  /// 6x6 stem: ~6 % of a training step) and backward returns an empty tensor.
  void set_input_grad(bool needed) {
    input_grad_ = needed;
    for (auto& n : nodes_)
      if (n.layer && std::find(n.from.begin(), n.from.end(), -1) != n.from.end()) n.layer->set_input_grad(needed);
  }
  /// Whether backward computes d loss / d image.
  bool input_grad() const { return input_grad_; }
  /// Backward of the last forward_train for d loss / d raw map (one per level): every
  /// parameter's gradient accumulated; returns d loss / d x (in x's memory format; empty
  /// when input_grad() is false).
  Tensor<S> backward(const std::vector<Tensor<S>>& grad_maps) {
    std::vector<ConstTensorView<S>> v(grad_maps.begin(), grad_maps.end());
    return backward(v);
  }
  /// The same for views of the gradients.
  Tensor<S> backward(const std::vector<ConstTensorView<S>>& grad_maps) {
    if (!has_forward_) throw state_error("yolo::Model::backward: call forward_train first");
    const std::size_t L = nodes_.size();
    std::vector<Tensor<S>> grads(L);
    Tensor<S> dx;
    auto give = [&](std::int64_t j, Tensor<S> g) {
      if (j < 0 && !input_grad_) return;
      Tensor<S>& slot = j < 0 ? dx : grads[std::size_t(j)];
      if (slot.empty()) slot = std::move(g);
      else {
        if (slot.is_shared()) slot = slot.to(slot.memory_format());  // a module's buffer: sum into a copy
        orepa::detail::yolo::add_inplace(slot, g, "yolo::Model::backward gradient sum");
      }
    };
    for (std::size_t i = L; i-- > 0;) {
      Node& n = nodes_[i];
      if (i == detect_index_) {
        auto d = detect_->backward(grad_maps);
        for (std::size_t k = 0; k < d.size(); ++k) give(n.from[k], std::move(d[k]));
        continue;
      }
      if (grads[i].empty()) continue;  // nothing downstream reads this layer's output
      if (n.layer) {
        give(n.from[0], n.layer->backward(grads[i]));
      } else {
        split_channels(grads[i], n.in_channels, n.split);
        for (std::size_t k = 0; k < n.from.size(); ++k) give(n.from[k], n.split[k].alias());
      }
      grads[i] = Tensor<S>();
    }
    if (!dx.empty() && dx.memory_format() != input_format_) dx = dx.to(input_format_);
    return dx;
  }
  /// Eval forward (running statistics, no state change): decoded rows and raw maps.
  DetectOutput<S> forward_eval(ConstTensorView<S> x) const {
    check_input(x.sizes(), "forward_eval");
    DetectOutput<S> result;
    run(x, [&](std::size_t i, const std::vector<ConstTensorView<S>>& in, Tensor<S>& out) {
      const Node& n = nodes_[i];
      if (n.layer) out = n.layer->forward_eval(in[0]);
      else if (n.concat) out = concat<S>(in, "Concat");
      else result = detect_->forward_eval(in);
    });
    return result;
  }
  /// Every layer's output of an eval forward (layer i at index i; Detect's is empty), for
  /// finding where two implementations part.
  std::vector<Tensor<S>> layer_outputs(ConstTensorView<S> x) const {
    check_input(x.sizes(), "layer_outputs");
    std::vector<Tensor<S>> outs(nodes_.size());
    run(x, [&](std::size_t i, const std::vector<ConstTensorView<S>>& in, Tensor<S>& out) {
      const Node& n = nodes_[i];
      if (n.layer) out = n.layer->forward_eval(in[0]);
      else if (n.concat) out = concat<S>(in, "Concat");
      if (!out.empty()) outs[i] = out.to(MemoryFormat::contiguous);
    }, /*keep_all=*/true);
    return outs;
  }

  /// Every layer's tensors under `prefix` + "model.<i>." (YOLOv5's state-dict names).
  void collect_tensors(Tensors<S>& out, const std::string& prefix) {
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      const std::string p = prefix + "model." + std::to_string(i) + ".";
      if (nodes_[i].layer) nodes_[i].layer->collect_tensors(out, p);
      else if (i == detect_index_ && detect_) detect_->collect_tensors(out, p);
    }
  }

  /// The deployed network (a snapshot of the current weights) in `o`'s precision: every
  /// convolution one fused primitive; int8 uses the calibrated range of each
  /// convolution's name ("model.2.m.0.cv1.", "model.24.m.0.").
  DeployedModel<S> deploy(const DeployOptions& o = DeployOptions()) const;

 private:
  struct Node {
    std::vector<std::int64_t> from;          // absolute layer indices, -1 the image
    std::vector<std::int64_t> in_channels;   // per input
    std::int64_t out_channels = 0;
    std::optional<AnyBlock<S>> layer;        // a one-input layer
    bool concat = false;                     // else: the Detect head (detect_)
    Tensor<S> cat;                           // a concatenation's output (reused)
    std::vector<Tensor<S>> split;            // its gradient split per input (reused)
  };

  Model(const Model& o, orepa::detail::CloneTag)
      : cfg_(o.cfg_),
        save_(o.save_),
        last_use_(o.last_use_),
        detect_index_(o.detect_index_),
        max_stride_(o.max_stride_),
        input_grad_(o.input_grad_) {
    for (const auto& n : o.nodes_) {
      Node c;
      c.from = n.from, c.in_channels = n.in_channels, c.out_channels = n.out_channels, c.concat = n.concat;
      if (n.layer) c.layer.emplace(n.layer->clone());
      nodes_.push_back(std::move(c));
    }
    detect_.emplace(o.detect_->clone());
  }

  void check_input(const Shape& s, const char* who) const {
    if (s.size() != 4 || s[0] < 1 || s[1] != cfg_.input_channels || s[2] < 1 || s[3] < 1 ||
        s[2] % max_stride_ || s[3] % max_stride_)
      throw shape_error(orepa::detail::cat("yolo::Model::", who, ": input must be [N, ", cfg_.input_channels,
                                           ", H, W] with H and W multiples of ", max_stride_, ", got ", shape_str(s)));
  }

  // Runs every layer in order: `step(i, inputs, out)` computes layer i's output into `out`.
  // Outputs are kept until their last reader ran (all of them with keep_all).
  template <class Step>
  void run(ConstTensorView<S> x, Step&& step, bool keep_all = false) const {
    std::vector<Tensor<S>> outs(nodes_.size());
    std::vector<ConstTensorView<S>> in;
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      in.clear();
      for (auto j : nodes_[i].from) in.push_back(j < 0 ? x : ConstTensorView<S>(outs[std::size_t(j)]));
      step(i, in, outs[i]);
      if (!keep_all)
        for (auto j : nodes_[i].from)
          if (j >= 0 && last_use_[std::size_t(j)] == i) outs[std::size_t(j)] = Tensor<S>();
    }
  }

  static void concat_into(const std::vector<ConstTensorView<S>>& in, Tensor<S>& buffer, Tensor<S>& out) {
    concat_channels(in, buffer, "Concat");
    out = buffer.alias();
  }

  void build(const ModelOptions<S>& opts) {
    const auto& rows = cfg_.layers;
    std::vector<std::int64_t> ch;  // output channels per layer
    last_use_.assign(rows.size(), 0);
    std::optional<ModuleBuild<S>> head;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const LayerRow& row = rows[i];
      Node n;
      ModuleSpec<S> spec;
      spec.config = &cfg_, spec.index = i, spec.row = &row;
      spec.seed = orepa::detail::yolo::child_seed(opts.seed(), i);
      for (auto f : row.from) {
        const std::int64_t j = i == 0 ? -1 : (f < 0 ? std::int64_t(i) + f : f);
        n.from.push_back(j);
        n.in_channels.push_back(j < 0 ? cfg_.input_channels : ch[std::size_t(j)]);
        if (j >= 0) {
          last_use_[std::size_t(j)] = i;
          if (std::find(save_.begin(), save_.end(), std::size_t(j)) == save_.end() && f != -1) save_.push_back(std::size_t(j));
        }
      }
      spec.in_channels = n.in_channels;
      try {
        spec.number = scaled_repeats(row.number, cfg_.depth_multiple);
      } catch (const config_error& e) {
        throw config_error(spec.where() + ": " + e.what());
      }
      const auto [factory, repeats_itself] = opts.registry().at(row.module, spec.where());
      const std::string prefix = "model." + std::to_string(i) + ".";
      const auto in_layer = [&](const BlockMaker<S>& m, const std::string& path) -> BlockMaker<S> {
        return [m, path](const ConvOptions& o) { return m(ConvOptions(o).name(path + o.name())); };
      };
      // A module constructor's config_error gets the row's place in the file too.
      const auto* build_module = factory;  // C++17 lambdas cannot capture a structured binding
      const auto make = [&]() -> ModuleBuild<S> {
        try {
          return (*build_module)(spec);
        } catch (const config_error& e) {
          if (std::string(e.what()).rfind(spec.where(), 0) == 0) throw;
          throw config_error(spec.where() + ": " + e.what());
        }
      };
      const std::int64_t copies = repeats_itself ? 1 : spec.number;
      const std::uint64_t layer_seed = spec.seed;
      ModuleBuild<S> b;
      if (copies == 1) {
        spec.maker = in_layer(opts.maker(), prefix), spec.orepa = in_layer(opts.orepa_maker(), prefix);
        b = make();
      } else {  // YOLOv5's nn.Sequential of `copies` modules: names `i.j.`
        Sequential<S> seq;
        for (std::int64_t j = 0; j < copies; ++j) {
          const std::string p = prefix + std::to_string(j) + ".";
          spec.maker = in_layer(opts.maker(), p), spec.orepa = in_layer(opts.orepa_maker(), p);
          spec.seed = orepa::detail::yolo::child_seed(layer_seed, std::uint64_t(j));
          ModuleBuild<S> one = make();
          if (!one.layer) throw config_error(spec.where() + ": only one-input layers can repeat (number > 1)");
          seq.add(std::move(*one.layer));
          b.out_channels = one.out_channels;
        }
        b.layer.emplace(std::move(seq));
      }
      if (b.detect) {
        if (i + 1 != rows.size()) throw config_error(spec.where() + ": Detect must be the last layer");
        head = std::move(b);
        detect_index_ = i;
        n.out_channels = 0;
      } else {
        if (!b.layer && !b.concat) throw config_error(spec.where() + ": the factory built nothing");
        if (b.layer && n.from.size() != 1)
          throw config_error(spec.where() + ": a one-input module cannot read several layers (`from` lists " +
                             std::to_string(n.from.size()) + ")");
        if (b.out_channels < 1) throw config_error(spec.where() + ": the factory gave no output channels");
        n.layer = std::move(b.layer);
        n.concat = b.concat;
        n.out_channels = b.out_channels;
      }
      ch.push_back(n.out_channels);
      nodes_.push_back(std::move(n));
    }
    if (!head) throw config_error(cfg_.source + ": the model has no Detect head (its last layer)");
    std::sort(save_.begin(), save_.end());
    for (auto* bn : this->batch_norms()) bn->eps = opts.bn_eps(), bn->momentum = opts.bn_momentum();
    // YOLOv5 finds the strides with a forward pass: s / (height of each Detect input).
    const Node& d = nodes_[detect_index_];
    std::vector<std::int64_t> det_ch;
    for (auto j : d.from) det_ch.push_back(j < 0 ? cfg_.input_channels : ch[std::size_t(j)]);
    const std::vector<double> strides = probe_strides(d.from);
    detect_.emplace(head->detect_classes, head->detect_anchors, det_ch, strides,
                    orepa::detail::yolo::child_seed(opts.seed(), detect_index_));
    max_stride_ = std::int64_t(*std::max_element(strides.begin(), strides.end()));
  }

  // The stride of each Detect input: a 128 x 128 image's height over the input's height
  // there (YOLOv5 probes with 256 x 256; any size divisible by the strides gives them).
  std::vector<double> probe_strides(const std::vector<std::int64_t>& from) {
    constexpr std::int64_t s = 128;
    std::vector<Tensor<S>> outs(nodes_.size());
    Tensor<S> x({1, cfg_.input_channels, s, s});
    for (std::size_t i = 0; i < detect_index_; ++i) {
      std::vector<ConstTensorView<S>> in;
      for (auto j : nodes_[i].from) in.push_back(j < 0 ? ConstTensorView<S>(x) : ConstTensorView<S>(outs[std::size_t(j)]));
      const Node& n = nodes_[i];
      outs[i] = n.layer ? n.layer->forward_eval(in[0]) : concat<S>(in, "Concat");
    }
    std::vector<double> strides;
    for (auto j : from) {
      const std::int64_t h = j < 0 ? s : outs[std::size_t(j)].size(2);
      if (h < 1 || s % h) throw config_error(orepa::detail::cat(cfg_.source, ": a Detect input of a ", s, "x", s,
                                                                " image is ", h, " high: not a whole stride"));
      strides.push_back(double(s / h));
    }
    return strides;
  }

  ModelConfig cfg_;
  std::vector<Node> nodes_;
  std::vector<std::size_t> save_;
  std::vector<std::size_t> last_use_;  // per layer, the last layer that reads its output
  std::optional<Detect<S>> detect_;
  std::size_t detect_index_ = 0;
  std::int64_t max_stride_ = 32;
  bool has_forward_ = false;
  bool input_grad_ = true;
  MemoryFormat input_format_ = MemoryFormat::contiguous;  // of the last forward_train's x
};

/// The deployed form of a Model (Model::deploy()): every layer deployed, the same graph.
/// forward() is const and thread-safe. Activations stay in the layout the first
/// convolution prefers (channels-last where oneDNN runs NHWC) from the input to the head.
/// In int8, a layer writes 8-bit codes when every reader takes codes in one quantization
/// (the readers' input range: a convolution's calibrated one; a concatenation's or an
/// upsampling's, its own readers'); codes pass max pooling, upsampling and concatenation
/// unchanged, and only the Detect convolutions return to float. In bf16 the same plan
/// passes bf16 values (QuantParams::bfloat16()) from convolution to convolution.
template <class S>
class DeployedModel {
 public:
  /// One deployed layer: a stage (one input), a concatenation or the head.
  struct Layer {
    std::vector<std::int64_t> from;     ///< absolute layer indices, -1 the image
    std::optional<AnyDeployed<S>> stage;  ///< a one-input stage
    bool concat = false;                ///< a concatenation (else the head, when no stage)
  };
  /// The layers in order (the head last) and the head.
  DeployedModel(std::vector<Layer> layers, DeployedDetect<S> head) : layers_(std::move(layers)), head_(std::move(head)) {
    plan();
  }

  /// Decoded rows and raw maps of images x [N, C, H, W] (any memory format). NaN and Inf
  /// propagate: in int8, an image holding one gets all-NaN rows and maps, since 8-bit
  /// codes cannot carry them (fp32 and bf16 propagate them as PyTorch does).
  DetectOutput<S> forward(ConstTensorView<S> x) const { return run_marking_non_finite(x, true); }
  /// forward(x).pred alone, without the raw maps: what a detector needs, in less time (the
  /// Detect convolutions apply the sigmoid in their primitives, DeployedDetect::predict).
  Tensor<S> predict(ConstTensorView<S> x) const { return run_marking_non_finite(x, false).pred; }

  /// Number of layers.
  std::size_t size() const { return layers_.size(); }
  /// Layer i.
  const Layer& layer(std::size_t i) const { return layers_.at(i); }
  /// The head.
  const DeployedDetect<S>& head() const { return head_; }
  /// The quantization layer i writes its output in (nullopt: float; bf16 values when its
  /// `bf16` is set), see the class comment.
  const std::optional<QuantParams>& output_quantization(std::size_t i) const { return plan_.at(i); }
  /// Weights and biases of every layer.
  std::int64_t num_parameters() const {
    std::int64_t n = head_.num_parameters();
    for (const auto& l : layers_)
      if (l.stage) n += l.stage->num_parameters();
    return n;
  }
  /// Calls `f` on every deployed convolution, named `prefix` + "model.<i>." + its path in
  /// the layer (the training-time tensor prefixes: "model.2.m.0.cv1.", "model.24.m.0.").
  void visit_convs(const std::string& prefix, const ConvVisitor<S>& f) const {
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      const std::string p = prefix + "model." + std::to_string(i) + ".";
      if (layers_[i].stage) layers_[i].stage->visit_convs(p, f);
      else if (!layers_[i].concat) head_.visit_convs(p, f);
    }
  }
  /// The model with every deployed convolution mapped by `f` (names as visit_convs).
  DeployedModel map_convs(const std::string& prefix, const ConvMapper<S>& f) const {
    std::vector<Layer> layers = layers_;
    std::optional<DeployedDetect<S>> head;
    for (std::size_t i = 0; i < layers.size(); ++i) {
      const std::string p = prefix + "model." + std::to_string(i) + ".";
      if (layers[i].stage) layers[i].stage = layers[i].stage->map_convs(p, f);
      else if (!layers[i].concat) head.emplace(head_.map_convs(p, f));
    }
    return DeployedModel(std::move(layers), head ? std::move(*head) : head_);
  }
  /// The model in `o`'s precision: every deployed convolution runs in it (int8: over the
  /// calibrated range of its name).
  DeployedModel with_options(const DeployOptions& o) const {
    return map_convs("", [&](const std::string& name, const DeployedConv<S>& conv) {
      DeployedConv<S> c(conv);
      c.apply(o, name);
      return AnyDeployed<S>(std::move(c));
    });
  }

 private:
  // run() with the NaN bookkeeping of int8 (see forward()).
  DetectOutput<S> run_marking_non_finite(ConstTensorView<S> x, bool raw) const {
    if constexpr (std::is_same_v<S, float>) {
      orepa::detail::NonFiniteImages seen;
      seen.batch = x.dim() > 0 ? x.size(0) : 1;
      DetectOutput<S> out;
      {
        orepa::detail::ScopedNonFiniteImages scope(&seen);
        out = run(x, raw);
      }
      orepa::detail::poison_images(out.pred, seen.images, seen.batch, seen.all);
      for (auto& r : out.raw) orepa::detail::poison_images(r, seen.images, seen.batch, seen.all);
      return out;
    } else {
      return run(x, raw);
    }
  }
  // The layers in order; the head gives the raw maps too when `raw`.
  DetectOutput<S> run(ConstTensorView<S> x, bool raw) const {
    Tensor<S> converted;  // a first layer taking codes quantizes any layout in one pass
    if (x.dim() == 4 && layers_.front().stage && !layers_.front().stage->int8_input()) {
      const MemoryFormat f = orepa::detail::in_child("DeployedModel", "model.0", *layers_.front().stage,
                                                     [&] { return layers_.front().stage->preferred_format(x.sizes()); });
      if (x.memory_format() != f) {
        converted.assign(x, f);
        x = converted;
      }
    }
    const std::size_t L = layers_.size();
    std::vector<StageOutput<S>> vals(L);
    std::vector<std::size_t> last(L, 0);
    for (std::size_t i = 0; i < L; ++i)
      for (auto j : layers_[i].from)
        if (j >= 0) last[std::size_t(j)] = i;
    auto input = [&](std::int64_t j) -> StageInput<S> { return j < 0 ? StageInput<S>(x) : as_input(vals[std::size_t(j)]); };
    DetectOutput<S> out;
    std::size_t i = 0;
    try {
      for (; i < L; ++i) {
        const Layer& l = layers_[i];
        const QuantParams* q = plan_[i] ? &*plan_[i] : nullptr;
        if (l.stage) {
          const StageInput<S> in = input(l.from[0]);
          if (q || std::holds_alternative<const Int8Codes*>(in) || l.stage->int8_input()) {
            vals[i] = l.stage->forward_int8(in, q);
          } else {
            ConstTensorView<S> v = std::get<ConstTensorView<S>>(in);
            Tensor<S> nchw;
            if (v.dim() == 4 && !v.is_contiguous() && !l.stage->takes_any_format()) {
              nchw.assign(v, MemoryFormat::contiguous);
              v = nchw;
            }
            vals[i] = l.stage->forward(v);
          }
        } else if (l.concat) {
          vals[i] = concat_inputs(l, q, input);
        } else {
          std::vector<StageInput<S>> ins;
          for (auto j : l.from) ins.push_back(input(j));
          if (raw) out = head_.forward(ins);
          else out.pred = head_.predict(ins);
        }
        for (auto j : l.from)
          if (j >= 0 && last[std::size_t(j)] == i) vals[std::size_t(j)] = Tensor<S>();
      }
    } catch (...) {
      const Layer& l = layers_[i];
      orepa::detail::rethrow_in_child("DeployedModel", "model." + std::to_string(i),
                                      l.stage ? l.stage->type_name() : l.concat ? "Concat" : "DeployedDetect");
    }
    return out;
  }

  // The quantization each layer writes: the one all its readers take codes in, if any.
  void plan() {
    const std::size_t L = layers_.size();
    plan_.assign(L, std::nullopt);
    for (std::size_t i = L; i-- > 0;) {
      std::optional<QuantParams> common;
      bool any = false, ok = true;
      for (std::size_t c = i + 1; c < L && ok; ++c) {
        const Layer& r = layers_[c];
        for (std::size_t k = 0; k < r.from.size(); ++k) {
          if (r.from[k] != std::int64_t(i)) continue;
          std::optional<QuantParams> want;
          if (r.stage) want = r.stage->template target<DeployedUpsample<S>>() ? plan_[c] : r.stage->int8_input();
          else if (r.concat) want = plan_[c];
          else want = head_.conv(k).int8_input();
          if (!want || (any && !(*want == *common))) ok = false;
          common = want, any = true;
        }
      }
      if (ok && any) plan_[i] = common;
    }
  }

  template <class Input>
  StageOutput<S> concat_inputs(const Layer& l, const QuantParams* q, Input&& input) const {
    if (!q) {  // float: codes among the inputs are dequantized
      std::vector<Tensor<S>> held;
      std::vector<ConstTensorView<S>> views;
      held.reserve(l.from.size());
      for (auto j : l.from) {
        const StageInput<S> in = input(j);
        if (const auto* c = std::get_if<const Int8Codes*>(&in)) {
          if constexpr (std::is_same_v<S, float>) held.push_back(dequantize_codes(**c));
          views.push_back(held.back());
        } else {
          views.push_back(std::get<ConstTensorView<S>>(in));
        }
      }
      return concat<S>(views, "Concat");
    }
    if constexpr (std::is_same_v<S, float>) {
      std::vector<Int8Codes> held;
      std::vector<const Int8Codes*> parts;
      held.reserve(l.from.size());
      for (auto j : l.from) {
        const StageInput<S> in = input(j);
        const auto* c = std::get_if<const Int8Codes*>(&in);
        if (c && (*c)->q == *q) {
          parts.push_back(*c);
          continue;
        }
        held.push_back(quantize_codes(c ? ConstTensorView<float>(dequantize_codes(**c)) : std::get<ConstTensorView<float>>(in), *q));
        parts.push_back(&held.back());
      }
      return concat_codes(parts, "Concat");
    } else {
      throw config_error("DeployedModel: 8-bit codes need float");
    }
  }

  std::vector<Layer> layers_;
  DeployedDetect<S> head_;
  std::vector<std::optional<QuantParams>> plan_;
};

template <class S>
DeployedModel<S> Model<S>::deploy(const DeployOptions& o) const {
  std::vector<typename DeployedModel<S>::Layer> layers;
  for (std::size_t i = 0; i < nodes_.size(); ++i) {
    const Node& n = nodes_[i];
    typename DeployedModel<S>::Layer l;
    l.from = n.from;
    try {  // a block that cannot be deployed (non-finite weights, ...) is named by its layer
      if (n.layer) l.stage.emplace(n.layer->deploy());
    } catch (...) {
      orepa::detail::rethrow_in_child(type_name(), "model." + std::to_string(i), n.layer->type_name());
    }
    l.concat = n.concat;
    layers.push_back(std::move(l));
  }
  DeployedModel<S> d(std::move(layers), detect_->deploy());
  return o.precision() == Precision::fp32 ? d : d.with_options(o);
}

/// The network of `cfg` for the checkpoint `file` (YOLOv5 state-dict names, `model.N.`):
/// each convolution slot's block type is the one the checkpoint holds there (whatever the
/// yaml row or `opts`' makers say), with the yaml's geometry; then the whole checkpoint
/// loads strictly, all or nothing. format_error names the slot for a checkpoint of
/// another yaml (no block there, other channels or kernel), and lists missing,
/// unexpected and mis-shaped tensors.
inline Model<float> load_model(const ModelConfig& cfg, const io::SafetensorsFile& file,
                               ModelOptions<float> opts = ModelOptions<float>()) {
  std::map<std::string, io::BlockType> slots;
  for (const auto& d : io::detect_blocks(file)) slots[d.prefix] = d.type;
  const BlockMaker<float> from_checkpoint = [&](const ConvOptions& o) -> AnyBlock<float> {
    const auto it = slots.find(o.name());
    if (it == slots.end())
      throw format_error(file.label() + ": no convolution block under '" + o.name() + "', where " + cfg.source +
                         " has a " + orepa::detail::cat(o.in_channels(), " -> ", o.out_channels(), " ", o.kernel_size(), "x",
                                                        o.kernel_size()) +
                         " convolution (a checkpoint of another model yaml?)");
    io::BlockSettings st;
    st.stride = o.stride(), st.padding = o.geometry().padding, st.dilation = o.dilation(), st.groups = o.groups();
    st.activation = ActivationKind::silu;
    AnyBlock<float> b = io::load_block(file, o.name(), it->second, st, io::LoadPurpose::forward);
    const ConvGeometry& g = b.geometry();
    if (g.in_channels != o.in_channels() || g.out_channels != o.out_channels() || g.kernel != o.kernel_size())
      throw format_error(orepa::detail::cat(file.label(), ": the ", io::to_string(it->second), " under '", o.name(), "' is ",
                                            g.in_channels, " -> ", g.out_channels, " ", g.kernel, "x", g.kernel, " but ",
                                            cfg.source, " has ", o.in_channels(), " -> ", o.out_channels(), " ",
                                            o.kernel_size(), "x", o.kernel_size(), " there (a checkpoint of another model yaml?)"));
    return b;
  };
  opts.maker(from_checkpoint).orepa_maker(from_checkpoint);
  Model<float> m(cfg, opts);
  io::load_state_dict(m, file);
  return m;
}

}  // namespace orepa::yolo

// The module tree of a Model (printing, named_modules: blocks/module_tree.hpp) and the
// printed form of a DeployedModel.
namespace orepa {

/// A yolo::Model's tree: the layers "model.<i>" (a Concat, which is no object, as a printed
/// node only), the Detect head last.
template <class S>
struct ModuleTraits<yolo::Model<S>> {
  /// "nc=<classes>, ch=<image channels>".
  static std::string extra_repr(const yolo::Model<S>& m) {
    return detail::cat("nc=", m.classes(), ", ch=", m.input_channels());
  }
  /// Calls `v` on every layer, named "model.<i>" as in the state dict.
  static void visit_children(yolo::Model<S>& m, ModuleVisitor<S>& v) {
    for (std::size_t i = 0; i < m.size(); ++i) {
      const std::string name = "model." + std::to_string(i);
      const auto& from = m.config().layers[i].from;
      if (i + 1 == m.size()) {
        v(name, m.detect());
      } else if (from.size() == 1) {
        v(name, m.layer(i));
      } else {
        std::string list;
        for (auto f : from) list += detail::cat(list.empty() ? "" : ", ", f);
        v.node(name, m.module_name(i), "dimension=1, from=[" + list + "]");
      }
    }
  }
};

namespace yolo {
/// Prints a deployed model: one line (or one indented group) per layer "model.<i>", the
/// deployed convolutions named by their tensor paths, with parameter counts.
template <class S>
std::ostream& operator<<(std::ostream& os, const DeployedModel<S>& d) {
  os << "DeployedModel(" << orepa::detail::parameter_note(d.num_parameters()) << "\n";
  for (std::size_t i = 0; i < d.size(); ++i) {
    const auto& l = d.layer(i);
    os << "  (model." << i << "): ";
    if (l.stage) {
      orepa::detail::print_deployed(os, *l.stage, 2);
    } else if (l.concat) {
      std::string list;
      for (auto f : l.from) list += orepa::detail::cat(list.empty() ? "" : ", ", f);
      os << "Concat(dimension=1, from=[" << list << "])\n";
    } else {
      orepa::detail::print_deployed_tree<S>(os, "DeployedDetect", d.head(), 2);
    }
  }
  return os << ")";
}
}  // namespace yolo

}  // namespace orepa
