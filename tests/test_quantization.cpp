// bf16 / int8 deployment: each deployed convolution against the reference convolution of
// the same quantized operands, calibration against the data, the error report against
// SQNRs computed here, and the errors a user can hit. ctest runs this suite twice: as is,
// and with oneDNN capped at AVX2 (no VNNI, no bf16), where int8 takes s8 activations and
// bf16 must fail with the missing ISA named.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <sstream>
#include <thread>
#include <variant>
#include <vector>

#include "orepa/deploy/onednn_interop.hpp"
#include "test_util.hpp"

using namespace orepa;
using namespace orepa::test;

namespace {

// A kernel whose per-output-channel magnitudes differ 16x, as folded BN makes them.
Tensor<float> spread_kernel(const ConvGeometry& g, Rng& rng) {
  Tensor<float> w = random_tensor<float>(g.weight_shape(), rng, 0.3);
  const std::int64_t per = w.numel() / g.out_channels;
  for (std::int64_t o = 0; o < g.out_channels; ++o)
    for (std::int64_t j = 0; j < per; ++j) w[o * per + j] *= std::pow(16.f, float(o) / float(g.out_channels));
  return w;
}

// act(conv(x, w) + b) in double through the reference convolution, as float.
Tensor<float> reference_output(const ConvGeometry& g, const Tensor<float>& x, const Tensor<float>& w,
                               const Tensor<float>& b, ActivationKind act) {
  auto to_d = [](const Tensor<float>& t) {
    Tensor<double> d(t.sizes());
    for (std::int64_t i = 0; i < t.numel(); ++i) d[i] = t[i];
    return d;
  };
  const Tensor<double> y = reference::conv2d(to_d(x), to_d(w), g, to_d(b));
  Tensor<float> out(y.sizes());
  for (std::int64_t i = 0; i < y.numel(); ++i) {
    const double v = y[i];
    out[i] = float(act == ActivationKind::relu      ? std::max(v, 0.0)
                   : act == ActivationKind::silu    ? v / (1 + std::exp(-v))
                   : act == ActivationKind::sigmoid ? 1 / (1 + std::exp(-v))
                                                    : v);
  }
  return out;
}

AnyActivation<float> activation(ActivationKind k) {
  if (k == ActivationKind::relu) return AnyActivation<float>(ReLU{});
  if (k == ActivationKind::silu) return AnyActivation<float>(SiLU{});
  if (k == ActivationKind::sigmoid) return AnyActivation<float>(Sigmoid{});
  return AnyActivation<float>(Identity{});
}

struct Case {
  ConvGeometry g;
  ActivationKind act;
  const char* name;
};

std::vector<Case> cases() {
  auto geo = [](std::int64_t i, std::int64_t o, std::int64_t k, std::int64_t s, std::int64_t groups) {
    ConvGeometry g;
    g.in_channels = i, g.out_channels = o, g.kernel = k, g.stride = s, g.padding = k / 2, g.groups = groups;
    return g;
  };
  return {{geo(16, 32, 3, 1, 1), ActivationKind::silu, "16->32 k3 SiLU"},
          {geo(16, 32, 3, 2, 1), ActivationKind::relu, "16->32 k3 s2 ReLU"},
          {geo(16, 16, 3, 1, 2), ActivationKind::silu, "16->16 k3 g2 SiLU"},
          {geo(16, 16, 3, 1, 16), ActivationKind::silu, "16 depthwise k3 SiLU"},
          {geo(16, 24, 1, 1, 1), ActivationKind::identity, "16->24 1x1 linear"},
          {geo(16, 24, 1, 1, 1), ActivationKind::sigmoid, "16->24 1x1 Sigmoid (a Detect head's)"}};
}

// Runs `c` in precision `p` on `x`, or skips the test (printing why) when oneDNN cannot
// create that primitive on this CPU; the error must name the precision and the ISA.
bool run_or_skip(const DeployedConv<float>& c, const Tensor<float>& x, Tensor<float>& y) {
  try {
    y = c.forward(x);
    return true;
  } catch (const engine_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(precision_name(c.precision())), std::string::npos) << what;
    EXPECT_NE(what.find(engine::cpu_isa_name()), std::string::npos) << what;
    std::printf("  [skip reason] %s\n", what.c_str());
    return false;
  }
}

}  // namespace

TEST(Quantization, Int8ConvEqualsTheReferenceConvOfTheQuantizedOperands) {
  Rng rng(3);
  for (const auto& c : cases()) {
    SCOPED_TRACE(c.name);
    const Tensor<float> w = spread_kernel(c.g, rng), b = random_tensor<float>({c.g.out_channels}, rng, 0.5);
    // Asymmetric input (as after SiLU): the zero point matters.
    Tensor<float> x = random_tensor<float>({2, c.g.in_channels, 9, 9}, rng, 1.5);
    for (auto& v : x) v += 0.5f;
    DeployedConv<float> fp32(c.g, w, b, activation(c.act)), int8 = fp32;
    int8.precision(Precision::int8, {-1.0f, 2.0f});
    Tensor<float> y;
    ASSERT_TRUE(run_or_skip(int8, x, y)) << "int8 convolutions exist on every x86-64 oneDNN supports";

    // The operands as the primitive sees them: codes of x, per-channel s8 codes of w.
    const QuantParams q = int8.input_quantization();
    EXPECT_EQ(q.qmin, engine::cpu_has_vnni() ? 0 : -128);
    Tensor<float> xq = x;
    for (auto& v : xq) v = q.dequantize(q.quantize(v));
    const std::vector<float> sw = weight_scales(w);
    const float adjust = engine::cpu_has_vnni() ? 1.f : 0.5f;  // oneDNN halves s8 weights without VNNI
    Tensor<float> wq = w;
    const std::int64_t per = w.numel() / c.g.out_channels;
    for (std::int64_t j = 0; j < w.numel(); ++j) {
      const float inv = adjust / sw[std::size_t(j / per)];
      wq[j] = std::nearbyint(w[j] * inv) / inv;
    }
    expect_close(int8.effective_weight(), wq, 1e-6, "effective_weight");
    const Tensor<float> want = reference_output(c.g, xq, wq, b, c.act);
    expect_close(y, want, 2e-5, "int8 conv vs reference conv of the quantized operands");
    // And it is a usable approximation of fp32 (> 25 dB even with the 16x channel spread).
    const Tensor<float> y32 = fp32.forward(x);
    EXPECT_GT(sqnr_db(y32.data(), y.data(), y.numel()), 25.0);
    // Channels-last tensors give the same numbers.
    expect_close(int8.forward(x.to(MemoryFormat::channels_last)).to(MemoryFormat::contiguous), y, 1e-6,
                 "int8 on channels-last input");
  }
}

TEST(Quantization, Bf16ConvEqualsTheReferenceConvOfBf16RoundedOperands) {
  Rng rng(4);
  for (const auto& c : cases()) {
    SCOPED_TRACE(c.name);
    const Tensor<float> w = spread_kernel(c.g, rng), b = random_tensor<float>({c.g.out_channels}, rng, 0.5);
    const Tensor<float> x = random_tensor<float>({2, c.g.in_channels, 9, 9}, rng, 1.5);
    DeployedConv<float> bf16(c.g, w, b, activation(c.act));
    bf16.precision(Precision::bf16);
    Tensor<float> y;
    if (!run_or_skip(bf16, x, y)) GTEST_SKIP() << "oneDNN has no bf16 convolution on ISA " << engine::cpu_isa_name();
    Tensor<float> xr = x, wr = w;
    for (auto& v : xr) v = round_to_bf16(v);
    for (auto& v : wr) v = round_to_bf16(v);
    expect_close(bf16.effective_weight(), wr, 0, "effective_weight");
    expect_close(y, reference_output(c.g, xr, wr, b, c.act), 2e-5, "bf16 conv vs reference conv of rounded operands");
  }
}

