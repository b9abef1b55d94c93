// Tests of the YOLOv5 network (yolo/config.hpp, yolo/modules.hpp, yolo/model.hpp): the
// fixture network made by the PyTorch recipe (tests/data/yolov5n_orepa) built from its yaml,
// loaded by name and run in eval and deploy form against PyTorch's float64 outputs;
// gradients of a small network against finite differences; the yaml's faults.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>

#include "orepa/yolo/yolo.hpp"
#include "test_util.hpp"

using namespace orepa;

namespace {

yolo::Model<float> fixture_model() {
  return yolo::load_model(yolo::read_model_config(test::yolo_fixture("model.yaml")),
                          io::SafetensorsFile::open(test::yolo_fixture("train_state.safetensors")));
}

}  // namespace

TEST(YoloModel, FixtureBuildsFromItsYamlWithTheCheckpointsBlocks) {
  auto model = fixture_model();
  EXPECT_EQ(model.size(), 25u);
  std::int64_t params = 0;
  for (auto* p : model.parameters()) params += p->value.numel();
  EXPECT_EQ(params, 1398872);  // the README's count of the training form
  EXPECT_EQ(model.strides(), (std::vector<double>{8, 16, 32}));
  EXPECT_EQ(model.saved_layers(), (std::vector<std::size_t>{4, 6, 10, 14, 17, 20, 23}));
  EXPECT_EQ(model.layer(0).type_name(), "ConvBN");  // the 6x6 stem stays Conv
  EXPECT_EQ(model.layer(1).type_name(), "OREPA");
  for (auto* bn : model.batch_norms()) {
    EXPECT_EQ(bn->eps, 1e-3);
    EXPECT_EQ(bn->momentum, 0.03);
  }
  ASSERT_EQ(model.batch_norms().size(), 57u);
  // The same network built from the yaml alone with the OREPA family for every Conv has
  // exactly the checkpoint's tensors.
  yolo::Model<float> built(yolo::read_model_config(test::yolo_fixture("model.yaml")), yolo::ModelOptions<float>().blocks("orepa"));
  EXPECT_NO_THROW(io::load_state_dict(built, io::SafetensorsFile::open(test::yolo_fixture("train_state.safetensors"))));
}

TEST(YoloModel, EvalAndDeployMatchPyTorchsFloat64Outputs) {
  const auto model = fixture_model();
  const auto io_file = io::SafetensorsFile::open(test::yolo_fixture("io.safetensors"));
  const auto deployed = model.deploy();
  for (const std::string x : {"a", "b"}) {
    const Tensor<float> input = io_file.get<float>("input." + x);
    const auto eval = model.forward_eval(input);
    const auto dep = deployed.forward(input);
    const auto ref_pred = io_file.get<float>("ref64." + x + ".pred");
    EXPECT_LT(test::max_relative_error(eval.pred, ref_pred), 2e-3) << x;
    EXPECT_LT(test::max_relative_error(dep.pred, ref_pred), 2e-3) << x;
    for (int i = 0; i < 3; ++i) {
      const auto ref = io_file.get<float>("ref64." + x + ".raw" + std::to_string(i));
      EXPECT_LT(test::max_relative_error(eval.raw[std::size_t(i)], ref), 2e-3) << x << " raw" << i;
      EXPECT_LT(test::max_relative_error(dep.raw[std::size_t(i)], ref), 2e-3) << x << " raw" << i;
    }
    // Channels-last input gives the same result.
    const auto nhwc = deployed.forward(input.to(MemoryFormat::channels_last));
    EXPECT_LT(test::max_relative_error(nhwc.pred, ref_pred), 2e-3) << x;
    // The rows alone, the sigmoid taken inside the Detect convolutions.
    EXPECT_LT(test::max_relative_error(deployed.predict(input), ref_pred), 2e-3) << x;
    EXPECT_LT(test::max_relative_error(deployed.predict(input), dep.pred), 1e-6) << x;
  }
  // Every layer's output of input a (where a difference would start).
  const auto outs = model.layer_outputs(io_file.get<float>("input.a"));
  for (std::size_t i = 0; i < 24; ++i) {
    const std::string name = std::string("ref64.a.layer") + (i < 10 ? "0" : "") + std::to_string(i);
    EXPECT_LT(test::max_relative_error(outs[i], io_file.get<float>(name)), 2e-3) << name;
  }
}

TEST(YoloModel, LoadingACheckpointOfAnotherYamlNamesTheSlot) {
  auto cfg = yolo::read_model_config(test::yolo_fixture("model.yaml"));
  cfg.width_multiple = 0.25;  // every channel count doubles
  try {
    yolo::load_model(cfg, io::SafetensorsFile::open(test::yolo_fixture("train_state.safetensors")));
    FAIL() << "a checkpoint of another yaml must not load";
  } catch (const format_error& e) {
    EXPECT_NE(std::string(e.what()).find("model.0."), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("another model yaml"), std::string::npos) << e.what();
  }
}

