// Deployed-inference benchmarks on YOLOv5s-like layers, bias + SiLU fused, against a bare
// oneDNN convolution primitive of the same shape (the yardstick: layouts chosen by the
// primitive, weights and inputs already in them, everything created before timing).
//
//   deploy/<layer>/n<b>          DeployedConv::forward on NCHW tensors (the plain API)
//   deploy_nhwc/<layer>/n<b>     DeployedConv::forward on channels-last (NHWC) tensors
//   reorder_in/<layer>/n<b>      the NCHW -> primitive-layout reorder of the input alone
//   reorder_out/<layer>/n<b>     the primitive-layout -> NCHW reorder of the output alone
//   deploy_blocked/<layer>/n<b>  forward(DeployedConv, dnnl::memory...) already in the
//                                primitive's layout (the blocked API, no reorders)
//   raw_onednn/<layer>/n<b>      bare primitive, src/dst/weights format_tag::any
//   raw_onednn_nchw/<layer>/n<b> bare primitive with src/dst fixed to NCHW (what a plain
//                                layout costs without any reorder)
//   raw_onednn_<p>/<layer>/n<b>  p = bf16 / int8: the bare primitive in that precision (bf16
//                                or u8/s8 input, bf16 or s8 weights, float output; int8 with
//                                per-channel output scales and an input zero point)
//   deploy_<p>/<layer>/n<b>      p = bf16 / int8: DeployedConv in that precision on channels-last
//                                float tensors (the input converted / quantized on the way in)
//   deploy_<p>_blocked/<layer>/n<b>  the same on dnnl::memory already in the primitive's
//                                (bf16 / u8) input layout: the reduced-precision primitive alone
//   deploy_chain/<api>/n<b>      stem_k6 -> c32_64_s2 -> c64 -> c64_k1 as four DeployedConvs
//                                with NCHW tensors between them (api = nchw) or as one
//                                DeployedChain keeping activations blocked (api = blocked),
//                                or that DeployedChain in int8 (api = int8: 8-bit activations
//                                between the convs, float NCHW in and out)
//   deploy_network/<p>/n256      the demo's classifier (examples/demo_network.hpp, width 16,
//                                32x32 images; C3 modules, GAP, Linear) as a deployed
//                                InferenceChain in p = fp32 / bf16 / int8 (calibrated min/max)
// Counter gflops: forward FLOPs (2 per multiply-add) per second.
#include <cmath>

#include <orepa/deploy/onednn_interop.hpp>
#include <orepa/nn/quantization.hpp>

#include "../examples/demo_network.hpp"
#include "bench_common.hpp"