// bf16 "codes" are floats rounded to the nearest bf16, ties to even, found here by
// comparing the two bf16 neighbours in double; NaN and Inf stay what they are.
TEST(Quantization, Bf16CodesAreTheNearestBf16TiesToEven) {
  const float inf = std::numeric_limits<float>::infinity(), big = std::numeric_limits<float>::max();
  std::vector<float> values = {0.f, -0.f, 1.f, -2.5f, 1e-40f, -1e-40f, big, -big, inf, -inf, 3.0e38f};
  for (std::uint32_t u : {0x3F808000u, 0x3F818000u, 0x3F80C000u, 0x3F804000u, 0xBF818000u, 0x7F7F8000u}) {  // ties
    float f;
    std::memcpy(&f, &u, 4);
    values.push_back(f);
  }
  Rng rng(3);
  for (int i = 0; i < 200; ++i) values.push_back(float(rng.uniform(-1e3, 1e3)));
  values.push_back(std::numeric_limits<float>::quiet_NaN());
  const std::int64_t n = std::int64_t(values.size());
  Tensor<float> x({1, n, 1, 1});
  std::copy(values.begin(), values.end(), x.begin());
  const Int8Codes codes = quantize_codes(x, QuantParams::bfloat16());
  EXPECT_EQ(codes.element_size(), 2);
  for (std::int64_t i = 0; i < n; ++i) {
    const float v = values[std::size_t(i)];
    const float got = codes.value(i);
    if (std::isnan(v)) {
      EXPECT_TRUE(std::isnan(got));
      continue;
    }
    std::uint32_t u;
    std::memcpy(&u, &v, 4);
    const std::uint32_t lo_bits = u & 0xFFFF0000u, hi_bits = lo_bits + 0x10000u;  // |lo| <= |v| <= |hi|
    float lo, hi;
    std::memcpy(&lo, &lo_bits, 4);
    std::memcpy(&hi, &hi_bits, 4);
    const double hi_d = std::isinf(hi) ? std::copysign(std::ldexp(1.0, 128), double(v)) : double(hi);  // past max
    const double dl = std::fabs(double(v) - double(lo)), dh = std::fabs(double(v) - hi_d);
    const float want = std::isinf(v) ? v : dl < dh ? lo : dh < dl ? hi : ((lo_bits >> 16) & 1u) ? hi : lo;
    EXPECT_EQ(got, want) << "value " << i << " = " << v;
    EXPECT_EQ(got, round_to_bf16(v)) << "value " << i << " = " << v;
  }
  const Tensor<float> back = dequantize_codes(codes);
  for (std::int64_t i = 0; i + 1 < n; ++i) EXPECT_EQ(back[i], codes.value(i));
}

// Codes are NHWC whatever the input's layout: an NCHW image (three channels, which take a
// loop of their own, and five) gives at pixel (n, h, w), channel c the code of x(n, c, h, w),
// and the images holding a NaN are found on either layout.
TEST(Quantization, CodesOfNchwInputAreTheCodesOfEachValueInNhwcOrder) {
  Rng rng(5);
  for (const Shape& shape : {Shape{2, 3, 5, 7}, Shape{2, 5, 4, 3}}) {
    Tensor<float> x = random_tensor<float>(shape, rng, 2.0);
    x(1, shape[1] - 1, 2, 1) = std::numeric_limits<float>::quiet_NaN();
    const std::int64_t C = shape[1], H = shape[2], W = shape[3];
    for (const QuantParams& q : {QuantParams::for_range({-1.f, 1.5f}, false), QuantParams::for_range({-1.f, 1.5f}, true),
                                 QuantParams::bfloat16()}) {
      for (const MemoryFormat f : {MemoryFormat::contiguous, MemoryFormat::channels_last}) {
        SCOPED_TRACE(::testing::Message() << shape_str(shape) << (q.bf16 ? " bf16" : q.qmin < 0 ? " s8" : " u8")
                                          << (f == MemoryFormat::channels_last ? " channels-last" : " NCHW"));
        std::vector<std::int64_t> bad;
        const Int8Codes codes = detail::quantize_codes_finding_non_finite(x.to(f), q, bad);
        for (std::int64_t n = 0; n < 2; ++n)
          for (std::int64_t c = 0; c < C; ++c)
            for (std::int64_t h = 0; h < H; ++h)
              for (std::int64_t w = 0; w < W; ++w) {
                const std::int64_t i = ((n * H + h) * W + w) * C + c;
                const float v = x(n, c, h, w);
                if (q.bf16) {
                  if (std::isnan(v)) ASSERT_TRUE(std::isnan(codes.value(i))) << i;
                  else ASSERT_EQ(codes.value(i), round_to_bf16(v)) << i;
                } else {
                  const std::int32_t code = q.qmin < 0 ? std::int32_t(std::int8_t(codes.bytes[std::size_t(i)]))
                                                       : std::int32_t(codes.bytes[std::size_t(i)]);
                  ASSERT_EQ(code, q.quantize(v)) << i;
                }
              }
        EXPECT_EQ(bad, q.bf16 ? std::vector<std::int64_t>{} : std::vector<std::int64_t>{1});  // bf16 carries NaN
      }
    }
  }
}

// A bf16 convolution given bf16 values writes bf16 values (its f32 result rounded once,
// by the primitive): within one bf16 step of rounding its float output.
TEST(Quantization, Bf16ConvReadsAndWritesBf16Values) {
  Rng rng(12);
  ConvGeometry g;
  g.in_channels = 8, g.out_channels = 24, g.kernel = 3, g.padding = 1;
  DeployedConv<float> conv(g, spread_kernel(g, rng), random_tensor<float>({24}, rng), activation(ActivationKind::silu));
  conv.precision(Precision::bf16);
  ASSERT_TRUE(conv.int8_input().has_value());
  EXPECT_TRUE(conv.int8_input()->bf16);
  const Tensor<float> x = random_tensor<float>({2, 8, 10, 10}, rng);
  const Int8Codes in = quantize_codes(x, QuantParams::bfloat16());
  const QuantParams want = QuantParams::bfloat16();
  StageOutput<float> out;
  try {
    out = conv.forward_int8(&in, &want);
  } catch (const engine_error&) {
    GTEST_SKIP() << "oneDNN has no bf16 convolution on ISA " << engine::cpu_isa_name();
  }
  ASSERT_TRUE(std::holds_alternative<Int8Codes>(out));
  const Int8Codes& y = std::get<Int8Codes>(out);
  EXPECT_TRUE(y.q.bf16);
  const Tensor<float> real = conv.forward(dequantize_codes(in)).to(MemoryFormat::channels_last);
  ASSERT_EQ(real.sizes(), y.shape);
  std::int64_t same = 0;
  for (std::int64_t i = 0; i < real.numel(); ++i) {
    const float r = round_to_bf16(real[i]);
    ASSERT_LE(std::fabs(y.value(i) - r), std::ldexp(std::fabs(r), -7) + 1e-30f) << "element " << i;
    same += y.value(i) == r;
  }
  EXPECT_GE(double(same), 0.99 * double(real.numel()));
  // The same convolution asked for int8 codes (another precision's) gives them through float.
  const QuantParams q8 = QuantParams::for_range({-1.f, 4.f}, false);
  const StageOutput<float> codes8 = conv.forward_int8(&in, &q8);
  ASSERT_TRUE(std::holds_alternative<Int8Codes>(codes8));
  for (std::int64_t i = 0; i < real.numel(); ++i)
    ASSERT_LE(std::abs(std::get<Int8Codes>(codes8).code(i) - q8.quantize(real[i])), 1) << "element " << i;
}