namespace {

// A small network with every module kind: stem, OREPA, C3 with and without shortcut,
// SPPF, upsampling, concatenation and a two-level head.
const char* small_yaml = R"(
nc: 2
depth_multiple: 1.0
width_multiple: 1.0
anchors:
  - [4, 5, 8, 10]
  - [12, 14, 20, 16]
backbone:
  [[-1, 1, Conv, [4, 3, 2]],
   [-1, 1, OREPA, [8, 3, 2]],
   [-1, 1, C3, [8]],
   [-1, 1, SPPF, [8, 3]],
  ]
head:
  [[-1, 1, nn.Upsample, [None, 2, 'nearest']],
   [[-1, 0], 1, Concat, [1]],
   [-1, 1, C3, [8, False]],
   [[6, 3], 1, Detect, [nc, anchors]],
  ]
)";

}  // namespace

TEST(YoloModel, GradientsMatchFiniteDifferences) {
  yolo::Model<double> model(yolo::parse_model_config(small_yaml, "small.yaml"), yolo::ModelOptions<double>().blocks("orepa").seed(3));
  EXPECT_EQ(model.strides(), (std::vector<double>{2, 4}));
  Rng rng(5);
  Tensor<double> x({2, 3, 8, 8});
  fill_uniform(x, 1.0, rng);
  for (auto* p : model.parameters()) fill_uniform(p->value, 0.4, rng);
  // loss = sum_i <R_i, raw_i> for fixed random R_i, so d loss / d raw_i = R_i.
  auto maps = model.forward_train(x);
  std::vector<Tensor<double>> r;
  for (const auto& m : maps) {
    r.emplace_back(m.sizes());
    fill_uniform(r.back(), 1.0, rng);
  }
  auto loss = [&]() {
    auto y = model.forward_train(x);
    double s = 0;
    for (std::size_t i = 0; i < y.size(); ++i)
      for (std::int64_t j = 0; j < y[i].numel(); ++j) s += y[i][j] * r[i][j];
    return s;
  };
  model.zero_grad();
  loss();
  const Tensor<double> dx = model.backward(r);
  // Batch statistics make the network's function of x and of every parameter the same
  // in every call, so central differences apply to the training forward itself.
  auto check = [&](Tensor<double>& t, const Tensor<double>& analytic, const std::string& what) {
    double worst = 0, scale = 0;
    for (std::int64_t j = 0; j < t.numel(); j += std::max<std::int64_t>(1, t.numel() / 7)) {
      const double keep = t[j], h = 1e-5;
      t[j] = keep + h;
      const double up = loss();
      t[j] = keep - h;
      const double down = loss();
      t[j] = keep;
      worst = std::max(worst, std::abs((up - down) / (2 * h) - analytic[j]));
      scale = std::max(scale, std::abs(analytic[j]));
    }
    EXPECT_LT(worst, 1e-5 * std::max(1.0, scale)) << what;
  };
  check(x, dx, "input");
  for (auto& [name, p] : model.named_parameters()) {
    if (p->value.numel() == 0) continue;
    Tensor<double> g = p->grad;
    check(p->value, g, name);
  }
}