namespace orepa::bench {
namespace {

struct Layer {
  const char* name;
  ConvGeometry g;
  std::int64_t hw;
};
// {in, out, k, stride, padding, dilation, groups}
const Layer kLayers[] = {
    {"stem_k6", {3, 32, 6, 2, 2, 1, 1}, 640},   {"c32_64_s2", {32, 64, 3, 2, 1, 1, 1}, 320},
    {"c64", {64, 64, 3, 1, 1, 1, 1}, 160},      {"c128", {128, 128, 3, 1, 1, 1, 1}, 80},
    {"c256", {256, 256, 3, 1, 1, 1, 1}, 40},    {"c512", {512, 512, 3, 1, 1, 1, 1}, 20},
    {"c64_k1", {64, 64, 1, 1, 0, 1, 1}, 160},
};
constexpr std::int64_t kBatches[] = {1, 8};

Shape input_shape(const Layer& l, std::int64_t n) { return {n, l.g.in_channels, l.hw, l.hw}; }

DeployedConv<float> make_deployed(const ConvGeometry& g, std::uint64_t seed = 5) {
  const double bound = 1.0 / std::sqrt(double(g.in_per_group() * g.kernel * g.kernel));
  Tensor<float> w(g.weight_shape()), b({g.out_channels});
  Rng rng(seed);
  fill_uniform(w, bound, rng);
  fill_uniform(b, 0.1, rng);
  return DeployedConv<float>(g, std::move(w), std::move(b), SiLU{});
}

void set_flops(benchmark::State& state, const ConvGeometry& g, const Shape& x) {
  state.counters["gflops"] = benchmark::Counter(conv_flops(g, x) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void deploy_plain(benchmark::State& state, Layer l, std::int64_t n, MemoryFormat format) {
  const auto conv = make_deployed(l.g);
  const auto x = random_tensor(input_shape(l, n)).to(format);
  Tensor<float> y;
  conv.forward(x, y);  // warm-up: primitive, weights reorder, context
  for (auto _ : state) {
    conv.forward(x, y);
    benchmark::DoNotOptimize(y.data());
  }
  // ratios.py holds deploy_nhwc to the raw primitive only where NHWC is the primitive's own layout.
  if (format == MemoryFormat::channels_last && conv.preferred_format(x.sizes()) == MemoryFormat::channels_last)
    state.SetLabel("nhwc");
  set_flops(state, l.g, x.sizes());
}

void deploy_blocked(benchmark::State& state, Layer l, std::int64_t n) {
  const auto conv = make_deployed(l.g);
  const auto xs = input_shape(l, n);
  const auto x = random_tensor(xs);
  dnnl::memory src = engine::allocate(src_desc(conv, xs)), dst = engine::allocate(dst_desc(conv, xs));
  engine::to_layout(x, src);
  forward(conv, src, dst);
  for (auto _ : state) {
    forward(conv, src, dst);
    benchmark::DoNotOptimize(dst.get_data_handle());
  }
  set_flops(state, l.g, xs);
}

// One activation reorder alone: NCHW into the primitive's input layout (`in`), or the
// primitive's output layout into NCHW.
void reorder_alone(benchmark::State& state, Layer l, std::int64_t n, bool in) {
  const auto conv = make_deployed(l.g);
  const Shape xs = input_shape(l, n), ys = l.g.output_shape(xs, "reorder");
  const Shape& s = in ? xs : ys;
  const auto blocked = in ? src_desc(conv, xs) : dst_desc(conv, xs);
  dnnl::memory plain = engine::allocate(engine::nchw_desc(s)), other = engine::allocate(blocked);
  dnnl::memory& from = in ? plain : other;
  dnnl::memory& to = in ? other : plain;
  dnnl::reorder r(from, to);
  auto& str = engine::thread_stream();
  r.execute(str, from, to);
  str.wait();
  for (auto _ : state) {
    r.execute(str, from, to);
    str.wait();
  }
  state.SetLabel(blocked == engine::nchw_desc(s) ? "same layout (a copy)" : "");
}

// A DeployedConv in precision `p` (int8: input range [-0.3, 4], as after SiLU), on float
// NHWC tensors or (`blocked`) on memory in the primitive's layout. Skipped, with oneDNN's
// reason, where this CPU has no kernel for `p`.
void deploy_reduced(benchmark::State& state, Layer l, std::int64_t n, Precision p, bool blocked) {
  auto conv = make_deployed(l.g);
  conv.precision(p, {-0.3f, 4.f});
  const auto xs = input_shape(l, n);
  try {
    const auto x = random_tensor(xs).to(MemoryFormat::channels_last);
    if (blocked) {
      dnnl::memory src = engine::allocate(src_desc(conv, xs)), dst = engine::allocate(dst_desc(conv, xs));
      std::fill_n(static_cast<unsigned char*>(src.get_data_handle()), src.get_desc().get_size(), 1);
      forward(conv, src, dst);
      for (auto _ : state) {
        forward(conv, src, dst);
        benchmark::DoNotOptimize(dst.get_data_handle());
      }
    } else {
      Tensor<float> y;
      conv.forward(x, y);
      for (auto _ : state) {
        conv.forward(x, y);
        benchmark::DoNotOptimize(y.data());
      }
    }
  } catch (const engine_error& e) {
    state.SkipWithError(e.what());
    return;
  }
  set_flops(state, l.g, xs);
}

// The yardstick: a oneDNN convolution with nothing around it, in precision `p` (float
// output always, as DeployedConv's). Skipped where this CPU has no kernel for `p`.
void raw_onednn(benchmark::State& state, Layer l, std::int64_t n, bool plain, Precision p) {
  const Shape xs = input_shape(l, n);
  const BarePrimitive prim(l.g, xs, p, /*silu=*/true, plain);
  if (!prim.ok()) {
    state.SkipWithError((std::string("oneDNN has no ") + precision_name(p) + " convolution here (ISA " +
                         engine::cpu_isa_name() + ")").c_str());
    return;
  }
  dnnl::stream s(engine::cpu_engine());
  prim.execute(s);
  s.wait();
  for (auto _ : state) {
    prim.execute(s);
    s.wait();
  }
  state.SetLabel(prim.impl());
  set_flops(state, l.g, xs);
}

// stem_k6 -> c32_64_s2 -> c64 -> c64_k1 (640 -> 320 -> 160 -> 160 -> 160).
// `api`: "nchw" (separate convs, NCHW tensors between), "blocked" (one DeployedChain) or
// "int8" (that chain in int8: the input range of random_tensor, then SiLU's outputs).
void deploy_chain(benchmark::State& state, std::string api, std::int64_t n) {
  std::vector<DeployedConv<float>> convs;
  double flops = 0;
  Shape xs{n, 3, 640, 640}, s = xs;
  for (int i : {0, 1, 2, 6}) {
    convs.push_back(make_deployed(kLayers[i].g, 10 + std::uint64_t(i)));
    if (api == "int8") convs.back().precision(Precision::int8, convs.size() == 1 ? ActivationRange{-1.f, 1.f} : ActivationRange{-0.3f, 4.f});
    flops += conv_flops(kLayers[i].g, s);
    s = kLayers[i].g.output_shape(s, "deploy_chain");
  }
  const auto x = random_tensor(xs);
  if (api != "nchw") {
    DeployedChain chain(std::move(convs));
    Tensor<float> y;
    try {
      chain.forward(x, y);
    } catch (const engine_error& e) {
      state.SkipWithError(e.what());
      return;
    }
    for (auto _ : state) {
      chain.forward(x, y);
      benchmark::DoNotOptimize(y.data());
    }
  } else {
    std::vector<Tensor<float>> acts(convs.size());
    auto run = [&] {
      const Tensor<float>* in = &x;
      for (std::size_t i = 0; i < convs.size(); ++i) {
        convs[i].forward(*in, acts[i]);
        in = &acts[i];
      }
    };
    run();
    for (auto _ : state) {
      run();
      benchmark::DoNotOptimize(acts.back().data());
    }
  }
  state.counters["gflops"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// The demo's classifier, briefly trained (so BN statistics and ranges are a trained
// network's), deployed in precision `p`.
void deploy_network(benchmark::State& state, Precision p) {
  const std::int64_t n = 256;
  auto net = examples::build_classifier(16, 4, 1, orepa_maker<float>());
  const auto data = make_bars_dataset<float>(n, 7, 32);
  Tensor<float> grad;
  Rng rng(3);
  for (int step = 0; step < 3; ++step) {
    const Tensor<float>& logits = net.forward_train(data.images);
    grad.resize(logits.sizes());
    fill_uniform(grad, 1e-3, rng);
    net.zero_grad();
    net.backward(grad);
  }
  const InferenceChain<float> fp32 = net.deploy();
  Calibrator cal;
  cal.observe(fp32, data.images);
  try {
    const InferenceChain<float> chain =
        p == Precision::fp32 ? fp32 : net.deploy(DeployOptions().precision(p).calibration(cal.calibration()));
    Tensor<float> y = chain.forward(data.images);
    for (auto _ : state) {
      y = chain.forward(data.images);
      benchmark::DoNotOptimize(y.data());
    }
  } catch (const engine_error& e) {
    state.SkipWithError(e.what());
  }
}

const bool deploy_registered = [] {
  benchmark::AddCustomContext("onednn_isa", engine::cpu_isa_name());  // the kernels differ per ISA
  for (auto n : kBatches)
    for (const auto& l : kLayers) {
      const std::string tail = std::string(l.name) + "/n" + std::to_string(n);
      benchmark::RegisterBenchmark(("deploy/" + tail).c_str(), deploy_plain, l, n, MemoryFormat::contiguous)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("deploy_nhwc/" + tail).c_str(), deploy_plain, l, n, MemoryFormat::channels_last)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("reorder_in/" + tail).c_str(), reorder_alone, l, n, true)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("reorder_out/" + tail).c_str(), reorder_alone, l, n, false)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("deploy_blocked/" + tail).c_str(), deploy_blocked, l, n)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("raw_onednn/" + tail).c_str(), raw_onednn, l, n, false, Precision::fp32)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("raw_onednn_nchw/" + tail).c_str(), raw_onednn, l, n, true, Precision::fp32)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      for (Precision p : {Precision::bf16, Precision::int8})
        benchmark::RegisterBenchmark(("raw_onednn_" + std::string(precision_name(p)) + "/" + tail).c_str(), raw_onednn,
                                     l, n, false, p)
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond);
      for (Precision p : {Precision::bf16, Precision::int8})
        for (bool blocked : {false, true})
          benchmark::RegisterBenchmark(("deploy_" + std::string(precision_name(p)) + (blocked ? "_blocked/" : "/") + tail).c_str(),
                                       deploy_reduced, l, n, p, blocked)
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond);
    }
  for (Precision p : {Precision::fp32, Precision::bf16, Precision::int8})
    benchmark::RegisterBenchmark((std::string("deploy_network/") + precision_name(p) + "/n256").c_str(), deploy_network, p)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  for (auto n : kBatches)
    for (std::string api : {"nchw", "blocked", "int8"})
      benchmark::RegisterBenchmark(("deploy_chain/" + api + "/n" + std::to_string(n)).c_str(), deploy_chain, api, n)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace
}  // namespace orepa::bench