// A Bottleneck's shortcut added by the primitive (a sum post-op on codes) gives the codes
// of the float sum act(conv(x) + b) + r, within one code (one bf16 step): in int8 with the
// residual in another quantization and signedness, and in bf16.
TEST(Quantization, ConvAddsAResidualOfCodesInItsPrimitive) {
  Rng rng(21);
  ConvGeometry g;
  g.in_channels = 16, g.out_channels = 16, g.kernel = 3, g.padding = 1;
  const Tensor<float> w = spread_kernel(g, rng), b = random_tensor<float>({16}, rng);
  const Tensor<float> x = random_tensor<float>({2, 16, 9, 11}, rng), r = random_tensor<float>({2, 16, 9, 11}, rng, 2.0);
  for (Precision p : {Precision::int8, Precision::bf16}) {
    SCOPED_TRACE(precision_name(p));
    DeployedConv<float> conv(g, w, b, activation(ActivationKind::silu));
    conv.precision(p, {-1.f, 1.f});
    const QuantParams in = *conv.int8_input();
    const QuantParams out = p == Precision::bf16 ? QuantParams::bfloat16() : QuantParams::for_range({-3.f, 4.f}, false);
    const QuantParams rq = p == Precision::bf16 ? QuantParams::bfloat16() : QuantParams::for_range({-2.f, 2.f}, true);
    const Int8Codes xc = quantize_codes(x, in), rc = quantize_codes(r, rq);
    StageOutput<float> got;
    try {
      got = conv.forward_int8_adding(&xc, rc, out);
    } catch (const engine_error&) {
      if (p != Precision::bf16) throw;
      std::printf("  no bf16 convolution on ISA %s: bf16 not checked\n", engine::cpu_isa_name().c_str());
      continue;
    }
    ASSERT_TRUE(std::holds_alternative<Int8Codes>(got));
    const Int8Codes& y = std::get<Int8Codes>(got);
    ASSERT_EQ(y.shape, (Shape{2, 16, 9, 11}));
    Tensor<float> want = conv.forward(dequantize_codes(xc)).to(MemoryFormat::channels_last);
    const Tensor<float> rr = dequantize_codes(rc);
    for (std::int64_t i = 0; i < want.numel(); ++i) want[i] += rr[i];
    const Int8Codes wc = quantize_codes(want, out);
    std::int64_t same = 0;
    for (std::int64_t i = 0; i < want.numel(); ++i) {
      if (p == Precision::bf16)
        ASSERT_LE(std::fabs(y.value(i) - wc.value(i)), std::ldexp(std::fabs(wc.value(i)), -7) + 1e-30f)
            << "element " << i;
      else
        ASSERT_LE(std::abs(y.code(i) - wc.code(i)), 1) << "element " << i;
      same += y.code(i) == wc.code(i);
    }
    EXPECT_GE(double(same), 0.95 * double(want.numel()));
    const Int8Codes narrower = quantize_codes(Tensor<float>({2, 16, 9, 10}, MemoryFormat::channels_last), rq);
    EXPECT_THROW(conv.forward_int8_adding(&xc, narrower, out), shape_error);
  }
}

TEST(Quantization, WrongSettingsAreRefusedWithTheReason) {
  ConvGeometry g;
  g.in_channels = 4, g.out_channels = 4, g.kernel = 3, g.padding = 1;
  DeployedConv<float> c(g, Tensor<float>(g.weight_shape(), 0.1f), Tensor<float>({4}));
  EXPECT_THROW(c.precision(Precision::int8), value_error);  // no range: [0, 0]
  EXPECT_THROW(c.precision(Precision::int8, {1.f, -1.f}), value_error);
  EXPECT_THROW(c.precision(Precision::int8, {0.f, std::numeric_limits<float>::infinity()}), value_error);
  DeployedConv<double> d(g, Tensor<double>(g.weight_shape(), 0.1), Tensor<double>({4}));
  EXPECT_THROW(d.precision(Precision::bf16), config_error);
  EXPECT_THROW(parse_precision("int4"), config_error);
  EXPECT_EQ(parse_precision("bf16"), Precision::bf16);

  Sequential<float> net;
  net.add(OREPA<float, SiLU>(OrepaOptions(3, 4, 3)));
  net.add(GlobalAvgPool<float>());
  try {
    net.deploy(DeployOptions().precision(Precision::int8));
    ADD_FAILURE() << "int8 without calibration must throw";
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find("'0.'"), std::string::npos) << e.what();
  }
}

TEST(Quantization, MinMaxCalibrationIsTheDataRangeWithZero) {
  ConvGeometry g;
  g.in_channels = 2, g.out_channels = 2, g.kernel = 1;
  DeployedConv<float> c(g, Tensor<float>(g.weight_shape(), 1.f), Tensor<float>({2}));
  Calibrator cal(CalibrationMethod::minmax);
  Tensor<float> a({1, 2, 2, 2}, 0.5f), b({1, 2, 2, 2}, 0.25f);
  a[3] = 3.5f, b[5] = 0.125f;
  cal.observe(c, a);
  cal.observe(c, b);
  const ActivationRange r = cal.calibration().at("");
  EXPECT_EQ(r.lo, 0.f);  // all values positive: the range still holds 0
  EXPECT_EQ(r.hi, 3.5f);
  Tensor<float> n({1, 2, 2, 2}, -2.f);
  cal.observe(c, n);
  EXPECT_EQ(cal.calibration().at("").lo, -2.f);
  n[5] = std::nanf("");
  try {
    cal.observe(c, n);
    ADD_FAILURE() << "a NaN calibration value must throw";
  } catch (const value_error& e) {  // names the layer (the single block's ""), the index and the value
    const std::string what = e.what();
    for (const char* part : {"single deployed block", "[1, 2, 2, 2]", "holds nan at index [0, 1, 0, 1]"})
      EXPECT_NE(what.find(part), std::string::npos) << part << " in: " << what;
  }
}

// At 8 bits clipping pays only for rare outliers: one value at 40 among a million in
// [-1, 1] costs 39^2 clipped, but 1e6 * (41/255)^2 / 12 in resolution kept.
TEST(Quantization, MseCalibrationClipsRareOutliers) {
  ConvGeometry g;
  g.in_channels = 1, g.out_channels = 1, g.kernel = 1;
  DeployedConv<float> c(g, Tensor<float>(g.weight_shape(), 1.f), Tensor<float>({1}));
  Rng rng(5);
  Tensor<float> x = random_tensor<float>({1, 1, 1000, 1000}, rng, 1.0);
  x[12345] = 40.f;
  Calibrator mm(CalibrationMethod::minmax), mse(CalibrationMethod::mse, 1 << 24);
  mm.observe(c, x);
  mse.observe(c, x);
  const ActivationRange full = mm.calibration().at(""), clipped = mse.calibration().at("");
  EXPECT_EQ(full.hi, 40.f);
  EXPECT_LT(clipped.hi, 0.5f * full.hi);
  auto error = [&](ActivationRange r) {  // the quantization error over every value, computed directly
    const QuantParams q = QuantParams::for_range(r, false);
    double e = 0;
    for (float v : x) e += (v - q.dequantize(q.quantize(v))) * (v - q.dequantize(q.quantize(v)));
    return e;
  };
  EXPECT_LT(error(clipped), 0.9 * error(full)) << "clipped [" << clipped.lo << ", " << clipped.hi << "]";
}

TEST(Quantization, CalibrationRoundTripsThroughSafetensorsWithTheWeights) {
  Calibration c;
  c.set("0.", {-0.25f, 3.f});
  c.set("2.", {0.f, 1.5f});
  io::SafetensorsWriter w;
  w.add("0.weight", Tensor<float>({2, 2, 1, 1}, 1.f));  // deployed weights may share the file
  io::save_calibration(c, w);
  const auto f = io::SafetensorsFile::from_bytes(w.to_bytes());
  const Calibration back = io::load_calibration(f);
  ASSERT_EQ(back.size(), 2u);
  EXPECT_EQ(back.at("0.").lo, -0.25f);
  EXPECT_EQ(back.at("0.").hi, 3.f);
  EXPECT_EQ(back.at("2.").hi, 1.5f);
  io::SafetensorsWriter bad;
  bad.add("1.input_range", Tensor<float>({3}, 1.f));
  EXPECT_THROW(io::load_calibration(io::SafetensorsFile::from_bytes(bad.to_bytes())), format_error);
}

