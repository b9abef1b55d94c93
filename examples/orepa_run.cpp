// orepa-run: runs one training-time block of a PyTorch checkpoint in eval, deploy or train
// mode (with optional backward) and writes the results, to compare with PyTorch (--help).
#include <cstdio>
#include <iostream>
#include <orepa/io/calibration.hpp>
#include <orepa/nn/quantization.hpp>

#include "tool_args.hpp"
#include "tool_main.hpp"
#include "yolo_tool.hpp"

using namespace orepa;

int orepa::tools::run_main(int argc, char** argv) try {
  const auto args = tools::parse_run_args({argv + 1, argv + argc});
  if (args.help) {
    std::fputs(tools::run_usage(), stdout);
    return 0;
  }
  tools::checked_output(args);  // before any work: --output is no input, no FIFO or device
  if (!args.model.empty()) return tools::run_model(args);  // a whole YOLOv5 network (yolo_tool.hpp)
  const auto weights = io::SafetensorsFile::open(args.weights);
  io::BlockType type;
  if (args.block) {
    type = *args.block;
  } else {
    std::optional<io::BlockType> found;
    for (const auto& d : io::detect_blocks(weights))
      if (d.prefix == args.prefix) found = d.type;
    if (!found)
      throw format_error("no block found under prefix '" + args.prefix + "' in " + args.weights +
                         "; pass --block and --prefix");
    type = *found;
  }
  auto block = io::load_block(weights, args.prefix, type, args.settings);
  // Errors about the block's values name it as the checkpoint does.
  const std::string where = detail::cat(io::to_string(type), args.prefix.empty() ? "" : " '" + args.prefix + "'",
                                        " in ", args.weights);
  const Tensor<float> x = io::SafetensorsFile::open(args.input).get<float>("input");

  io::SafetensorsWriter out;
  if (args.mode == "eval") out.add("output", block.forward_eval(x));
  if (args.mode == "deploy") {
    try {
      check_deployable(block, args.prefix);  // names the tensors under the prefix
    } catch (const value_error& e) {
      throw value_error(args.weights + ": " + e.what());
    }
    const DeployedConv<float> fp32 = *block.deploy().target<DeployedConv<float>>();
    if (args.precision == Precision::fp32) {
      out.add("output", fp32.forward(x));
    } else {
      std::vector<Tensor<float>> batches;
      std::vector<std::string> batch_names;
      if (!args.calibration.empty()) {
        const auto cal_file = io::SafetensorsFile::open(args.calibration);
        batch_names = cal_file.names();
        for (const auto& name : batch_names) {
          Tensor<float> b = cal_file.get<float>(name);
          if (b.dim() != 4 || b.size(1) != fp32.geometry().in_channels)
            throw shape_error(detail::cat("--calibration: tensor '", name, "' has shape ", shape_str(b.sizes()),
                                          "; every tensor must be an input batch [N, ", fp32.geometry().in_channels,
                                          ", H, W]"));
          batches.push_back(std::move(b));
        }
        if (batches.empty()) throw format_error("--calibration: " + args.calibration + " holds no tensor");
      } else {
        batches.push_back(x);
      }
      DeployOptions opts;
      opts.precision(args.precision);
      DeployedConv<float> reduced = fp32;
      try {
        if (args.precision == Precision::int8) {
          Calibrator cal;
          for (std::size_t i = 0; i < batches.size(); ++i) {
            try {
              cal.observe(fp32, batches[i]);
            } catch (const value_error& e) {
              throw value_error(detail::cat("--calibration tensor '", batch_names[i], "': ", e.what()));
            }
          }
          opts.calibration(cal.calibration());
          io::save_calibration(opts.calibration(), out);
        }
        reduced.apply(opts, "");
      } catch (const value_error& e) {
        throw value_error(where + ": " + e.what());
      }
      out.add("output", reduced.forward(x));
      std::printf("%s deployment of %s '%s' (oneDNN ISA %s), on %zu batch(es):\n", precision_name(args.precision),
                  io::to_string(type), args.prefix.c_str(), engine::cpu_isa_name().c_str(), batches.size());
      quantization_report(fp32, reduced, batches).print(std::cout);
    }
  }
  if (args.mode == "train") {
    Tensor<float> y = block.forward_train(x);
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