// Float training runs channels-last from the image on (the fused oneDNN pipelines on
// NHWC, concatenation, its split, upsampling and their adjoints on NHWC); the same
// network in double runs the plain NCHW loops. Same weights: the raw maps, every
// parameter gradient and the input gradient agree. With set_input_grad(false) the float
// network's parameter gradients are the same and no input gradient is made.
TEST(YoloModel, FloatTrainsChannelsLastLikeDoubleNchw) {
  const auto cfg = yolo::parse_model_config(small_yaml, "small.yaml");
  yolo::Model<double> ref(cfg, yolo::ModelOptions<double>().blocks("orepa").seed(3));
  yolo::Model<float> model(cfg, yolo::ModelOptions<float>().blocks("orepa").seed(3));
  Rng rng(8);
  auto pd = ref.named_parameters();
  auto pf = model.named_parameters();
  ASSERT_EQ(pd.size(), pf.size());
  for (std::size_t j = 0; j < pd.size(); ++j) {
    ASSERT_EQ(pd[j].first, pf[j].first);
    fill_uniform(pd[j].second->value, 0.4, rng);
    const Tensor<double>& v = pd[j].second->value;
    for (std::int64_t k = 0; k < v.numel(); ++k) pf[j].second->value[k] = float(v[k]);
  }
  Tensor<double> xd({2, 3, 16, 16});
  fill_uniform(xd, 1.0, rng);
  Tensor<float> xf(xd.sizes());
  for (std::int64_t k = 0; k < xd.numel(); ++k) xf[k] = float(xd[k]);
  const auto maps_d = ref.forward_train(xd);
  const auto maps_f = model.forward_train(xf);
  ASSERT_EQ(maps_d.size(), maps_f.size());
  std::vector<Tensor<double>> rd;
  std::vector<Tensor<float>> rf;
  auto to_float = [](const Tensor<double>& t) {
    Tensor<float> f(t.sizes());
    for (std::int64_t k = 0; k < t.numel(); ++k) f[k] = float(t[k]);
    return f;
  };
  for (std::size_t i = 0; i < maps_d.size(); ++i) {
    EXPECT_LT(test::max_relative_error(maps_f[i], to_float(maps_d[i])), 1e-4) << "raw map " << i;
    rd.emplace_back(maps_d[i].sizes());
    fill_uniform(rd.back(), 1.0, rng);
    rf.push_back(to_float(rd.back()));
  }
  ref.zero_grad();
  model.zero_grad();
  const Tensor<double> dx_d = ref.backward(rd);
  const Tensor<float> dx_f = model.backward(rf);
  EXPECT_TRUE(dx_f.is_contiguous()) << "the input gradient comes back in the input's format";
  EXPECT_LT(test::max_relative_error(dx_f, to_float(dx_d)), 1e-4) << "input gradient";
  std::vector<Tensor<float>> grads;
  for (std::size_t j = 0; j < pd.size(); ++j) {
    EXPECT_LT(test::max_relative_error(pf[j].second->grad, to_float(pd[j].second->grad)), 1e-3) << pf[j].first;
    grads.push_back(pf[j].second->grad);
  }
  model.set_input_grad(false);
  model.zero_grad();
  model.forward_train(xf);
  EXPECT_TRUE(model.backward(rf).empty());
  for (std::size_t j = 0; j < pf.size(); ++j) EXPECT_EQ(max_abs_diff(pf[j].second->grad, grads[j]), 0.0) << pf[j].first;
}

// Detect's float path (oneDNN matrix products on channels-last rows) against direct sums
// in double: the raw maps, and for a fixed map gradient R the weight, bias and input
// gradients. Level 1's input arrives channels-last.
TEST(YoloDetect, FloatHeadMatchesDirectSums) {
  const std::int64_t nc = 2, na = 3, no = nc + 5, N = 2;
  yolo::Detect<float> head(nc, {{10, 13, 16, 30, 33, 23}, {30, 61, 62, 45, 59, 119}}, {5, 7}, {8, 16}, 4);
  Rng rng(9);
  std::vector<Tensor<float>> xs{Tensor<float>({N, 5, 4, 3}), Tensor<float>({N, 7, 2, 2}, MemoryFormat::channels_last)};
  for (auto& x : xs) fill_uniform(x, 1.0, rng);
  Tensors<float> t;
  head.collect_tensors(t, "");
  const auto maps = head.forward_train({xs[0], xs[1]});
  std::vector<Tensor<float>> r;
  for (const auto& m : maps) {
    r.emplace_back(m.sizes());
    fill_uniform(r.back(), 1.0, rng);
  }
  for (auto& [name, p] : t.parameters) p->grad.fill(0.f);
  const auto dx = head.backward({r[0], r[1]});
  const auto eval = head.forward_eval({xs[0], xs[1]});
  for (std::size_t i = 0; i < 2; ++i) {
    const Tensor<float> x = xs[i].to(MemoryFormat::contiguous);
    const Tensor<float>& w = t.parameters[2 * i].second->value;
    const Tensor<float>& b = t.parameters[2 * i + 1].second->value;
    const std::int64_t C = x.size(1), H = x.size(2), W = x.size(3), O = na * no;
    Tensor<float> raw({N, na, H, W, no}), dw({O, C, 1, 1}), db({O}), dxe({N, C, H, W});
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t o = 0; o < O; ++o)
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t v = 0; v < W; ++v) {
            const std::int64_t k = (((n * na + o / no) * H + h) * W + v) * no + o % no;
            double s = b[o];
            for (std::int64_t c = 0; c < C; ++c) {
              s += double(w[o * C + c]) * x[((n * C + c) * H + h) * W + v];
              dw[o * C + c] += float(double(r[i][k]) * x[((n * C + c) * H + h) * W + v]);
              dxe[((n * C + c) * H + h) * W + v] += float(double(w[o * C + c]) * r[i][k]);
            }
            raw[k] = float(s);
            db[o] += r[i][k];
          }
    EXPECT_LT(test::max_relative_error(maps[i], raw), 1e-5) << "raw map " << i;
    EXPECT_LT(test::max_relative_error(eval.raw[i], raw), 1e-5) << "eval raw map " << i;
    EXPECT_LT(test::max_relative_error(t.parameters[2 * i].second->grad, dw), 1e-5) << "weight gradient " << i;
    EXPECT_LT(test::max_relative_error(t.parameters[2 * i + 1].second->grad, db), 1e-5) << "bias gradient " << i;
    EXPECT_EQ(dx[i].memory_format(), MemoryFormat::channels_last);
    EXPECT_LT(test::max_relative_error(dx[i], dxe), 1e-5) << "input gradient " << i;
  }
  // Deployed: forward() decodes its raw maps; predict() takes the sigmoid from the
  // convolutions' primitives and gives the same rows.
  const auto deployed = head.deploy();
  const std::vector<StageInput<float>> ins{ConstTensorView<float>(xs[0]), ConstTensorView<float>(xs[1])};
  EXPECT_LT(test::max_relative_error(deployed.forward(ins).pred, eval.pred), 1e-5);
  EXPECT_LT(test::max_relative_error(deployed.predict(ins), eval.pred), 1e-5);
  // A head whose convolutions have an activation of their own takes forward()'s way.
  const auto relu = deployed.map_convs("", [](const std::string&, const DeployedConv<float>& c) {
    return AnyDeployed<float>(DeployedConv<float>(c.geometry(), c.weight(), c.bias(), ReLU{}));
  });
  const Tensor<float> relu_rows = relu.predict(ins);
  EXPECT_LT(test::max_relative_error(relu_rows, relu.forward(ins).pred), 1e-6);
  EXPECT_GT(test::max_relative_error(relu_rows, eval.pred), 1e-3);
}