namespace {
// int8 (and bf16) deployment of one trained block of type B: calibrated, its report's
// weight SQNR against one computed here, its output against fp32.
template <class B>
void quantize_block(B block, const std::string& type) {
  SCOPED_TRACE(type);
  Rng rng(6);
  const Shape xs{4, block.geometry().in_channels, 10, 10};
  for (int step = 0; step < 2; ++step) {  // non-trivial BN statistics
    block.zero_grad();
    block.backward(random_tensor<float>(block.forward_train(random_tensor<float>(xs, rng)).sizes(), rng));
  }
  const DeployedConv<float> fp32 = block.deploy();
  std::vector<Tensor<float>> batches;
  Calibrator cal;
  for (int i = 0; i < 3; ++i) {
    batches.push_back(random_tensor<float>(xs, rng));
    cal.observe(fp32, batches.back());
  }
  const DeployedConv<float> int8 = block.deploy(DeployOptions().precision(Precision::int8).calibration(cal.calibration()));
  EXPECT_EQ(int8.precision(), Precision::int8);
  const QuantizationReport r = quantization_report(fp32, int8, batches);
  ASSERT_EQ(r.layers.size(), 1u);
  // Weight SQNR from per-channel s8 codes computed here (7-bit ones without VNNI).
  const Tensor<float>& w = fp32.weight();
  const std::int64_t O = w.size(0), per = w.numel() / O;
  const double levels = engine::cpu_has_vnni() ? 127.0 : 63.5;
  double signal = 0, noise = 0;
  for (std::int64_t o = 0; o < O; ++o) {
    double m = 0;
    for (std::int64_t j = 0; j < per; ++j) m = std::max(m, std::fabs(double(w[o * per + j])));
    for (std::int64_t j = 0; j < per; ++j) {
      const double v = w[o * per + j], step = m > 0 ? m / levels : 1.0;
      signal += v * v;
      noise += (v - step * std::nearbyint(v / step)) * (v - step * std::nearbyint(v / step));
    }
  }
  EXPECT_NEAR(r.layers[0].weight_sqnr_db, 10 * std::log10(signal / noise), 0.05);
  EXPECT_GT(r.layers[0].output_sqnr_db, 25.0);
  EXPECT_EQ(r.output_sqnr_db, r.layers[0].output_sqnr_db);
}
}  // namespace

TEST(Quantization, EveryBlockTypeDeploysInInt8) {
  quantize_block(OREPA<float, SiLU>(OrepaOptions(8, 16, 3)), "OREPA");
  quantize_block(OREPA_1x1<float, SiLU>(ConvOptions(8, 16, 1)), "OREPA_1x1");
  quantize_block(OREPA_LargeConv<float, SiLU>(ConvOptions(8, 16, 5)), "OREPA_LargeConv");
  quantize_block(RepVGGBlock_OREPA<float, ReLU>(RepVGGOptions(8, 16, 3)), "RepVGGBlock_OREPA");
  quantize_block(ConvBN<float, SiLU>(ConvOptions(8, 16, 3)), "ConvBN");
  quantize_block(DBB<float, SiLU>(DbbOptions(8, 16, 3)), "DBB");
}

TEST(Quantization, SequentialReportsEveryConvInsideModulesWorstFirst) {
  Sequential<float> net;
  net.add(OREPA<float, SiLU>(OrepaOptions(3, 8, 3)));
  net.add(DBB<float, SiLU>(DbbOptions(8, 8, 3)));
  net.add(ConvBN<float, SiLU>(ConvOptions(8, 16, 3).stride(2)));
  net.add(C3<float>(16, 16, 1, true, 0.5, 4));
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(16, 4, 9));
  Rng rng(8);
  for (int step = 0; step < 3; ++step) {
    net.zero_grad();
    net.backward(random_tensor<float>(net.forward_train(random_tensor<float>({4, 3, 12, 12}, rng)).sizes(), rng));
  }
  const InferenceChain<float> fp32 = net.deploy();
  std::vector<Tensor<float>> batches;
  Calibrator cal;
  for (int i = 0; i < 4; ++i) {
    batches.push_back(random_tensor<float>({4, 3, 12, 12}, rng));
    cal.observe(fp32, batches.back());
  }
  const Calibration calib = cal.calibration();
  // Every convolution by its training-time tensor-name prefix, the C3's inner ones too.
  const std::vector<std::string> names{"0.", "1.", "2.", "3.cv1.", "3.cv2.", "3.cv3.", "3.m.0.cv1.", "3.m.0.cv2."};
  ASSERT_EQ(calib.size(), names.size());
  for (const auto& n : names) EXPECT_TRUE(calib.contains(n)) << n;
  for (const auto& named : net.named_parameters()) {
    const std::string& name = named.first;
    EXPECT_TRUE(name.rfind("4.", 0) == 0 || name.rfind("5.", 0) == 0 ||
                std::any_of(names.begin(), names.end(), [&](const auto& n) { return name.rfind(n, 0) == 0; }))
        << name << " belongs to no calibrated layer";
  }
  EXPECT_EQ(cal.batches("3.m.0.cv2."), 4);
  const auto int8 = net.deploy(DeployOptions().precision(Precision::int8).calibration(calib));
  ASSERT_EQ(int8.size(), 6u);
  int reduced = 0;
  int8.visit_convs("", [&](const std::string&, const DeployedConv<float>& c) { reduced += c.precision() == Precision::int8; });
  EXPECT_EQ(reduced, 8);
  const QuantizationReport r = quantization_report(fp32, int8, batches);
  ASSERT_EQ(r.layers.size(), names.size());
  for (std::size_t i = 1; i < r.layers.size(); ++i) EXPECT_LE(r.layers[i - 1].output_sqnr_db, r.layers[i].output_sqnr_db);
  // The end-to-end SQNR, computed here from the two chains.
  double signal = 0, noise = 0;
  for (const auto& x : batches) {
    const Tensor<float> a = fp32.forward(x), b = int8.forward(x);
    for (std::int64_t i = 0; i < a.numel(); ++i) signal += double(a[i]) * a[i], noise += double(a[i] - b[i]) * (a[i] - b[i]);
  }
  EXPECT_NEAR(r.output_sqnr_db, 10 * std::log10(signal / noise), 1e-3);
  EXPECT_GT(r.output_sqnr_db, 15.0);
  std::ostringstream table;
  r.print(table);
  EXPECT_NE(table.str().find("end to end output SQNR"), std::string::npos);
  for (const auto& l : r.layers) EXPECT_GT(l.output_sqnr_db, 20.0) << l.layer;
  // A layer's row is its own error: layer "2." alone, fed the fp32 network's input to it.
  double s2 = 0, n2 = 0;
  for (const auto& x : batches) {
    const Tensor<float> in = fp32.stage(1).forward(fp32.stage(0).forward(x));
    const Tensor<float> a = fp32.stage(2).forward(in), b = int8.stage(2).forward(in);
    for (std::int64_t i = 0; i < a.numel(); ++i) s2 += double(a[i]) * a[i], n2 += double(a[i] - b[i]) * (a[i] - b[i]);
  }
  const auto row = std::find_if(r.layers.begin(), r.layers.end(), [](const auto& l) { return l.layer == "2."; });
  ASSERT_NE(row, r.layers.end());
  EXPECT_NEAR(row->output_sqnr_db, 10 * std::log10(s2 / n2), 1e-3);
}

