// Fuzz target: model yamls (yolo/config.hpp) and the network builder (yolo/model.hpp).
//
// The bytes are the text of a model yaml. parse_model_config must accept it or throw an
// orepa error; an accepted configuration is built into a yolo::Model<float> (which runs
// a stride probe on a 128 x 128 image), deployed, and run on one image of the largest
// stride's size; every fourth input (by a hash of the text) is also deployed in int8 over
// a fixed range for every convolution, which exercises the code plan of odd graphs
// (concatenations of one layer with itself, chains of upsampling, ...).
//
// The work per input stays small by this harness's own rule, not the library's: a
// configuration whose sizes are legitimate but slow (after scaling, more than 48 output
// channels in a layer, 3 repeats, 40 layers, 80 classes, 9 anchors per level, kernels
// over 7, pools over 9, padding over 4, upsampling by more than 2 twice, an estimated
// 3e8 multiply-adds in the convolutions of the probe) is skipped before building. Values far beyond any real
// network (above 1e12) are not skipped: the library must reject them itself, cheaply.
//
// Self-checks on a built network: the deployed fp32 output has eval's shape and, when
// finite, eval's values (1e-3 of their magnitude); the int8 output has the same shape.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "fuzz_common.hpp"
#include "orepa/yolo/model.hpp"

using namespace orepa;

namespace {

// True for a value the library accepts but that would make the run slow: above `small`
// and not absurdly large (absurd values must be rejected by the library).
bool slow(double v, double small) { return v > small && v <= 1e12; }

// Whether `cfg` is small enough to build quickly (see the file comment). The work is
// estimated in multiply-adds on the stride probe's 128 x 128 image, each layer at its
// resolution.
bool small_enough(const yolo::ModelConfig& cfg) {
  if (cfg.layers.size() > 40 || slow(double(cfg.nc), 80) || slow(double(cfg.input_channels), 4)) return false;
  for (const auto& level : cfg.anchors)
    if (level.size() > 18) return false;
  std::vector<double> ch, pixels;  // estimated output channels and pixels per layer
  double work = 0, upsampling = 1;
  for (std::size_t i = 0; i < cfg.layers.size(); ++i) {
    const auto& row = cfg.layers[i];
    double c_in = 0, px = 0;
    for (auto f : row.from) {
      const std::int64_t j = i == 0 ? -1 : (f < 0 ? std::int64_t(i) + f : f);
      c_in += j < 0 ? double(cfg.input_channels) : ch[std::size_t(j)];
      px = std::max(px, j < 0 ? 128.0 * 128.0 : pixels[std::size_t(j)]);
    }
    const double reps = row.number > 1 ? std::nearbyint(double(row.number) * cfg.depth_multiple) : 1;
    if (slow(reps, 3)) return false;
    auto number = [&](std::size_t k, double fallback) {
      return k < row.args.size() && row.args[k].kind == yolo::Arg::Kind::number ? row.args[k].number : fallback;
    };
    const std::string& m = row.module;
    double c_out = c_in;
    if (m == "Conv" || m == "OREPA" || m == "OREPA_1x1" || m == "C3" || m == "Bottleneck" || m == "SPPF") {
      c_out = std::max(8.0, number(0, 1) * cfg.width_multiple);
      if (slow(c_out, 48)) return false;
      double k = 1;
      if (m == "Conv" || m == "OREPA" || m == "OREPA_1x1") {
        k = number(1, 1);
        const double stride = number(2, 1);
        if (slow(k, 7) || slow(stride, 64) || slow(number(3, 0), 4) || slow(number(5, 1), 3)) return false;
        if (stride >= 1) px = std::max(1.0, px / (stride * stride));
      } else if (m == "SPPF") {
        if (slow(number(1, 5), 9)) return false;
      } else {
        k = 3;  // C3 / Bottleneck: 1x1 and 3x3 convolutions
      }
      if (c_out <= 1e12 && c_in <= 1e12 && k <= 1e6)
        work += c_in * c_out * k * k * std::max(reps, 1.0) * (m == "C3" ? 3 : 1) * px;
    } else if (m == "nn.Upsample") {
      const double f = number(1, 2);
      if (slow(f, 2)) return false;
      if (f > 1 && f <= 2) upsampling *= f, px *= f * f;
    } else if (m == "Detect") {
      c_out = 0;
    }
    ch.push_back(std::min(c_out, 1e13));
    pixels.push_back(px);
  }
  return upsampling <= 4 && work <= 3e8;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::run_accepting_orepa_errors([&] {
    const yolo::ModelConfig cfg = yolo::parse_model_config(text, "fuzz.yaml");
    fuzz::require(!cfg.layers.empty(), "an accepted config has layers");
    if (!small_enough(cfg)) return;
    yolo::Model<float> model(cfg);
    fuzz::require(!model.strides().empty(), "a built model has strides");
    const auto stride = std::int64_t(*std::max_element(model.strides().begin(), model.strides().end()));
    Tensor<float> x({1, model.input_channels(), stride, stride});
    Rng rng(size);
    fill_uniform(x, 1.0, rng);
    const auto eval = model.forward_eval(x);
    const auto deployed = model.deploy();
    const auto dep = deployed.forward(x);
    fuzz::require(dep.pred.sizes() == eval.pred.sizes() && dep.raw.size() == eval.raw.size(), "deployed output shape");
    double scale = 0;
    bool finite = true;
    for (float v : eval.pred) finite = finite && std::isfinite(v), scale = std::max(scale, double(std::abs(v)));
    if (finite)
      fuzz::require(max_abs_diff(dep.pred, eval.pred) <= 1e-3 * (1 + scale), "deployed output differs from eval");
    if (std::hash<std::string>()(text) % 4 == 0) {
      Calibration cal;
      deployed.visit_convs("", [&](const std::string& name, const DeployedConv<float>&) { cal.set(name, {-4.0f, 4.0f}); });
      const auto int8 = model.deploy(DeployOptions().precision(Precision::int8).calibration(cal)).forward(x);
      fuzz::require(int8.pred.sizes() == eval.pred.sizes(), "int8 output shape");
    }
  });
  return 0;
}