TEST(YoloDetect, DecodeIsYolov5sFormula) {
  const std::int64_t na = 3, no = 7, N = 2;
  const std::vector<double> strides{8, 16};
  Rng rng(3);
  std::vector<Tensor<float>> raw{Tensor<float>({N, na, 3, 5, no}), Tensor<float>({N, na, 2, 1, no})};
  for (auto& r : raw) fill_uniform(r, 6.0, rng);
  raw[0][5] = 95.f, raw[0][6] = -95.f;  // a saturated sigmoid each way
  // Anchors in grid units, level i's in rows i * na ... i * na + na - 1.
  const Tensor<float> table({6, 2}, std::vector<float>{1.25f, 1.625f, 2.f, 3.75f, 4.125f, 2.875f, 3.75f, 7.625f, 1.f, 2.f, 3.f, 0.5f});
  const Tensor<float> pred = yolo::decode_detections(raw, strides, table);
  ASSERT_EQ(pred.sizes(), (Shape{N, na * (15 + 2), no}));
  auto sig = [](double v) { return 1 / (1 + std::exp(-v)); };
  Tensor<float> expected(pred.sizes());
  for (std::int64_t n = 0, row0 = 0; n < N; ++n, row0 = 0)
    for (std::size_t i = 0; i < raw.size(); ++i) {
      const std::int64_t H = raw[i].size(2), W = raw[i].size(3);
      for (std::int64_t a = 0; a < na; ++a)
        for (std::int64_t y = 0; y < H; ++y)
          for (std::int64_t x = 0; x < W; ++x) {
            const float* r = raw[i].data() + (((n * na + a) * H + y) * W + x) * no;
            float* e = expected.data() + (n * pred.size(1) + row0 + (a * H + y) * W + x) * no;
            const double aw = table(std::int64_t(i) * na + a, 0) * strides[i], ah = table(std::int64_t(i) * na + a, 1) * strides[i];
            e[0] = float((2 * sig(r[0]) - 0.5 + double(x)) * strides[i]);
            e[1] = float((2 * sig(r[1]) - 0.5 + double(y)) * strides[i]);
            e[2] = float(4 * sig(r[2]) * sig(r[2]) * aw);
            e[3] = float(4 * sig(r[3]) * sig(r[3]) * ah);
            for (std::int64_t j = 4; j < no; ++j) e[j] = float(sig(r[j]));
          }
      row0 += na * H * W;
    }
  EXPECT_LT(test::max_relative_error(pred, expected), 1e-5);
}