// One conv writing 8-bit codes in the next one's quantization: every code is the
// quantization of the float output the tensor API gives (oneDNN rounds inside the
// primitive, so a tie may land one code away).
TEST(Quantization, Int8ConvWritesCodesInTheNextConvsQuantization) {
  Rng rng(11);
  for (ActivationKind act : {ActivationKind::silu, ActivationKind::relu, ActivationKind::identity}) {
    ConvGeometry g;
    g.in_channels = 8, g.out_channels = 16, g.kernel = 3, g.padding = 1;
    DeployedConv<float> conv(g, spread_kernel(g, rng), random_tensor<float>({16}, rng), activation(act));
    conv.precision(Precision::int8, {-1.f, 1.f});
    const Tensor<float> x = random_tensor<float>({2, 8, 10, 10}, rng);
    const Tensor<float> y = conv.forward(x);
    float lo = 0, hi = 0;
    for (float v : y) lo = std::min(lo, v), hi = std::max(hi, v);
    const QuantParams q = QuantParams::for_range({0.8f * lo, 0.8f * hi}, !engine::cpu_has_vnni());  // some saturate
    const Shape xs = x.sizes();
    dnnl::memory src = engine::allocate(engine::nchw_desc(xs)), codes = engine::allocate(dst_desc(conv, xs, q));
    ASSERT_EQ(codes.get_desc().data_type(), q.qmin < 0 ? dnnl::memory::data_type::s8 : dnnl::memory::data_type::u8);
    std::copy(x.begin(), x.end(), static_cast<float*>(src.get_data_handle()));
    forward(conv, src, codes, q);
    const auto plain_md = dnnl::memory::desc(dnnl::memory::dims(y.sizes().begin(), y.sizes().end()),
                                             codes.get_desc().data_type(), dnnl::memory::format_tag::nchw);
    dnnl::memory plain = engine::allocate(plain_md);
    dnnl::reorder(codes, plain).execute(engine::thread_stream(), codes, plain);
    engine::thread_stream().wait();
    std::int64_t equal = 0, saturated = 0;
    for (std::int64_t i = 0; i < y.numel(); ++i) {
      const auto* bytes = static_cast<const unsigned char*>(plain.get_data_handle());
      const std::int32_t got = q.qmin < 0 ? std::int32_t(static_cast<signed char>(bytes[i])) : std::int32_t(bytes[i]);
      const std::int32_t want = q.quantize(y[i]);
      ASSERT_LE(std::abs(got - want), 1) << "element " << i << " of activation " << int(act);
      equal += got == want;
      saturated += want == q.qmin || want == q.qmin + 255;
    }
    EXPECT_GE(double(equal), 0.99 * double(y.numel())) << int(act);
    EXPECT_GT(saturated, 0) << int(act);
  }
}

// A chain of int8 convs passes codes between them: the same numbers as each conv on its
// own (the next conv quantizes the float output the same way) up to those one-code ties.
TEST(Quantization, DeployedChainPassesInt8ActivationsBetweenConvs) {
  Rng rng(10);
  ConvGeometry a, b, c;
  a.in_channels = 8, a.out_channels = 16, a.kernel = 3, a.padding = 1;
  b.in_channels = 16, b.out_channels = 16, b.kernel = 3, b.stride = 2, b.padding = 1;
  c.in_channels = 16, c.out_channels = 8, c.kernel = 1;
  DeployedConv<float> ca(a, spread_kernel(a, rng), random_tensor<float>({16}, rng), SiLU{});
  DeployedConv<float> cb(b, spread_kernel(b, rng), random_tensor<float>({16}, rng), ReLU{});
  DeployedConv<float> cc(c, spread_kernel(c, rng), random_tensor<float>({8}, rng));
  ca.precision(Precision::int8, {-1.f, 1.f});
  cb.precision(Precision::int8, {-0.3f, 3.f});
  cc.precision(Precision::int8, {0.f, 4.f});
  const Tensor<float> x = random_tensor<float>({2, 8, 12, 12}, rng);
  const Tensor<float> want = cc.forward(cb.forward(ca.forward(x)));  // each conv on its own, float between
  const DeployedChain chain({ca, cb, cc});
  EXPECT_EQ(chain.activation_codes(0)->scale, cb.input_quantization().scale);
  EXPECT_EQ(chain.activation_codes(1)->zero_point, cc.input_quantization().zero_point);
  EXPECT_THROW(chain.activation_codes(2), std::out_of_range);
  for (MemoryFormat f : {MemoryFormat::contiguous, MemoryFormat::channels_last}) {
    const Tensor<float> got = chain.forward(x.to(f)).to(MemoryFormat::contiguous);
    EXPECT_GT(sqnr_db(want.data(), got.data(), want.numel()), 40.0) << int(f);
  }
  // A float conv between int8 ones: float in and out of it, the others as before.
  DeployedConv<float> fb(b, cb.weight(), cb.bias(), ReLU{});
  const DeployedChain mixed({ca, fb, cc});
  EXPECT_FALSE(mixed.activation_codes(0));
  EXPECT_FALSE(mixed.activation_codes(1));
  expect_close(mixed.forward(x), cc.forward(fb.forward(ca.forward(x))), 1e-6, "int8 -> fp32 -> int8 chain");
  // Codes only where the conv can write them, and only when asked for.
  const Shape bs{2, 16, 12, 12};
  const dnnl::memory in = engine::allocate(engine::nchw_desc(bs));
  const dnnl::memory codes = engine::allocate(dst_desc(cb, bs, cc.input_quantization()));
  EXPECT_THROW(forward(fb, in, codes, cc.input_quantization()), config_error);
  EXPECT_THROW(forward(cb, in, codes), shape_error);
  EXPECT_THROW(forward(cb, in, engine::allocate(dst_desc(cb, bs)), cc.input_quantization()), shape_error);
}

namespace {
// The body both InferenceChain tests deploy: a stride-2 OREPA, a C3 with shortcuts, a
// stride-2 ConvBN and a C3 with or without them.
Sequential<float> c3_body(bool second_c3_shortcut) {
  Sequential<float> net;
  net.add(OREPA<float, SiLU>(OrepaOptions(3, 8, 3).stride(2)));
  net.add(C3<float>(8, 8, 2, true, 0.5, 4));
  net.add(ConvBN<float, SiLU>(ConvOptions(8, 16, 3).stride(2)));
  net.add(C3<float>(16, 16, 1, second_c3_shortcut, 0.5, 5));
  return net;
}
// `steps` training passes with random output gradients on batches [batch, 3, 16, 16], so
// that every BatchNorm has moved from its initial statistics.
void train_randomly(Sequential<float>& net, int steps, std::int64_t batch, Rng& rng) {
  for (int step = 0; step < steps; ++step) {
    net.zero_grad();
    net.backward(random_tensor<float>(net.forward_train(random_tensor<float>({batch, 3, 16, 16}, rng)).sizes(), rng));
  }
}
}  // namespace

