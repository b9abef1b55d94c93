// orepa-convert IN.safetensors OUT.safetensors: deploys every OREPA-family block of a
// PyTorch checkpoint into its single folded convolution (see --help).
#include <cstdio>
#include <set>

#include "tool_args.hpp"
#include "tool_main.hpp"
#include "yolo_tool.hpp"

using namespace orepa;

int orepa::tools::convert_main(int argc, char** argv) try {
  const auto args = tools::parse_convert_args({argv + 1, argv + argc});
  if (args.help) {
    std::fputs(tools::convert_usage(), stdout);
    return 0;
  }
  tools::checked_output(args);  // before any work: OUT is not IN, and no FIFO or device
  if (!args.model.empty()) return tools::convert_model(args);  // a whole YOLOv5 network (yolo_tool.hpp)
  const auto in = io::SafetensorsFile::open(args.in);
  const auto blocks = io::detect_blocks(in);
  io::SafetensorsWriter out;
  out.set_metadata(in.metadata());
  std::set<std::string> consumed;
  for (const auto& d : blocks) {
    const auto block = io::load_block(in, d.prefix, d.type, {}, io::LoadPurpose::convert);
    for (auto& n : io::training_tensor_names(block, d.prefix)) consumed.insert(n);
    Affine<float> folded;
    try {
      folded = deployable_fold(block, d.prefix);
    } catch (const value_error& e) {
      if (!args.allow_nonfinite)
        throw value_error(detail::cat(args.in, ": ", e.what(), " (--allow-nonfinite writes it anyway)"));
      std::fprintf(stderr, "orepa-convert: warning: %s: %s; written anyway (--allow-nonfinite)\n", args.in.c_str(),
                   e.what());
      folded = block.folded();
    }
    const auto& [w, bias] = folded;
    const std::string stem = d.prefix + io::deployed_stem(d.type);
    out.add(stem + ".weight", w);
    out.add(stem + ".bias", bias);
    std::printf("%-24s %-18s -> %s.weight %s, .bias %s\n", d.prefix.empty() ? "(root)" : d.prefix.c_str(),
                io::to_string(d.type), stem.c_str(), shape_str(w.sizes()).c_str(), shape_str(bias.sizes()).c_str());
  }
  std::size_t copied = 0;
  for (const auto& name : in.names())
    if (!consumed.count(name)) {
      out.add_raw(in.entry(name));
      ++copied;
    }
  out.write(args.out);
  std::printf("orepa-convert: %zu block(s) deployed, %zu other tensor(s) copied -> %s\n", blocks.size(), copied,
              args.out.c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "orepa-convert: error: %s\n", e.what());
  return 1;
}