TEST(YoloOps, PoolingAndUpsamplingMatchWindowLoopsInBothLayoutsAndOnCodes) {
  Rng rng(5);
  for (MemoryFormat f : {MemoryFormat::contiguous, MemoryFormat::channels_last})
    for (std::int64_t k : {3, 5}) {
      Tensor<float> x({2, 17, 6, 9}, f);
      fill_uniform(x, 1.0, rng);
      const Tensor<float> y = yolo::max_pool_same<float>(x, k);
      const Tensor<float> up = yolo::upsample_nearest<float>(x, 2);
      EXPECT_EQ(y.memory_format(), f);
      EXPECT_EQ(up.memory_format(), f);
      ASSERT_EQ(up.sizes(), (Shape{2, 17, 12, 18}));
      for (std::int64_t n = 0; n < 2; ++n)
        for (std::int64_t c = 0; c < 17; ++c)
          for (std::int64_t h = 0; h < 6; ++h)
            for (std::int64_t w = 0; w < 9; ++w) {
              float best = -std::numeric_limits<float>::infinity();
              for (std::int64_t i = h - k / 2; i <= h + k / 2; ++i)
                for (std::int64_t j = w - k / 2; j <= w + k / 2; ++j)
                  if (i >= 0 && i < 6 && j >= 0 && j < 9) best = std::max(best, x(n, c, i, j));
              ASSERT_EQ(y(n, c, h, w), best) << "k " << k << " at " << n << "," << c << "," << h << "," << w;
              for (std::int64_t d = 0; d < 4; ++d) ASSERT_EQ(up(n, c, 2 * h + d / 2, 2 * w + d % 2), x(n, c, h, w));
            }
      if (f == MemoryFormat::contiguous) continue;
      // s8 and u8 codes, and bf16 values
      for (const QuantParams q :
           {QuantParams{1.f / 64, 0, -128}, QuantParams{1.f / 128, 128, 0}, QuantParams::bfloat16()}) {
        SCOPED_TRACE(q.bf16 ? "bf16" : q.qmin < 0 ? "s8" : "u8");
        const Int8Codes codes = quantize_codes(x, q);
        const Tensor<float> pooled = dequantize_codes(yolo::max_pool_same_codes(codes, k));
        const Tensor<float> expected = yolo::max_pool_same<float>(dequantize_codes(codes), k);
        EXPECT_EQ(test::max_relative_error(pooled, expected), 0.0);
        const Tensor<float> up_codes = dequantize_codes(yolo::upsample_nearest_codes(codes, 2));
        EXPECT_EQ(test::max_relative_error(up_codes, yolo::upsample_nearest<float>(dequantize_codes(codes), 2)), 0.0);
        const Tensor<float> halves = yolo::max_pool_same<float>(x, 3).to(MemoryFormat::channels_last);
        const Int8Codes other = quantize_codes(halves, q);
        const Tensor<float> cat = dequantize_codes(yolo::concat_codes({&codes, &other, &codes}));
        Tensor<float> expected_cat;
        const Tensor<float> real = dequantize_codes(codes), other_real = dequantize_codes(other);
        concat_channels<float>({real, other_real, real}, expected_cat);
        EXPECT_EQ(test::max_relative_error(cat, expected_cat), 0.0) << "concat";
        const Tensor<float> cat2 = dequantize_codes(concat_codes(codes, other));
        concat_channels<float>({real, other_real}, expected_cat);
        EXPECT_EQ(test::max_relative_error(cat2, expected_cat), 0.0) << "concat of two";
      }
    }
}

TEST(YoloModel, TensorNamesAreYolov5s) {
  // Default options: every Conv is YOLOv5's conv + BN; OREPA rows are OREPA blocks.
  yolo::Model<float> model(yolo::parse_model_config(small_yaml, "small.yaml"));
  const auto names = model.state_dict().names();
  auto has = [&](const std::string& n) { return std::find(names.begin(), names.end(), n) != names.end(); };
  EXPECT_TRUE(has("model.0.conv.weight"));
  EXPECT_TRUE(has("model.0.bn.running_var"));
  EXPECT_TRUE(has("model.1.weight_orepa_origin"));
  EXPECT_TRUE(has("model.2.m.0.cv2.conv.weight"));
  EXPECT_TRUE(has("model.3.cv2.conv.weight"));
  EXPECT_TRUE(has("model.7.m.1.weight"));
  EXPECT_TRUE(has("model.7.anchors"));
  // Anchors are kept in grid units: pixels / stride.
  const auto& a = model.detect().anchors();
  EXPECT_EQ(a.sizes(), (Shape{2, 2, 2}));
  EXPECT_FLOAT_EQ(a[0], 4.f / 2.f);
  EXPECT_FLOAT_EQ(a[4], 12.f / 4.f);
}