// An int8 InferenceChain passes codes between its int8 stages, C3 and Bottleneck insides
// included. Reference: the same network computed here in float from its convolutions'
// tensor API, with the 8-bit rounding applied exactly where the chain keeps codes (every
// output an int8 stage hands on, the residual sum, both halves of the concatenation).
// Codes are written by the primitive itself, so a rounding tie may land one code away.
TEST(Quantization, InferenceChainPassesInt8ActivationsThroughModules) {
  Sequential<float> net = c3_body(false);
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(16, 4, 9));
  Rng rng(12);
  train_randomly(net, 3, 4, rng);
  const InferenceChain<float> fp32 = net.deploy();
  Calibrator cal;
  std::vector<Tensor<float>> batches;
  for (int i = 0; i < 3; ++i) {
    batches.push_back(random_tensor<float>({4, 3, 16, 16}, rng));
    cal.observe(fp32, batches.back());
  }
  const auto int8 = net.deploy(DeployOptions().precision(Precision::int8).calibration(cal.calibration()));
  for (std::size_t i = 0; i < 4; ++i) EXPECT_TRUE(int8.stage(i).int8_input()) << "stage " << i;
  EXPECT_FALSE(int8.stage(4).int8_input());
  EXPECT_FALSE(fp32.stage(1).int8_input());

  std::map<std::string, const DeployedConv<float>*> conv;
  int8.visit_convs("", [&](const std::string& n, const DeployedConv<float>& c) { conv[n] = &c; });
  auto run = [&](const std::string& n, const Tensor<float>& x) { return conv.at(n)->forward(x).to(MemoryFormat::contiguous); };
  auto q_in = [&](const std::string& n) { return conv.at(n)->input_quantization(); };
  auto round8 = [](Tensor<float> t, const QuantParams& q) {
    for (auto& v : t) v = q.dequantize(q.quantize(v));
    return t;
  };
  auto bottleneck = [&](const std::string& p, const Tensor<float>& x, bool add, const QuantParams& out) {
    Tensor<float> y = run(p + "cv2.", run(p + "cv1.", x));
    if (add)
      for (std::int64_t i = 0; i < y.numel(); ++i) y[i] += x[i];
    return round8(y, out);
  };
  auto c3 = [&](const std::string& p, const Tensor<float>& x, int n, bool add) {
    const QuantParams cat_q = q_in(p + "cv3.");
    auto next = [&](int j) { return j < n ? q_in(p + "m." + std::to_string(j) + ".cv1.") : cat_q; };
    Tensor<float> a = round8(run(p + "cv1.", x), next(0)), cat;
    for (int j = 0; j < n; ++j) a = bottleneck(p + "m." + std::to_string(j) + ".", a, add, next(j + 1));
    concat_channels(a, round8(run(p + "cv2.", x), cat_q), cat);
    return run(p + "cv3.", cat);
  };
  InferenceChain<float> body8, body32;  // the stages before GlobalAvgPool, which would average the error away
  for (std::size_t i = 0; i < 4; ++i) body8.add(int8.stage(i)), body32.add(fp32.stage(i));
  for (const auto& x : batches) {
    const Tensor<float> h1 = c3("1.", round8(run("0.", x), q_in("1.cv1.")), 2, true);
    const Tensor<float> want = c3("3.", round8(run("2.", round8(h1, q_in("2."))), q_in("3.cv1.")), 1, false);
    const Tensor<float> got = body8.forward(x).to(MemoryFormat::contiguous), ref = body32.forward(x);
    const double same = sqnr_db(want.data(), got.data(), got.numel());
    const double vs_fp32 = sqnr_db(ref.to(MemoryFormat::contiguous).data(), got.data(), got.numel());
    std::printf("  int8 chain against its rounding computed here %.1f dB, against fp32 %.1f dB\n", same, vs_fp32);
    EXPECT_GT(same, 50.0);
    EXPECT_GT(vs_fp32, 25.0);
    const Tensor<float> logits = int8.forward(x), logits_ref = int8.stage(5).forward(int8.stage(4).forward(want));
    EXPECT_GT(sqnr_db(logits_ref.data(), logits.data(), logits.numel()), 50.0);
  }
  // A module given codes gives codes in the quantization asked for, and the same values
  // as its float forward on the dequantized input, within a code or two.
  const Tensor<float> h = int8.stage(0).forward(batches[0]);
  const Int8Codes in = quantize_codes(h, *int8.stage(1).int8_input());
  const QuantParams want = *int8.stage(2).int8_input();
  const StageOutput<float> out = int8.stage(1).forward_int8(&in, &want);
  ASSERT_TRUE(std::holds_alternative<Int8Codes>(out));
  const Int8Codes& codes = std::get<Int8Codes>(out);
  EXPECT_EQ(codes.q.scale, want.scale);
  const Tensor<float> real = int8.stage(1).forward(dequantize_codes(in)).to(MemoryFormat::channels_last);
  ASSERT_EQ(real.sizes(), codes.shape);
  std::int64_t off = 0;
  for (std::int64_t i = 0; i < real.numel(); ++i) off += std::abs(want.quantize(real[i]) - codes.code(i)) > 2;
  EXPECT_LE(off, real.numel() / 100);
}

// In bf16 an InferenceChain hands bf16 values from one stage to the next (C3's Bottlenecks
// add their shortcut in cv2's primitive): as close to fp32 as the stages run one by one on
// float, each converting its own input.
TEST(Quantization, InferenceChainPassesBf16ValuesThroughModules) {
  Sequential<float> net = c3_body(true);
  Rng rng(14);
  train_randomly(net, 2, 2, rng);
  const InferenceChain<float> fp32 = net.deploy();
  const auto bf16 = net.deploy(DeployOptions().precision(Precision::bf16));
  for (std::size_t i = 0; i < 4; ++i) {
    ASSERT_TRUE(bf16.stage(i).int8_input()) << "stage " << i;
    EXPECT_TRUE(bf16.stage(i).int8_input()->bf16) << "stage " << i;
  }
  const Tensor<float> x = random_tensor<float>({2, 3, 16, 16}, rng);
  Tensor<float> got;
  try {
    got = bf16.forward(x).to(MemoryFormat::contiguous);
  } catch (const engine_error&) {
    GTEST_SKIP() << "oneDNN has no bf16 convolution on ISA " << engine::cpu_isa_name();
  }
  Tensor<float> one_by_one = x;
  for (std::size_t i = 0; i < 4; ++i) one_by_one = bf16.stage(i).forward(one_by_one).to(MemoryFormat::contiguous);
  const Tensor<float> ref = fp32.forward(x).to(MemoryFormat::contiguous);
  const double chained = sqnr_db(ref.data(), got.data(), got.numel());
  const double separate = sqnr_db(ref.data(), one_by_one.data(), one_by_one.numel());
  std::printf("  bf16 chain against fp32 %.1f dB, its stages one by one on float %.1f dB\n", chained, separate);
  EXPECT_GT(chained, separate - 1.0);
  EXPECT_GT(chained, 35.0);
}

