// Fuzz target: block configurations and input shapes.
//
// The bytes choose a block type (OREPA, OREPA_1x1, OREPA_LargeConv or yolo_conv), an
// activation, channels, kernel, stride, groups, dilation, padding and an input shape, all
// from small ranges that reach a little past the valid values (so the configuration
// checks are exercised too), and now and then an extreme padding, dilation or stride.
// An accepted configuration then runs one forward_train, backward, forward_eval and
// deploy().forward in float. The work per input stays tiny: at most 16 channels, 24x24
// images, a batch of 3 and outputs of 2^22 elements; extreme values are never used for
// channels, kernel or image size, where tensors up to max_tensor_bytes are legitimate.
//
// Self-checks on accepted inputs: output shapes follow the geometry; with finite input
// every output and gradient is finite; the deployed conv agrees with forward_eval.
// Inputs flagged as "poisoned" carry a NaN or an infinity and must only not crash, except
// that deploy() must refuse (value_error) once they poisoned BN's running statistics.
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>

#include "fuzz_common.hpp"
#include "orepa/blocks/yolo.hpp"  // OREPA, OREPA_1x1, OREPA_LargeConv and yolo_conv

using namespace orepa;

namespace {

struct Config {
  int kind = 0;  // 0 OREPA, 1 OREPA_1x1, 2 OREPA_LargeConv, 3 yolo_conv
  std::int64_t in = 1, out = 1, kernel = 1, stride = 1, groups = 1, dilation = 1, padding = -1, internal = 0;
  std::int64_t n = 1, h = 1, w = 1;
  std::uint64_t seed = 0;
  int poison = 0;  // 0 none, 1 NaN, 2 +Inf, 3 -Inf in one input element
};

template <class Act>
AnyBlock<float> make_block(const Config& c) {
  auto opts = ConvOptions(c.in, c.out, c.kernel).stride(c.stride).groups(c.groups).dilation(c.dilation).seed(c.seed);
  if (c.padding != -1) opts.padding(c.padding);  // -1: autopad
  switch (c.kind) {
    case 0: return OREPA<float, Act>(OrepaOptions(opts).internal_channels(c.internal));
    case 1: return OREPA_1x1<float, Act>(opts);
    case 2: return OREPA_LargeConv<float, Act>(opts);
    default: return yolo_conv<float, Act>(opts);
  }
}

bool all_finite(const Tensor<float>& t) {
  for (float v : t)
    if (!std::isfinite(v)) return false;
  return true;
}

template <class Act>
void run(const Config& c) {
  auto block = make_block<Act>(c);  // config_error for an invalid configuration
  Rng rng(c.seed);
  Tensor<float> x({c.n, c.in, c.h, c.w});
  fill_uniform(x, 1.0, rng);
  if (c.poison && x.numel() > 0) {
    const float bad[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                         -std::numeric_limits<float>::infinity()};
    x[std::int64_t(rng.below(std::uint64_t(x.numel())))] = bad[c.poison - 1];
  }
  const bool finite = c.poison == 0;

  // shape_error when the input is smaller than the kernel, config_error when the output is too large.
  const Shape expected = block.geometry().output_shape(x.sizes(), "fuzz");
  // The library accepts outputs up to max_tensor_bytes (16 GiB), far above libFuzzer's 2 GiB
  // memory limit; such outputs (only the extreme padding reaches them, e.g. 65535 x 65535
  // from padding 2^16) are legitimate, so they end here once output_shape accepted them.
  if (checked_numel(expected) > (std::int64_t(1) << 22)) return;
  const Tensor<float>& y = block.forward_train(x);  // state_error for one value per channel
  fuzz::require(y.sizes() == expected, "forward_train output shape");
  fuzz::require(!finite || all_finite(y), "forward_train produced a non-finite value from finite input");

  Tensor<float> dy(y.sizes());
  fill_uniform(dy, 1.0, rng);
  const Tensor<float>& dx = block.backward(dy);
  fuzz::require(dx.sizes() == x.sizes(), "backward input-gradient shape");
  fuzz::require(!finite || all_finite(dx), "backward produced a non-finite input gradient");
  for (auto* p : block.parameters()) fuzz::require(!finite || all_finite(p->grad), "backward produced a non-finite gradient");

  const Tensor<float> e = block.forward_eval(x);
  // A poisoned batch usually poisons BN's running statistics: deploy must then refuse.
  bool stats_finite = true;
  for (auto* bn : block.batch_norms())
    stats_finite = stats_finite && all_finite(bn->running_mean.value) && all_finite(bn->running_var.value);
  if (!stats_finite) {
    try {
      (void)block.deploy();
    } catch (const value_error&) {
      return;
    }
    fuzz::finding("deploy accepted non-finite running statistics");
  }
  const Tensor<float> d = block.deploy().forward(x);
  fuzz::require(e.sizes() == expected && d.sizes() == expected, "eval / deployed output shape");
  if (finite) {
    fuzz::require(all_finite(e) && all_finite(d), "eval / deployed output not finite");
    for (std::int64_t j = 0; j < e.numel(); ++j)
      fuzz::require(std::fabs(e[j] - d[j]) <= 1e-3f * (1.0f + std::fabs(e[j])), "deployed output differs from eval");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  auto pick = [&](std::int64_t lo, std::int64_t hi) { return in.ConsumeIntegralInRange<std::int64_t>(lo, hi); };
  Config c;
  c.kind = int(pick(0, 3));
  const int act = int(pick(0, 2));
  c.in = pick(0, 16);
  c.out = pick(0, 16);
  c.kernel = pick(0, 9);
  c.stride = pick(0, 4);
  c.groups = pick(0, 8);
  c.dilation = pick(0, 3);
  c.padding = pick(-2, 4);  // -1 = autopad
  c.internal = pick(0, 8);  // 0 = the reference rule
  c.n = pick(0, 3);
  c.h = pick(0, 24);
  c.w = pick(0, 24);
  c.poison = int(pick(0, 15));
  c.poison = c.poison <= 3 ? c.poison : 0;
  // Rarely, one extreme value: arithmetic on it must not overflow, and it must be rejected
  // (or handled) before anything of that size is allocated. 2^16 is the largest stride,
  // padding and dilation accepted (max_conv_param).
  const std::int64_t extremes[] = {std::int64_t(1) << 16,       (std::int64_t(1) << 16) + 1,
                                   std::int64_t(1) << 31,       (std::int64_t(1) << 31) - 1,
                                   std::int64_t(1) << 62,       std::numeric_limits<std::int64_t>::max()};
  const auto extreme = [&] { return extremes[pick(0, 5)]; };
  switch (pick(0, 15)) {
    case 1: c.padding = extreme(); break;
    case 2: c.dilation = extreme(); break;
    case 3: c.stride = extreme(); break;
    default: break;
  }
  c.seed = in.ConsumeIntegral<std::uint64_t>();

  fuzz::run_accepting_orepa_errors([&] {
    switch (act) {
      case 0: run<Identity>(c); break;
      case 1: run<ReLU>(c); break;
      default: run<SiLU>(c); break;
    }
  });
  return 0;
}