TEST(YoloModel, NormMatchedInitScalesTheKernelExactlyToTheDefaultConvsNorm) {
  const BlockMaker<float> plain = yolo::block_maker<float>("orepa");
  const BlockMaker<float> matched = yolo::norm_matched_init<float>(plain);
  Rng rng(11);
  // The folded kernel's mean squared norm per output channel.
  auto per_channel = [](const Tensor<float>& w) {
    double sq = 0;
    for (std::int64_t j = 0; j < w.numel(); ++j) sq += double(w[j]) * w[j];
    return sq / double(w.size(0));
  };
  for (std::int64_t k : {3, 1, 7}) {  // OREPA, OREPA_1x1, OREPA_LargeConv
    SCOPED_TRACE(k);
    const auto o = ConvOptions(16, 24, k).seed(5);
    AnyBlock<float> a = plain(o), b = matched(o);
    const Tensor<float> wa = a.folded().weight, wb = b.folded().weight;
    // PyTorch's default conv has 1/3; the reference initialisation several times that.
    if (k < 7) {
      EXPECT_GT(per_channel(wa), 1.0);
    }
    EXPECT_NEAR(per_channel(wb), 1.0 / 3.0, 1e-4);
    // Exactly the same kernel times one gain: every branch scaled by one factor.
    const double gain = std::sqrt(per_channel(wb) / per_channel(wa));
    double worst = 0;
    for (std::int64_t j = 0; j < wa.numel(); ++j) worst = std::max(worst, std::abs(wb[j] - gain * wa[j]));
    EXPECT_LT(worst, 1e-6 * std::sqrt(per_channel(wa)));
    // Only branch weights changed; vector, BN and identity buffers are as made.
    const auto ta = a.state_dict(), tb = b.state_dict();
    for (const auto& name : ta.names()) {
      const std::string leaf = name.substr(name.rfind('.') + 1);  // npos + 1 = 0
      if (leaf.rfind("weight_", 0) == 0 || !ta.is_tensor(name)) continue;
      EXPECT_EQ(max_abs_diff(ta.tensor(name), tb.tensor(name)), 0.0) << name;
    }
    // Under the BatchNorm (batch statistics) the training output barely moves: only eps
    // weighs differently against the smaller variance.
    const auto x = test::random_tensor<float>({2, 16, 9, 9}, rng);
    const Tensor<float> ya = a.forward_train(x), yb = b.forward_train(x);
    EXPECT_LT(max_abs_diff(ya, yb), 1e-3);
  }
  // ConvBN has no branches: exactly as made.
  const auto o = ConvOptions(8, 8, 6).stride(2).seed(1);
  AnyBlock<float> a = plain(o), b = matched(o);
  EXPECT_EQ(a.type_name(), "ConvBN");
  EXPECT_FALSE(b.scale_kernel(0.5f));
  EXPECT_EQ(max_abs_diff(a.folded().weight, b.folded().weight), 0.0);
}