// The bad inputs: no calibration batch, non-finite values (in the input, or
// reaching only a later layer), a batch of another shape, a calibration of another
// network. Each is a clear error, and the Calibrator keeps exactly what it had.
TEST(Quantization, CalibrationMistakesAreErrorsThatChangeNothing) {
  Sequential<float> net;
  net.add(OREPA<float, SiLU>(OrepaOptions(3, 8, 3)));
  net.add(ConvBN<float, SiLU>(ConvOptions(8, 8, 3)));
  net.add(GlobalAvgPool<float>());
  const InferenceChain<float> fp32 = net.deploy();
  Rng rng(13);
  Calibrator cal;
  EXPECT_EQ(cal.calibration().size(), 0u);
  EXPECT_THROW(net.deploy(DeployOptions().precision(Precision::int8).calibration(cal.calibration())), config_error);
  const Tensor<float> good = random_tensor<float>({2, 3, 8, 8}, rng);
  cal.observe(fp32, good);
  const Calibration before = cal.calibration();
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Tensor<float> x = good;
    x[5] = bad;
    EXPECT_THROW(cal.observe(fp32, x), value_error);
  }
  Tensor<float> huge = good;  // finite, but the first conv's output overflows
  for (auto& v : huge) v = v < 0 ? -3e38f : 3e38f;
  try {
    cal.observe(fp32, huge);
    ADD_FAILURE() << "an overflow inside the network must throw";
  } catch (const value_error& e) {
    EXPECT_NE(std::string(e.what()).find("layer '1.'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(cal.observe(fp32, random_tensor<float>({2, 4, 8, 8}, rng)), shape_error);
  const Calibration after = cal.calibration();
  for (const char* layer : {"0.", "1."}) {
    EXPECT_EQ(after.at(layer).lo, before.at(layer).lo) << layer;
    EXPECT_EQ(after.at(layer).hi, before.at(layer).hi) << layer;
    EXPECT_EQ(cal.batches(layer), 1) << layer;
  }
  Calibration other;  // another network's: layer "1." missing
  other.set("0.", {-1.f, 1.f});
  try {
    net.deploy(DeployOptions().precision(Precision::int8).calibration(other));
    ADD_FAILURE() << "a calibration without layer 1. must be refused";
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find("'1.'"), std::string::npos) << e.what();
  }
}

// After BN folding the output channels of a kernel differ by orders of magnitude: one
// scale per tensor spends the 8 bits on the largest channel and rounds the small ones away.
TEST(Quantization, PerChannelWeightsBeatPerTensorOnAFoldedOrepaKernel) {
  OREPA<float, SiLU> block(OrepaOptions(16, 32, 3));
  for (auto& [name, p] : block.named_parameters())
    if (name == "bn.weight")
      for (std::int64_t o = 0; o < p->value.numel(); ++o) p->value[o] = std::pow(10.f, -2.f + 3.f * float(o) / 31.f);
  DeployedConv<float> conv = block.deploy();
  const Tensor<float> w = conv.weight();
  const std::int64_t per = w.numel() / w.size(0);
  float row_min = std::numeric_limits<float>::infinity(), row_max = 0, all = 0;
  for (std::int64_t o = 0; o < w.size(0); ++o) {
    float m = 0;
    for (std::int64_t j = 0; j < per; ++j) m = std::max(m, std::fabs(w[o * per + j]));
    row_min = std::min(row_min, m), row_max = std::max(row_max, m), all = std::max(all, m);
  }
  ASSERT_GT(row_max / row_min, 100.f) << "the folded kernel's channels must differ widely";
  Tensor<float> per_tensor = w;
  const float step = all / 127.f;
  for (auto& v : per_tensor) v = step * std::nearbyint(v / step);
  conv.precision(Precision::int8, {-1.f, 1.f});
  const Tensor<float> per_channel = conv.effective_weight();
  const double pc = sqnr_db(w.data(), per_channel.data(), w.numel()), pt = sqnr_db(w.data(), per_tensor.data(), w.numel());
  std::printf("  folded OREPA kernel: per-channel %.1f dB, per-tensor %.1f dB\n", pc, pt);
  EXPECT_GT(pc, pt + 3.0);
  // Per output channel, where it matters: the smallest channel keeps its shape only per-channel.
  EXPECT_GT(sqnr_db(w.data(), per_channel.data(), per), 30.0);
  EXPECT_LT(sqnr_db(w.data(), per_tensor.data(), per), 10.0);
}

// Deployed int8 convolutions and chains are shared by threads: every concurrent result
// equals the serial one bit for bit.
TEST(Quantization, ConcurrentInt8ForwardsEqualSerialOnes) {
  Sequential<float> net;
  net.add(OREPA<float, SiLU>(OrepaOptions(3, 8, 3)));
  net.add(C3<float>(8, 8, 1, true, 0.5, 4));
  net.add(GlobalAvgPool<float>());
  Rng rng(14);
  std::vector<Tensor<float>> xs;
  for (int i = 0; i < 4; ++i) xs.push_back(random_tensor<float>({2, 3, 8, 8}, rng));
  Calibrator cal;
  const InferenceChain<float> fp32 = net.deploy();
  for (const auto& x : xs) cal.observe(fp32, x);
  const auto int8 = net.deploy(DeployOptions().precision(Precision::int8).calibration(cal.calibration()));
  const AnyDeployed<float> first = int8.stage(0);
  std::vector<Tensor<float>> serial_chain, serial_conv;
  for (const auto& x : xs) serial_chain.push_back(int8.forward(x)), serial_conv.push_back(first.forward(x));
  std::vector<std::vector<Tensor<float>>> chain_out(4), conv_out(4);
  std::vector<std::thread> pool;
  for (int t = 0; t < 4; ++t)
    pool.emplace_back([&, t] {
      for (int r = 0; r < 5; ++r)
        for (const auto& x : xs) chain_out[t].push_back(int8.forward(x)), conv_out[t].push_back(first.forward(x));
    });
  for (auto& th : pool) th.join();
  for (int t = 0; t < 4; ++t)
    for (std::size_t i = 0; i < chain_out[t].size(); ++i) {
      const std::size_t k = i % xs.size();
      ASSERT_TRUE(std::equal(chain_out[t][i].begin(), chain_out[t][i].end(), serial_chain[k].begin())) << t << " " << i;
      ASSERT_TRUE(std::equal(conv_out[t][i].begin(), conv_out[t][i].end(), serial_conv[k].begin())) << t << " " << i;
    }
}

// ---- int8 never makes NaN from finite data, and never hides one (issue 22) -------------

// The step of a range is computed in double (a range as wide as the floats allow has a
// finite one) and is at least min_scale (a tiny range is widened, visibly); [0, 0] and
// non-finite ranges are errors.
TEST(Quantization, ExtremeRangesGiveFiniteStepsOrErrors) {
  const QuantParams wide = QuantParams::for_range({-3e38f, 3e38f}, false);
  EXPECT_TRUE(std::isfinite(wide.scale));
  EXPECT_NEAR(wide.scale, 6e38 / 255, 6e38 / 255 * 1e-6);
  EXPECT_EQ(wide.zero_point, 128);  // 3e38 / (6e38 / 255) = 127.5, rounded half to even
  EXPECT_FALSE(QuantParams::widens({-3e38f, 3e38f}));
  EXPECT_NEAR(wide.dequantize(wide.quantize(2e38f)), 2e38, wide.scale);
  EXPECT_EQ(wide.dequantize(wide.quantize(3.4e38f)), wide.dequantize(255));  // saturates, finitely

  const QuantParams tiny = QuantParams::for_range({0.f, 1e-36f}, false);
  EXPECT_EQ(tiny.scale, QuantParams::min_scale);
  EXPECT_EQ(tiny.zero_point, 0);
  EXPECT_TRUE(QuantParams::widens({0.f, 1e-36f}));
  EXPECT_TRUE(QuantParams::widens({-1e-30f, 2e-17f}));
  EXPECT_FALSE(QuantParams::widens({0.f, 1e-15f}));  // 255 steps of 1e-18 fit 2.55e-16
  EXPECT_FALSE(QuantParams::widens({0.f, 0.f}));
  EXPECT_TRUE(std::isfinite(1.f / tiny.scale));

  try {
    QuantParams::for_range({0.f, 0.f}, false);
    ADD_FAILURE() << "[0, 0] has no step";
  } catch (const value_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("every calibration value of this input was 0"), std::string::npos) << what;
    EXPECT_EQ(what.find("calibrate the layer on data first"), std::string::npos) << what;
  }
  EXPECT_THROW(QuantParams::for_range({std::nanf(""), 1.f}, false), value_error);
  EXPECT_THROW(QuantParams::for_range({-std::numeric_limits<float>::infinity(), 1.f}, false), value_error);
  // Weight steps: a row of subnormal weights still has a step whose inverse is finite.
  Tensor<float> w({2, 1, 1, 1});
  w[0] = 1e-40f, w[1] = 12.7f;
  const auto sw = weight_scales(w);
  EXPECT_EQ(sw[0], QuantParams::min_scale);
  EXPECT_FLOAT_EQ(sw[1], 0.1f);
}

namespace {

// A 1x1 conv 2 -> 2 with small weights (its fp32 output of inputs near +-1e38 stays finite).
DeployedConv<float> small_conv(ActivationKind act) {
  ConvGeometry g;
  g.in_channels = 2, g.out_channels = 2, g.kernel = 1;
  Tensor<float> w(g.weight_shape());
  w[0] = 0.01f, w[1] = -0.02f, w[2] = 0.005f, w[3] = 0.015f;
  Tensor<float> b({2});
  b[0] = 0.5f, b[1] = -0.25f;
  return DeployedConv<float>(g, w, b, activation(act));
}

}  // namespace

// Calibrated on data up to +-3e38 (whose range in float arithmetic used to give an
// infinite step) or around 1e-36 (a zero one), int8 gives finite outputs close to fp32.
TEST(Quantization, Int8IsFiniteForDataNearTheEndsOfTheFloatRange) {
  Rng rng(40);
  for (double magnitude : {3e38, 1e-36}) {
    SCOPED_TRACE(magnitude);
    const DeployedConv<float> fp32 = small_conv(ActivationKind::identity);
    Tensor<float> x = random_tensor<float>({2, 2, 4, 4}, rng);
    for (auto& v : x) v = float(double(v) * magnitude);
    Calibrator cal;
    cal.observe(fp32, x);
    DeployedConv<float> int8 = fp32;
    int8.apply(DeployOptions().precision(Precision::int8).calibration(cal.calibration()), "");
    Tensor<float> y, ref;
    ref = fp32.forward(x);
    if (!run_or_skip(int8, x, y)) return;
    for (std::int64_t i = 0; i < y.numel(); ++i) ASSERT_TRUE(std::isfinite(y[i])) << i << ": " << y[i];
    if (magnitude > 1) {
      EXPECT_GT(sqnr_db(ref.data(), y.data(), y.numel()), 30.0);
    } else {  // widened to min_scale: every input rounds to the zero code, the output is the bias
      EXPECT_TRUE(QuantParams::widens(int8.input_range()));
      for (std::int64_t n = 0; n < 2; ++n)
        for (std::int64_t h = 0; h < 4; ++h)
          for (std::int64_t w = 0; w < 4; ++w) {
            EXPECT_NEAR(y(n, 0, h, w), 0.5f, 1e-6f);
            EXPECT_NEAR(y(n, 1, h, w), -0.25f, 1e-6f);
          }
      const QuantizationReport r = quantization_report(fp32, int8, {x});
      std::ostringstream table;
      r.print(table);
      EXPECT_NE(table.str().find("note: (block): int8 input range"), std::string::npos) << table.str();
      EXPECT_NE(table.str().find("widened"), std::string::npos) << table.str();
    }
  }
}

