// orepa-run: runs one training-time block of a PyTorch checkpoint in eval, deploy or train
// mode (with optional backward) and writes the results, to compare with PyTorch (--help).
#include <cstdio>

#include "tool_args.hpp"

using namespace orepa;

int main(int argc, char** argv) try {
  const auto args = tools::parse_run_args({argv + 1, argv + argc});
  if (args.help) {
    std::fputs(tools::run_usage(), stdout);
    return 0;
  }
  const auto weights = io::SafetensorsFile::open(args.weights);
  io::BlockType type;
  if (args.block) {
    type = *args.block;
  } else {
    std::optional<io::BlockType> found;
    for (const auto& d : io::detect_blocks(weights))
      if (d.prefix == args.prefix) found = d.type;
    if (!found)
      throw format_error("orepa-run: no block found under prefix '" + args.prefix + "' in " + args.weights +
                         "; pass --block and --prefix");
    type = *found;
  }
  auto block = io::load_block(weights, args.prefix, type, args.settings);
  const Tensor<float> x = io::SafetensorsFile::open(args.input).get<float>("input");

  io::SafetensorsWriter out;
  if (args.mode == "eval") out.add("output", block.forward_eval(x));
  if (args.mode == "deploy") out.add("output", block.deploy().forward(x));
  if (args.mode == "train") {
    const Tensor<float>& y = block.forward_train(x);
    out.add("output", y);
    Tensors<float> t;
    block.collect_tensors(t, "");
    for (auto& [prefix, bn] : t.batch_norms) {
      out.add(prefix + "running_mean", bn->running_mean.value);
      out.add(prefix + "running_var", bn->running_var.value);
    }
    if (!args.grad_output.empty()) {
      const Tensor<float> g = io::SafetensorsFile::open(args.grad_output).get<float>("grad_output");
      block.zero_grad();
      out.add("grad.input", block.backward(g));
      for (auto& [name, p] : block.named_parameters()) out.add("grad." + name, p->grad);
    }
  }
  out.write(args.output);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "orepa-run: error: %s\n", e.what());
  return 1;
}
