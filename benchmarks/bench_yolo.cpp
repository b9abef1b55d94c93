// The whole YOLOv5n-OREPA network (models/yolov5n-orepa.yaml, nc 80), batch 1:
//
//   yolo/train_form/<size>              Model::forward_eval, the network in its training form
//   yolo/deploy/<p>/<size>              DeployedModel::predict in p = fp32 / bf16 / int8 (int8
//                                       calibrated min/max on the timed image), float NCHW in,
//                                       decoded rows out (what orepa-detect runs)
//   yolo/bare_primitives/<p>/<size>     the yardstick: the deployed network's 60 convolutions as
//                                       bare oneDNN primitives (BarePrimitive: inputs, weights
//                                       and outputs already in their layouts), run one after
//                                       the other with nothing between them
//   yolo/train_step/<net>/256          one training step at issue 21's setting: batch 16,
//                                       256 x 256, nc 80, forward + YOLOv5's loss on fixed
//                                       targets + backward + SGD (Nesterov) step, for
//                                       net = yolov5n (ConvBN everywhere), orepa_top (OREPA
//                                       rows of yolov5n-orepa.yaml OREPA, the rest ConvBN),
//                                       orepa_all (every conv OREPA, inside C3 too), dbb_all
//                                       (every conv DBB); peak_mb is the process's peak
//                                       memory growth over the first step
// size = 320 or 640. Counters: gflops (the convolutions' FLOPs per second, 2 per
// multiply-add) and, on the deploy rows, peak_mb (process peak memory of the deployed
// network's first forward, VmHWM after minus VmRSS before, in MB).
// deploy / bare_primitives is what the graph costs around its convolutions: pooling,
// upsampling, concatenation, the Detect decode and, in int8 and bf16, conversions.
#include <orepa/nn/quantization.hpp>
#include <orepa/yolo/yolo.hpp>

#include "bench_common.hpp"