// A layer whose every calibration input is 0 (behind a ReLU that is never positive) and
// weights whose requantization no float holds are errors naming the layer and its range.
TEST(Quantization, UnusableRangesAreErrorsNamingTheLayer) {
  Sequential<float> net;
  net.add(ConvBN<float, ReLU>(ConvOptions(3, 4, 1)));
  net.add(ConvBN<float, SiLU>(ConvOptions(4, 4, 3)));
  net.get<ConvBN<float, ReLU>>(0).bn().bias.value.fill(-100.f);  // every pre-activation < 0
  const InferenceChain<float> fp32 = net.deploy();
  Rng rng(41);
  Calibrator cal;
  cal.observe(fp32, random_tensor<float>({2, 3, 6, 6}, rng));
  EXPECT_EQ(cal.calibration().at("1.").hi, 0.f);
  try {
    net.deploy(DeployOptions().precision(Precision::int8).calibration(cal.calibration()));
    ADD_FAILURE() << "an all-zero range must be refused";
  } catch (const value_error& e) {
    const std::string what = e.what();
    for (const char* part : {"layer '1.'", "[0, 0]", "every calibration value of this input was 0"})
      EXPECT_NE(what.find(part), std::string::npos) << part << " in: " << what;
  }

  ConvGeometry g;
  g.in_channels = 1, g.out_channels = 1, g.kernel = 1;
  DeployedConv<float> huge(g, Tensor<float>(g.weight_shape(), 3e38f), Tensor<float>({1}));
  Calibration c;
  c.set("7.", {-3e38f, 3e38f});  // step 2.4e36 x weight step 2.4e36 overflows
  try {
    huge.apply(DeployOptions().precision(Precision::int8).calibration(c), "7.");
    ADD_FAILURE() << "an output scale over the float range must be refused";
  } catch (const value_error& e) {
    const std::string what = e.what();
    for (const char* part : {"layer '7.'", "[-3e+38, 3e+38]", "output channel 0", "too extreme for int8"})
      EXPECT_NE(what.find(part), std::string::npos) << part << " in: " << what;
  }
  EXPECT_EQ(huge.precision(), Precision::fp32);  // unchanged by the refused call
}

// NaN / Inf inputs: 8-bit codes cannot hold them, so an int8 deployment sets every output
// of an image that holds one to NaN (ReLU included, which maps NaN to 0 in fp32) and
// leaves the other images bit for bit as they were; in a single convolution and through
// a chain passing codes between modules.
TEST(Quantization, NonFiniteInputsGiveNaNOutputsForTheirImageInInt8) {
  Rng rng(42);
  const Tensor<float> x = random_tensor<float>({3, 2, 5, 5}, rng);
  for (ActivationKind act : {ActivationKind::silu, ActivationKind::relu}) {
    const DeployedConv<float> fp32 = small_conv(act);
    Calibrator cal;
    cal.observe(fp32, x);
    DeployedConv<float> int8 = fp32;
    int8.apply(DeployOptions().precision(Precision::int8).calibration(cal.calibration()), "");
    Tensor<float> probe;
    if (!run_or_skip(int8, x, probe)) return;
    for (float poison : {std::nanf(""), std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()}) {
      SCOPED_TRACE(::testing::Message() << poison << (act == ActivationKind::relu ? " relu" : " silu"));
      Tensor<float> xp = x;
      xp(1, 1, 2, 3) = poison;
      for (MemoryFormat f : {MemoryFormat::contiguous, MemoryFormat::channels_last}) {
        const Tensor<float> clean = int8.forward(x.to(f)).to(MemoryFormat::contiguous);
        const Tensor<float> y = int8.forward(xp.to(f)).to(MemoryFormat::contiguous);
        const std::int64_t per = y.numel() / 3;
        for (std::int64_t i = 0; i < y.numel(); ++i) {
          if (i / per == 1) ASSERT_TRUE(std::isnan(y[i])) << i;
          else ASSERT_EQ(y[i], clean[i]) << i;
        }
      }
    }
  }

  Sequential<float> net;
  net.add(OREPA<float, SiLU>(OrepaOptions(3, 8, 3)));
  net.add(C3<float>(8, 8, 1, true, 0.5, 4));
  net.add(ConvBN<float, ReLU>(ConvOptions(8, 8, 3)));
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(8, 4, 9));
  const InferenceChain<float> fp32 = net.deploy();
  const Tensor<float> batch = random_tensor<float>({3, 3, 8, 8}, rng);
  Calibrator cal;
  cal.observe(fp32, batch);
  const auto int8 = net.deploy(DeployOptions().precision(Precision::int8).calibration(cal.calibration()));
  ASSERT_TRUE(int8.stage(1).int8_input());  // the C3 takes codes: NaN cannot pass through them
  Tensor<float> clean;
  try {
    clean = int8.forward(batch);
  } catch (const engine_error& e) {
    GTEST_SKIP() << e.what();
  }
  Tensor<float> poisoned = batch;
  poisoned(2, 0, 4, 4) = std::numeric_limits<float>::infinity();
  const Tensor<float> y = int8.forward(poisoned);
  ASSERT_EQ(y.sizes(), (Shape{3, 4}));
  for (std::int64_t n = 0; n < 3; ++n)
    for (std::int64_t k = 0; k < 4; ++k) {
      if (n == 2) EXPECT_TRUE(std::isnan(y(n, k))) << n << ", " << k;
      else EXPECT_EQ(y(n, k), clean(n, k)) << n << ", " << k;
    }
}

// A report over batches whose outputs hold NaN prints "n/a" and says why, never "nan dB".
TEST(Quantization, ReportPrintsNaNotNanForUndefinedSqnr) {
  const DeployedConv<float> fp32 = small_conv(ActivationKind::silu);
  Rng rng(43);
  Tensor<float> x = random_tensor<float>({2, 2, 4, 4}, rng);
  Calibrator cal;
  cal.observe(fp32, x);
  DeployedConv<float> int8 = fp32;
  int8.apply(DeployOptions().precision(Precision::int8).calibration(cal.calibration()), "");
  Tensor<float> probe;
  if (!run_or_skip(int8, x, probe)) return;
  x[3] = std::nanf("");
  const QuantizationReport r = quantization_report(fp32, int8, {x});
  EXPECT_TRUE(std::isnan(r.output_sqnr_db));
  std::ostringstream table;
  r.print(table);
  const std::string text = table.str();
  EXPECT_EQ(text.find("nan"), std::string::npos) << text;
  EXPECT_NE(text.find("end to end output SQNR n/a"), std::string::npos) << text;
  EXPECT_NE(text.find("n/a: an fp32 or reduced-precision output held a NaN or Inf"), std::string::npos) << text;
  std::vector<LayerQuantError> rows{{"b.", Precision::int8, 30.0, 20.0, ""},
                                    {"a.", Precision::int8, 30.0, std::nan(""), ""},
                                    {"c.", Precision::int8, 30.0, 10.0, ""}};
  QuantizationReport sorted{rows, 10.0};
  detail::sort_worst_first(sorted.layers);  // NaN sorts first (worst), the rest ascending
  EXPECT_EQ(sorted.layers[0].layer, "a.");
  EXPECT_EQ(sorted.layers[1].layer, "c.");
  EXPECT_EQ(sorted.layers[2].layer, "b.");
}
