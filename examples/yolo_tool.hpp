#pragma once
// The whole-network (YOLOv5) side of the tools, apart from their single-block code:
//   - convert_model: orepa-convert IN OUT --model MODEL.yaml;
//   - run_model: orepa-run --model MODEL.yaml ...;
//   - load_weights, read_calibration, check_output_path: shared with orepa-detect.
// Built with orepa::yolo (OREPA_TOOLS_WITH_YOLO, set by examples/CMakeLists.txt when
// OREPA_WITH_YOLO is on); without it --model is an error that says how to get it.
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "tool_args.hpp"

#ifdef OREPA_TOOLS_WITH_YOLO
#include <algorithm>
#include <map>
#include <optional>
#include <set>

#include <orepa/io/calibration.hpp>
#include <orepa/yolo/yolo.hpp>
#endif

namespace orepa::tools {

#ifdef OREPA_TOOLS_WITH_YOLO

/// io::check_output_path for `out` (the value of `flag`) against `inputs` (each input's
/// flag and path; empty paths are skipped): the file to replace, or config_error when
/// `out` is an input (through any name or link), a directory, a FIFO or a device.
inline std::string check_output_path(const std::string& out, const std::string& flag,
                                     const std::vector<std::pair<std::string, std::string>>& inputs) {
  std::vector<io::NamedPath> named;
  for (const auto& [in_flag, in] : inputs) named.push_back({in_flag, in});
  return io::check_output_path({flag, out}, named);
}

/// The tensor-name stems a deployed convolution can have (io::deployed_stem of each type).
inline const std::vector<std::string>& deployed_stems() {
  static const std::vector<std::string> stems = [] {
    std::vector<std::string> s;
    for (auto t : {io::BlockType::OREPA, io::BlockType::OREPA_1x1, io::BlockType::OREPA_LargeConv,
                   io::BlockType::RepVGGBlock_OREPA, io::BlockType::DBB, io::BlockType::ConvBN})
      s.push_back(io::deployed_stem(t));
    return s;
  }();
  return stems;
}

/// The network of `cfg` from a deployed checkpoint (orepa-convert --model's output): each
/// convolution slot holds `<slot><stem>.weight` + `.bias` (stem `conv`, `orepa_reparam`,
/// `or1x1_reparam`, ...). Each slot becomes a ConvBN whose BatchNorm is the identity
/// (weight 1, bias the stored bias, running mean 0, running variance 1 - eps), so eval
/// and deploy compute the stored convolution. format_error names a slot without a
/// deployed convolution, a weight of another shape (a checkpoint of another yaml) and
/// tensors the network does not have.
inline yolo::Model<float> load_deployed_model(const yolo::ModelConfig& cfg, const io::SafetensorsFile& file) {
  std::map<std::string, std::string> stems;  // slot -> its deployed stem
  const BlockMaker<float> maker = [&](const ConvOptions& o) -> AnyBlock<float> {
    const std::string& slot = o.name();
    const std::string geometry = detail::cat(o.in_channels(), " -> ", o.out_channels(), " ", o.kernel_size(), "x",
                                             o.kernel_size(), " convolution");
    for (const auto& s : deployed_stems()) {
      const std::string w = slot + s + ".weight";
      if (!file.contains(w)) continue;
      const Shape want{o.out_channels(), o.in_channels() / o.groups(), o.kernel_size(), o.kernel_size()};
      if (file.entry(w).shape != want)
        throw format_error(file.label() + ": " + w + " is " + shape_str(file.entry(w).shape) + " but " + cfg.source +
                           " has a " + geometry + " there, weight " + shape_str(want) +
                           " (a checkpoint of another model yaml?)");
      if (!file.contains(slot + s + ".bias"))
        throw format_error(file.label() + ": " + w + " has no " + slot + s + ".bias");
      stems[slot] = s;
      return ConvBN<float, SiLU>(o);
    }
    throw format_error(file.label() + ": neither a training-time block nor a deployed convolution (" + slot +
                       "conv.weight, " + slot + "orepa_reparam.weight, ...) under '" + slot + "', where " + cfg.source +
                       " has a " + geometry + " (a checkpoint of another model yaml?)");
  };
  yolo::Model<float> m(cfg, yolo::ModelOptions<float>().maker(maker).orepa_maker(maker));
  const auto want = m.state_dict();
  StateDict<float> sd;
  std::set<std::string> used;
  for (const auto& name : want.names()) {
    if (want.is_count(name)) continue;  // the identity BNs' counters stay 0
    const auto slot = std::find_if(stems.begin(), stems.end(), [&](const auto& s) { return name.rfind(s.first, 0) == 0; });
    if (slot == stems.end()) {  // Detect's tensors
      if (file.contains(name)) sd.insert(name, file.get<float>(name)), used.insert(name);
      continue;
    }
    const std::string rest = name.substr(slot->first.size()), stored = slot->first + slot->second;
    const Shape& shape = want.tensor(name).sizes();
    if (rest == "conv.weight") sd.insert(name, file.get<float>(stored + ".weight")), used.insert(stored + ".weight");
    else if (rest == "bn.bias") sd.insert(name, file.get<float>(stored + ".bias")), used.insert(stored + ".bias");
    else if (rest == "bn.weight") sd.insert(name, Tensor<float>(shape, 1.0f));
    else if (rest == "bn.running_mean") sd.insert(name, Tensor<float>(shape, 0.0f));
    else if (rest == "bn.running_var") sd.insert(name, Tensor<float>(shape, float(1.0 - yolo::bn_eps)));
  }
  std::string unexpected;
  std::size_t n_unexpected = 0;
  for (const auto& name : file.names())
    if (!used.count(name)) unexpected += (n_unexpected++ ? ", " : "") + name;
  if (n_unexpected)
    throw format_error(detail::cat(file.label(), ": ", n_unexpected, " tensor(s) that the deployed ", cfg.source,
                                   " network does not have: ", unexpected));
  m.load_state_dict(sd);  // strict: lists what is missing (Detect's tensors)
  return m;
}

/// The network of `cfg` with the weights of `file`: a training-form YOLOv5 checkpoint
/// (yolo::load_model: each conv slot's block from its tensor names) or, when it holds no
/// training-time block, a deployed one (load_deployed_model).
inline yolo::Model<float> load_weights(const yolo::ModelConfig& cfg, const io::SafetensorsFile& file) {
  if (!io::detect_blocks(file).empty()) return yolo::load_model(cfg, file);
  return load_deployed_model(cfg, file);
}

/// The calibration in `path` (io::save_calibration's format: `<layer>input_range`);
/// format_error naming the file when it holds no range.
inline Calibration read_calibration(const std::string& path) {
  Calibration c = io::load_calibration(io::SafetensorsFile::open(path));
  if (c.size() == 0)
    throw format_error(path + ": holds no '<layer>input_range' tensor (a calibration as io::save_calibration writes "
                              "it: one [lo, hi] per convolution, e.g. model.2.m.0.cv1.input_range)");
  return c;
}

/// The deployed network in `precision` (int8 over the ranges in `calibration`, which
/// only int8 uses: config_error naming the flag otherwise).
inline yolo::DeployedModel<float> deploy_model(const yolo::Model<float>& model, Precision precision,
                                               const std::string& calibration) {
  DeployOptions o;
  o.precision(precision);
  if (precision == Precision::int8) {
    if (calibration.empty()) throw config_error("--precision int8 needs --calibration CAL.safetensors (the input ranges)");
    o.calibration(read_calibration(calibration));
  } else if (!calibration.empty()) {
    throw config_error("--calibration: only used with --precision int8");
  }
  return model.deploy(o);
}

/// orepa-convert IN OUT --model MODEL.yaml: every block of the YOLOv5 checkpoint IN folded
/// with the model's BN eps; Detect's tensors and every other tensor copied.
inline int convert_model(const ConvertArgs& a) {
  check_output_path(a.out, "OUT", {{"IN", a.in}, {"--model", a.model}});
  const auto cfg = yolo::read_model_config(a.model);
  const auto in = io::SafetensorsFile::open(a.in);
  const auto blocks = io::detect_blocks(in);
  if (blocks.empty())
    throw format_error(in.label() + ": no training-time block (OREPA, OREPA_1x1, ConvBN, ...) in it; is it deployed already?");
  const yolo::Model<float> model = yolo::load_model(cfg, in);  // strict: a checkpoint of another yaml fails here
  std::map<std::string, io::BlockType> types;
  for (const auto& d : blocks) types[d.prefix] = d.type;
  io::SafetensorsWriter out;
  out.set_metadata(in.metadata());
  std::vector<std::string> folded;
  model.deploy().visit_convs("", [&](const std::string& slot, const DeployedConv<float>& conv) {
    const auto it = types.find(slot);
    if (it == types.end()) return;  // Detect's convolutions: their tensors are copied
    const std::string stem = slot + io::deployed_stem(it->second);
    out.add(stem + ".weight", conv.weight());
    out.add(stem + ".bias", conv.bias());
    folded.push_back(slot);
    std::printf("%-24s %-18s -> %s.weight %s, .bias %s\n", slot.c_str(), io::to_string(it->second), stem.c_str(),
                shape_str(conv.weight().sizes()).c_str(), shape_str(conv.bias().sizes()).c_str());
  });
  if (folded.size() != blocks.size())
    throw state_error(detail::cat(blocks.size(), " blocks in ", a.in, " but ", folded.size(),
                                  " deployed convolutions of the network matched them"));
  std::size_t copied = 0;
  for (const auto& name : in.names()) {
    const bool in_block = std::any_of(folded.begin(), folded.end(), [&](const std::string& p) { return name.rfind(p, 0) == 0; });
    if (!in_block) out.add_raw(in.entry(name)), ++copied;
  }
  out.write(a.out);
  std::printf("orepa-convert: %s: %zu block(s) folded with BatchNorm eps %g, %zu other tensor(s) copied -> %s\n",
              a.model.c_str(), folded.size(), yolo::bn_eps, copied, a.out.c_str());
  return 0;
}

/// orepa-run --model MODEL.yaml: the whole network on every tensor NAME of the input
/// file; writes NAME.pred and NAME.raw.i.
inline int run_model(const RunArgs& a) {
  check_output_path(a.output, "--output",
                    {{"--weights", a.weights}, {"--input", a.input}, {"--model", a.model}, {"--calibration", a.calibration}});
  const auto cfg = yolo::read_model_config(a.model);
  const auto model = load_weights(cfg, io::SafetensorsFile::open(a.weights));
  const auto input = io::SafetensorsFile::open(a.input);
  const auto stride = std::int64_t(*std::max_element(model.strides().begin(), model.strides().end()));
  std::vector<std::pair<std::string, Tensor<float>>> batches;  // every input checked before anything runs
  for (const auto& name : input.names()) {
    const Shape& s = input.entry(name).shape;
    if (s.size() != 4 || s[0] < 1 || s[1] != model.input_channels() || s[2] < 1 || s[3] < 1 || s[2] % stride || s[3] % stride)
      throw shape_error(detail::cat(a.input, ": tensor '", name, "' has shape ", shape_str(s), "; every tensor must be a batch [N, ",
                                    model.input_channels(), ", H, W] with H and W multiples of ", stride));
    batches.emplace_back(name, input.get<float>(name));
  }
  if (batches.empty()) throw format_error(a.input + ": holds no tensor (--input needs batches [N, 3, H, W])");
  std::optional<yolo::DeployedModel<float>> fp32, reduced;
  if (a.mode == "deploy") {
    fp32.emplace(model.deploy());
    if (a.precision != Precision::fp32) reduced.emplace(deploy_model(model, a.precision, a.calibration));
  } else if (!a.calibration.empty()) {
    throw config_error("--calibration: only meaningful with --mode deploy --precision int8");
  }
  io::SafetensorsWriter out;
  for (const auto& [name, x] : batches) {
    const auto r = a.mode == "eval" ? model.forward_eval(x) : (reduced ? *reduced : *fp32).forward(x);
    out.add(name + ".pred", r.pred);
    for (std::size_t i = 0; i < r.raw.size(); ++i) out.add(name + ".raw." + std::to_string(i), r.raw[i]);
    std::printf("%s %s -> %s.pred %s, %zu raw maps", name.c_str(), shape_str(x.sizes()).c_str(), name.c_str(),
                shape_str(r.pred.sizes()).c_str(), r.raw.size());
    if (reduced) {
      const Tensor<float> ref = fp32->forward(x).pred;
      std::printf(" (%s, output SQNR %.1f dB against fp32)", precision_name(a.precision),
                  sqnr_db(ref.data(), r.pred.data(), ref.numel()));
    }
    std::printf("\n");
  }
  out.write(a.output);
  return 0;
}

#else

/// Without orepa::yolo: --model is an error saying how to get it.
inline int convert_model(const ConvertArgs&) {
  throw config_error("--model needs the YOLO component; configure with -DOREPA_WITH_YOLO=ON (yaml-cpp, stb)");
}
/// Without orepa::yolo: --model is an error saying how to get it.
inline int run_model(const RunArgs&) {
  throw config_error("--model needs the YOLO component; configure with -DOREPA_WITH_YOLO=ON (yaml-cpp, stb)");
}

#endif

}  // namespace orepa::tools