TEST(YoloModel, YamlFaultsAreClearErrors) {
  auto expect_error = [](const std::string& yaml, const std::string& part) {
    try {
      yolo::Model<float> m(yolo::parse_model_config(yaml, "bad.yaml"));
      FAIL() << "accepted: " << yaml;
    } catch (const config_error& e) {
      EXPECT_NE(std::string(e.what()).find("bad.yaml"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  const std::string head = "nc: 2\nanchors: [[4, 5, 8, 10]]\n";
  expect_error(head + "backbone: [[-1, 1, Conv, [4, 3, 2]]]\nhead: [[-1, 1, Frobnicate, [4]], [-1, 1, Detect, [nc, anchors]]]",
               "unknown module 'Frobnicate'");
  expect_error(head + "backbone: [[-1, 1, Conv, [4, 3, 2]]]\nhead: [[2, 1, Conv, [4]], [-1, 1, Detect, [nc, anchors]]]",
               "points forward");
  expect_error(head + "backbone: [[-1, 1, Conv, [4, 3, 2]]]\nhead: [[-5, 1, Conv, [4]], [-1, 1, Detect, [nc, anchors]]]",
               "points before layer 0");
  expect_error(head + "backbone: [[-1, 1, Conv, [4, 3, 2, 1, 1, 1, True, 9]]]\nhead: [[-1, 1, Detect, [nc, anchors]]]",
               "expected arguments");
  expect_error("depth_multiple: -1\n" + head + "backbone: [[-1, 1, Conv, [4, 3, 2]]]\nhead: [[-1, 1, Detect, [nc, anchors]]]",
               "depth_multiple must be > 0");
  expect_error(head + "backbone: [[-1, 1, Conv, [4, 3, 2]]]\nhead: [[-1, 1, Conv, [4]]]", "no Detect head");
  expect_error(head + "backbone: [[-1, 1, Conv]]\nhead: []", "a row must be [from, number, module, args]");
  expect_error("nc: [1, 2", "not valid YAML");
  // An expansion whose hidden channel count overflows any integer (found by fuzz_model_yaml).
  expect_error(head + "backbone: [[-1, 1, Conv, [4, 3, 2]], [-1, 1, Bottleneck, [4, True, 1, 5.5e44]]]\n"
                      "head: [[-1, 1, Detect, [nc, anchors]]]",
               "hidden channels int(c2 * e)");
  expect_error(head + "backbone: [[-1, 1, Conv, [4, 3, 2]], [-1, 1, C3, [4, True, 1, -0.5]]]\n"
                      "head: [[-1, 1, Detect, [nc, anchors]]]",
               "hidden channels int(c2 * e)");
}

namespace {

// Signal-to-quantization-noise ratio of `a` against the reference `ref`, in dB.
double sqnr_db(const Tensor<float>& ref, const Tensor<float>& a) {
  double s = 0, n = 0;
  for (std::int64_t i = 0; i < ref.numel(); ++i) {
    s += double(ref[i]) * ref[i];
    n += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]);
  }
  return 10 * std::log10(s / std::max(n, 1e-300));
}

}  // namespace

TEST(YoloModel, Int8DeploymentCalibratedOnTheWholeGraph) {
  const auto model = fixture_model();
  const auto io_file = io::SafetensorsFile::open(test::yolo_fixture("io.safetensors"));
  const Tensor<float> a = io_file.get<float>("input.a"), b = io_file.get<float>("input.b");
  const auto fp32 = model.deploy();
  Calibrator cal;
  cal.observe(fp32, b);
  cal.observe(fp32, a);
  const Calibration ranges = cal.calibration();
  EXPECT_EQ(ranges.ranges().size(), 60u);  // 57 convolution blocks (C3s' and SPPF's inner ones too), 3 Detect convolutions
  EXPECT_TRUE(ranges.contains("model.24.m.2."));
  EXPECT_TRUE(ranges.contains("model.8.m.0.cv2."));
  const auto int8 = model.deploy(DeployOptions().precision(Precision::int8).calibration(ranges));
  // Codes flow through the upsampling and the concatenations: they write codes.
  EXPECT_TRUE(int8.output_quantization(11).has_value());  // nn.Upsample -> Concat -> C3
  EXPECT_TRUE(int8.output_quantization(12).has_value());  // Concat -> C3
  EXPECT_FALSE(fp32.output_quantization(12).has_value());
  // Every convolution, given the fp32 network's input to it, stays near 8-bit resolution.
  const auto report = quantization_report(fp32, int8, {a});
  ASSERT_EQ(report.layers.size(), ranges.ranges().size());
  for (const auto& layer : report.layers) EXPECT_GT(layer.output_sqnr_db, 28.0) << layer.layer;
  // End to end, this random-weight network amplifies any perturbation: 40 dB of input
  // noise leave about 12 dB on the P5 map in fp32 itself, so its int8 output is compared
  // with that yardstick rather than with a fixed bound.
  Rng rng(1);
  Tensor<float> noisy = a;
  for (auto& v : noisy) v += float(rng.uniform(-1e-2, 1e-2));
  const auto ref = fp32.forward(a), q = int8.forward(a), perturbed = fp32.forward(noisy);
  EXPECT_GT(sqnr_db(a, noisy), 39.0);
  EXPECT_GT(sqnr_db(ref.pred, q.pred), sqnr_db(ref.pred, perturbed.pred) - 10.0);
  EXPECT_GT(sqnr_db(ref.raw[0], q.raw[0]), 8.0);
  EXPECT_LT(test::max_relative_error(int8.predict(a), q.pred), 1e-6) << "the rows alone, the sigmoid in the primitives";
}

// Every layer of `net` run on float, each convolution on its tensor API (which converts
// its input to the primitive's precision): the deployed graph without codes between layers.
yolo::DetectOutput<float> forward_on_float(const yolo::DeployedModel<float>& net, const Tensor<float>& x) {
  std::vector<Tensor<float>> vals(net.size());
  auto input = [&](std::int64_t j) { return j < 0 ? x : vals[std::size_t(j)]; };
  for (std::size_t i = 0; i < net.size(); ++i) {
    const auto& l = net.layer(i);
    if (l.stage) {
      vals[i] = l.stage->forward(input(l.from[0]).to(MemoryFormat::contiguous));
    } else if (l.concat) {
      std::vector<Tensor<float>> parts;
      for (auto j : l.from) parts.push_back(input(j).to(MemoryFormat::contiguous));
      vals[i] = yolo::concat<float>(std::vector<ConstTensorView<float>>(parts.begin(), parts.end()));
    } else {
      std::vector<Tensor<float>> parts;
      for (auto j : l.from) parts.push_back(input(j));
      std::vector<StageInput<float>> ins;
      for (const auto& p : parts) ins.emplace_back(ConstTensorView<float>(p));
      return net.head().forward(ins);
    }
  }
  ADD_FAILURE() << "no head";
  return {};
}

// bf16 convolutions pass bf16 values to each other (through the upsampling, the
// concatenations and the pools) instead of float that the next one converts; the output is
// as close to fp32 as the graph with float between its layers.
TEST(YoloModel, Bf16DeploymentPassesBf16ValuesBetweenConvolutions) {
  const auto model = fixture_model();
  const auto io_file = io::SafetensorsFile::open(test::yolo_fixture("io.safetensors"));
  const Tensor<float> a = io_file.get<float>("input.a");
  const auto fp32 = model.deploy();
  const auto bf16 = model.deploy(DeployOptions().precision(Precision::bf16));
  yolo::DetectOutput<float> got;
  try {
    got = bf16.forward(a);
  } catch (const engine_error&) {
    GTEST_SKIP() << "oneDNN has no bf16 convolution on ISA " << engine::cpu_isa_name();
  }
  for (std::size_t i : {0, 9, 11, 12, 17}) {  // Conv, SPPF, nn.Upsample, Concat, the C3 the head reads
    ASSERT_TRUE(bf16.output_quantization(i).has_value()) << "layer " << i;
    EXPECT_TRUE(bf16.output_quantization(i)->bf16) << "layer " << i;
  }
  EXPECT_FALSE(fp32.output_quantization(0).has_value());
  const auto ref = fp32.forward(a), on_float = forward_on_float(bf16, a);
  const double codes_db = sqnr_db(ref.pred, got.pred), float_db = sqnr_db(ref.pred, on_float.pred);
  std::printf("  bf16 against fp32: %.1f dB with bf16 between layers, %.1f dB with float\n", codes_db, float_db);
  EXPECT_GT(codes_db, float_db - 1.0);
  EXPECT_GT(codes_db, 20.0);
  for (std::size_t l = 0; l < ref.raw.size(); ++l)
    EXPECT_GT(sqnr_db(ref.raw[l], got.raw[l]), sqnr_db(ref.raw[l], on_float.raw[l]) - 1.0) << "level " << l;
  EXPECT_LT(test::max_relative_error(bf16.predict(a), got.pred), 1e-6) << "the rows alone, the sigmoid in the primitives";
}

TEST(YoloModel, NonFiniteInputsGiveNonFiniteOutputsInEveryPrecision) {
  const auto model = fixture_model();
  const auto io_file = io::SafetensorsFile::open(test::yolo_fixture("io.safetensors"));
  const Tensor<float> a = io_file.get<float>("input.a"), b = io_file.get<float>("input.b");
  const auto fp32 = model.deploy();
  Calibrator cal;
  cal.observe(fp32, a);
  Tensor<float> poisoned = b;  // image 1 of 2 holds one NaN pixel
  poisoned[poisoned.numel() - 7] = std::numeric_limits<float>::quiet_NaN();
  for (Precision p : {Precision::fp32, Precision::bf16, Precision::int8}) {
    const auto net = p == Precision::int8 ? model.deploy(DeployOptions().precision(p).calibration(cal.calibration()))
                                          : model.deploy(DeployOptions().precision(p));
    yolo::DetectOutput<float> clean, y;
    try {
      clean = net.forward(b);
      y = net.forward(poisoned);
    } catch (const engine_error&) {
      if (p == Precision::bf16) continue;  // no bf16 kernel on this CPU
      throw;
    }
    const std::int64_t per = y.pred.numel() / 2;
    std::int64_t nan_rows = 0;  // values, in image 1's rows
    for (std::int64_t i = per; i < 2 * per; ++i) nan_rows += std::isnan(y.pred[i]);
    EXPECT_GT(nan_rows, 0) << precision_name(p);
    if (p == Precision::int8) {
      EXPECT_EQ(nan_rows, per) << "int8: the whole image's rows";
    }
    for (std::int64_t i = 0; i < per; ++i) ASSERT_EQ(y.pred[i], clean.pred[i]) << precision_name(p) << " image 0, value " << i;
    const Tensor<float> rows = net.predict(poisoned);  // the rows alone: the same NaNs
    for (std::int64_t i = 0; i < 2 * per; ++i)
      ASSERT_EQ(std::isnan(rows[i]), std::isnan(y.pred[i])) << precision_name(p) << " value " << i;
  }
}

TEST(YoloModel, DeployingANonFiniteBlockNamesItsLayer) {
  auto model = fixture_model();
  for (auto& [name, p] : model.named_parameters())
    if (name == "model.1.weight_orepa_origin") p->value[5] = std::numeric_limits<float>::quiet_NaN();
  try {
    model.deploy();
    FAIL() << "deployed a NaN weight";
  } catch (const value_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("DetectionModel[model.1] (OREPA)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("weight_orepa_origin"), std::string::npos) << msg;
  }
}
