// orepa-run: runs one training-time block of a PyTorch checkpoint in eval, deploy or train
// mode (with optional backward) and writes the results, to compare with PyTorch (--help).
#include <cstdio>
#include <iostream>
#include <orepa/io/calibration.hpp>
#include <orepa/nn/quantization.hpp>

#include "tool_args.hpp"
#include "yolo_tool.hpp"

using namespace orepa;

int main(int argc, char** argv) try {
  const auto args = tools::parse_run_args({argv + 1, argv + argc});
  if (args.help) {
    std::fputs(tools::run_usage(), stdout);
    return 0;
  }
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
      throw format_error("orepa-run: no block found under prefix '" + args.prefix + "' in " + args.weights +
                         "; pass --block and --prefix");
    type = *found;
  }
  auto block = io::load_block(weights, args.prefix, type, args.settings);
  const Tensor<float> x = io::SafetensorsFile::open(args.input).get<float>("input");

  io::SafetensorsWriter out;
  if (args.mode == "eval") out.add("output", block.forward_eval(x));
  if (args.mode == "deploy") {
    const DeployedConv<float> fp32 = *block.deploy().target<DeployedConv<float>>();
    if (args.precision == Precision::fp32) {
      out.add("output", fp32.forward(x));
    } else {
      std::vector<Tensor<float>> batches;
      if (!args.calibration.empty()) {
        const auto cal_file = io::SafetensorsFile::open(args.calibration);
        for (const auto& name : cal_file.names()) {
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
      if (args.precision == Precision::int8) {
        Calibrator cal;
        for (const auto& b : batches) cal.observe(fp32, b);
        opts.calibration(cal.calibration());
        io::save_calibration(out, opts.calibration());
      }
      DeployedConv<float> reduced = fp32;
      reduced.apply(opts, "");
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