namespace orepa::bench {
namespace {

yolo::Model<float> yolov5n_orepa() {
  return yolo::Model<float>(yolo::read_model_config(OREPA_SOURCE_DIR "/models/yolov5n-orepa.yaml"));
}

Tensor<float> image(std::int64_t size) {
  Tensor<float> x = random_tensor({1, 3, size, size}, 7);
  for (auto& v : x) v = 0.5f + 0.5f * v;  // an image's range, [0, 1]
  return x;
}

// One deployed convolution as the network runs it: its geometry, input shape and activation.
struct ConvCall {
  ConvGeometry g;
  Shape input;
  bool silu;
};

// Every convolution the fp32 network runs on `x`, in order.
std::vector<ConvCall> conv_calls(const yolo::DeployedModel<float>& net, const Tensor<float>& x) {
  struct Recorder final : ConvObserver {
    std::vector<ConvCall> calls;
    void seen(const DeployedConv<float>& c, ConstTensorView<float> in, ConstTensorView<float>) override {
      calls.push_back({c.geometry(), in.sizes(), c.activation().kind() == ActivationKind::silu});
    }
  } r;
  ScopedConvObserver scope(&r);
  net.forward(x);
  return std::move(r.calls);
}

double flops_of(const std::vector<ConvCall>& calls) {
  double f = 0;
  for (const auto& c : calls) f += conv_flops(c.g, c.input);
  return f;
}

void train_form(benchmark::State& state, std::int64_t size) try {
  const auto model = yolov5n_orepa();
  const auto x = image(size);
  auto y = model.forward_eval(x);
  for (auto _ : state) {
    y = model.forward_eval(x);
    benchmark::DoNotOptimize(y.pred.data());
  }
  state.counters["gflops"] = benchmark::Counter(flops_of(conv_calls(model.deploy(), x)) * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
} catch (const std::exception& e) {  // e.g. the model yaml not found
  state.SkipWithError(e.what());
}

void deploy(benchmark::State& state, Precision p, std::int64_t size) try {
  const auto model = yolov5n_orepa();
  const auto x = image(size);
  const auto fp32 = model.deploy();
  DeployOptions o;
  o.precision(p);
  if (p == Precision::int8) {
    Calibrator cal;
    cal.observe(fp32, x);
    o.calibration(cal.calibration());
  }
  const auto net = model.deploy(o);
  Tensor<float> y;
  const std::int64_t peak = peak_memory_of([&] { y = net.predict(x); });  // warm-up: primitives, weight reorders
  for (auto _ : state) {
    y = net.predict(x);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["peak_mb"] = double(peak) / 1e6;
  state.counters["gflops"] =
      benchmark::Counter(flops_of(conv_calls(fp32, x)) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
} catch (const std::exception& e) {  // no kernel for p on this CPU (engine_error), no yaml
  state.SkipWithError(e.what());
}

void bare_primitives(benchmark::State& state, Precision p, std::int64_t size) try {
  const auto x = image(size);
  const auto calls = conv_calls(yolov5n_orepa().deploy(), x);
  std::vector<BarePrimitive> prims;
  prims.reserve(calls.size());
  for (const auto& c : calls) {
    prims.emplace_back(c.g, c.input, p, c.silu);
    if (!prims.back().ok()) {
      state.SkipWithError((std::string("oneDNN has no ") + precision_name(p) + " convolution here (ISA " +
                           engine::cpu_isa_name() + ")").c_str());
      return;
    }
  }
  dnnl::stream s(engine::cpu_engine());
  auto run = [&] {
    for (const auto& prim : prims) prim.execute(s);
    s.wait();
  };
  run();
  for (auto _ : state) run();
  state.counters["gflops"] = benchmark::Counter(flops_of(calls) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
} catch (const std::exception& e) {
  state.SkipWithError(e.what());
}

void yolo_train_step(benchmark::State& state, const char* yaml, const char* maker, const char* orepa_maker) try {
  yolo::Model<float> model(yolo::read_model_config(std::string(OREPA_SOURCE_DIR "/models/") + yaml),
                           yolo::ModelOptions<float>()
                               .maker(yolo::block_maker<float>(maker))
                               .orepa_maker(yolo::block_maker<float>(orepa_maker)));
  const std::int64_t batch = 16, size = 256;
  Tensor<float> x = random_tensor({batch, 3, size, size}, 7);
  for (auto& v : x) v = 0.5f + 0.5f * v;
  Tensor<float> targets({2 * batch, 6});  // two boxes an image: (image, class, cx, cy, w, h)
  for (std::int64_t i = 0; i < 2 * batch; ++i) {
    const float row[6] = {float(i / 2), float((7 * i) % 80), 0.3f + 0.4f * float(i % 2), 0.5f,
                          0.1f + 0.05f * float(i % 5), 0.15f + 0.04f * float(i % 4)};
    for (int j = 0; j < 6; ++j) targets[6 * i + j] = row[j];
  }
  model.set_input_grad(false);  // as yolo::Trainer: the images need no gradient
  yolo::DetectionLoss<float> loss(model.detect().anchors(), model.strides());
  SGD<float> opt(yolo_param_groups(model, 5e-4), SGDOptions(0.01).momentum(0.937).nesterov(true));
  auto step = [&] {
    const std::vector<Tensor<float>> maps = model.forward_train(x);
    const std::vector<ConstTensorView<float>> views(maps.begin(), maps.end());
    const auto r = loss(views, targets);
    model.backward(r.grad);
    opt.step();
    opt.zero_grad();
  };
  const std::int64_t peak = peak_memory_of(step);
  for (auto _ : state) step();
  state.counters["peak_mb"] = double(peak) / 1e6;
} catch (const std::exception& e) {
  state.SkipWithError(e.what());
}

const bool yolo_registered = [] {
  struct Net { const char *name, *yaml, *maker, *orepa_maker; };
  for (const Net& n : {Net{"yolov5n", "yolov5n.yaml", "convbn", "convbn"},
                       Net{"orepa_top", "yolov5n-orepa.yaml", "convbn", "orepa"},
                       Net{"orepa_all", "yolov5n-orepa.yaml", "orepa", "orepa"},
                       Net{"dbb_all", "yolov5n-orepa.yaml", "dbb", "dbb"}})
    benchmark::RegisterBenchmark((std::string("yolo/train_step/") + n.name + "/256").c_str(), yolo_train_step, n.yaml,
                                 n.maker, n.orepa_maker)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  for (std::int64_t size : {320, 640}) {
    const std::string tail = "/" + std::to_string(size);
    benchmark::RegisterBenchmark(("yolo/train_form" + tail).c_str(), train_form, size)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    for (Precision p : {Precision::fp32, Precision::bf16, Precision::int8}) {
      const std::string mid = std::string(precision_name(p)) + tail;
      benchmark::RegisterBenchmark(("yolo/deploy/" + mid).c_str(), deploy, p, size)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("yolo/bare_primitives/" + mid).c_str(), bare_primitives, p, size)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
  }
  return true;
}();

}  // namespace
}  // namespace orepa::bench
