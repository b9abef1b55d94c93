// The OREPA block: squeeze equivalence against the explicit six-branch network run on the
// activations, eval vs deploy, BN statistics, finite-difference gradients, bad input.
#include "test_util.hpp"

using namespace orepa;
using test::random_tensor;

namespace {

// Scales output channel o of y by v(row, o).
void scale_channels(Tensor<double>& y, const Tensor<double>& v, std::int64_t row) {
  const auto C = y.size(1), P = y.size(2) * y.size(3);
  for (std::int64_t j = 0; j < y.numel(); ++j) y[j] *= v(row, (j / P) % C);
}
void accumulate_into(Tensor<double>& acc, const Tensor<double>& y) {
  ASSERT_EQ(acc.sizes(), y.sizes());
  for (std::int64_t j = 0; j < y.numel(); ++j) acc[j] += y[j];
}

// A per-channel fixed k x k filter F[c] applied depthwise (groups = channels), i.e. the
// average pool or the frequency-prior filter as a layer of its own.
Tensor<double> depthwise_filter(const Tensor<double>& y, const Tensor<double>& filters, const ConvGeometry& g) {
  const auto C = y.size(1), k = g.kernel, rows = filters.numel() / (k * k);
  ConvGeometry dg = g;
  dg.in_channels = dg.out_channels = dg.groups = C;
  Tensor<double> w({C, 1, k, k});
  for (std::int64_t c = 0; c < C; ++c)
    for (std::int64_t j = 0; j < k * k; ++j) w[c * k * k + j] = filters[(c % rows) * k * k + j];
  return reference::conv2d(y, w, dg);
}

// The OREPA block computed as a real multi-branch network on the activations
// (SPEC section 1), each branch a sequence of convolutions, summed before BN.
Tensor<double> explicit_branches(OREPA<double>& b, const Tensor<double>& x) {
  const auto g = b.geometry();
  const auto& v = b.param("vector").value;
  auto P = [&](const char* n) -> const Tensor<double>& { return b.param(n).value; };
  ConvGeometry one = g;  // 1x1 conv, stride 1, no padding
  one.kernel = 1, one.stride = 1, one.padding = 0, one.dilation = 1;

  Tensor<double> sum = reference::conv2d(x, P("weight_orepa_origin"), g);  // row 0
  scale_channels(sum, v, 0);

  for (auto [row, conv, filter] : {std::tuple{1, "weight_orepa_avg_conv", "weight_orepa_avg_avg"},
                                   std::tuple{2, "weight_orepa_pfir_conv", "weight_orepa_prior"}}) {
    ConvGeometry o1 = one;
    o1.out_channels = g.out_channels;
    auto y = depthwise_filter(reference::conv2d(x, P(conv), o1), P(filter), g);
    scale_channels(y, v, row);
    accumulate_into(sum, y);
  }
  {  // row 3: identity-based 1x1 (T channels), then k x k
    Tensor<double> c1 = P("weight_orepa_1x1_kxk_idconv1");
    const auto& id = P("id_tensor");
    for (std::int64_t j = 0; j < c1.numel(); ++j) c1[j] += id[j];
    ConvGeometry g1 = one, g2 = g;
    g1.out_channels = c1.size(0);
    g2.in_channels = c1.size(0);
    auto y = reference::conv2d(reference::conv2d(x, c1, g1), P("weight_orepa_1x1_kxk_conv2"), g2);
    scale_channels(y, v, 3);
    accumulate_into(sum, y);
  }
  {  // row 4: 1x1 conv with the block's stride; padding shifted by the kernel centre
    ConvGeometry g4 = g;
    g4.kernel = 1, g4.dilation = 1, g4.padding = g.padding - g.dilation * (g.kernel / 2);
    auto y = reference::conv2d(x, P("weight_orepa_1x1"), g4);
    scale_channels(y, v, 4);
    accumulate_into(sum, y);
  }
  {  // row 5: depthwise k x k with 8 outputs per input channel, then grouped pointwise
    // whose rows follow the reference's permutation: output c*Og+a uses pw row a*g+c.
    ConvGeometry gd = g;
    gd.out_channels = 8 * g.in_channels, gd.groups = g.in_channels;
    auto dw_out = reference::conv2d(x, P("weight_orepa_gconv_dw"), gd);
    const auto& pw = P("weight_orepa_gconv_pw");
    Tensor<double> pw_perm(pw.sizes());
    const auto Og = g.out_per_group(), cols = pw.size(1);
    for (std::int64_t c = 0; c < g.groups; ++c)
      for (std::int64_t a = 0; a < Og; ++a)
        for (std::int64_t j = 0; j < cols; ++j) pw_perm[(c * Og + a) * cols + j] = pw[(a * g.groups + c) * cols + j];
    ConvGeometry gp = one;
    gp.in_channels = 8 * g.in_channels, gp.out_channels = g.out_channels, gp.groups = g.groups;
    auto y = reference::conv2d(dw_out, pw_perm, gp);
    scale_channels(y, v, 5);
    accumulate_into(sum, y);
  }
  return sum;
}

struct SqueezeCase {
  std::int64_t i, o, k, s, p, d, g, h;
};

class OrepaSqueeze : public ::testing::TestWithParam<SqueezeCase> {};

}  // namespace

TEST_P(OrepaSqueeze, EqualsExplicitMultiBranchNetwork) {
  const auto c = GetParam();
  OREPA<double> block(OrepaOptions(c.i, c.o, c.k).stride(c.s).padding(c.p).dilation(c.d).groups(c.g).seed(3));
  Rng rng(11);
  test::randomise(block, rng);
  auto x = random_tensor<double>({2, c.i, c.h, c.h}, rng);
  const auto branches = explicit_branches(block, x);
  const auto squeezed = reference::conv2d(x, block.squeeze(), block.geometry());
  test::expect_close(squeezed, branches, 1e-10, "conv(x, squeeze()) vs the six branches");

  // Eval forward = BN(running stats) of the branch sum (activation identity here).
  const auto& bn = block.bn();
  Tensor<double> want = branches;
  const auto P = want.size(2) * want.size(3);
  for (std::int64_t j = 0; j < want.numel(); ++j) {
    const auto ch = (j / P) % c.o;
    want[j] = (want[j] - bn.running_mean.value[ch]) / std::sqrt(bn.running_var.value[ch] + 1e-5) *
                  bn.weight.value[ch] + bn.bias.value[ch];
  }
  test::expect_close(block.forward_eval(x), want, 1e-10, "forward_eval");
}

INSTANTIATE_TEST_SUITE_P(Configs, OrepaSqueeze,
                         ::testing::Values(SqueezeCase{4, 6, 3, 1, 1, 1, 1, 7},    // g = 1
                                           SqueezeCase{4, 6, 3, 2, 1, 1, 2, 8},    // g = 2, stride 2
                                           SqueezeCase{8, 16, 3, 1, 1, 1, 8, 6},   // g = 8: T = 2I
                                           SqueezeCase{4, 4, 3, 1, 2, 2, 1, 9},    // dilation 2
                                           SqueezeCase{4, 6, 5, 1, 2, 1, 2, 8},    // k = 5
                                           SqueezeCase{2, 4, 7, 2, 3, 1, 1, 11}),  // k = 7, stride 2
                         [](const auto& info) {
                           const auto& c = info.param;
                           return "i" + std::to_string(c.i) + "o" + std::to_string(c.o) + "k" + std::to_string(c.k) +
                                  "s" + std::to_string(c.s) + "d" + std::to_string(c.d) + "g" + std::to_string(c.g);
                         });

TEST(Orepa, InternalChannelsRuleAndBuffers) {
  OREPA<float> small(OrepaOptions(8, 16, 3).groups(4));
  EXPECT_EQ(small.param("weight_orepa_1x1_kxk_idconv1").value.sizes(), (Shape{8, 2, 1, 1}));
  OREPA<float> wide(OrepaOptions(8, 16, 3).groups(8));
  EXPECT_EQ(wide.param("weight_orepa_1x1_kxk_idconv1").value.sizes(), (Shape{16, 1, 1, 1}));
  OREPA<float> custom(OrepaOptions(8, 16, 3).internal_channels(4).groups(2));
  EXPECT_EQ(custom.param("weight_orepa_1x1_kxk_conv2").value.sizes(), (Shape{16, 2, 3, 3}));
  // id_tensor[t, t mod Ig] = 1
  const auto& id = wide.param("id_tensor").value;
  for (std::int64_t t = 0; t < 16; ++t) EXPECT_EQ(id[t], 1.0f);
  // Frequency prior for k = 3, O = 16 (half = 8): spot values of the closed form.
  const auto& pr = small.param("weight_orepa_prior").value;
  EXPECT_NEAR(pr[(0 * 3 + 0) * 3 + 0], std::cos(M_PI * 0.5 / 3), 1e-6);              // o=0, h=0
  EXPECT_NEAR(pr[(2 * 3 + 1) * 3 + 0], std::cos(M_PI * 1.5 * 3 / 3), 1e-6);          // o=2, h=1
  EXPECT_NEAR(pr[(9 * 3 + 2) * 3 + 2], std::cos(M_PI * 2.5 * (10 - 8) / 3), 1e-6);   // o=9, w=2
  // Reference initial scales.
  const auto& v = small.param("vector").value;
  const double want[6] = {0.25, 0.25, 0.0, 0.5, 1.0, 0.5};
  for (int r = 0; r < 6; ++r) EXPECT_EQ(v(r, 5), float(want[r]));
  // Seeded: same seed, same weights; different seed, different weights.
  OREPA<float> again(OrepaOptions(8, 16, 3).groups(4));
  OREPA<float> other(OrepaOptions(8, 16, 3).groups(4).seed(9));
  EXPECT_EQ(max_abs_diff(small.squeeze(), again.squeeze()), 0.0);
  EXPECT_GT(max_abs_diff(small.squeeze(), other.squeeze()), 0.0);
}

TEST(Orepa, FrequencyPriorAnyOddK) {
  auto p = branches::frequency_prior<double>(5, 5);  // half = 2.5
  EXPECT_NEAR(p[(1 * 5 + 3) * 5 + 4], std::cos(M_PI * 3.5 * 2 / 5), 1e-12);
  EXPECT_NEAR(p[(3 * 5 + 4) * 5 + 1], std::cos(M_PI * 1.5 * (4 - 2.5) / 5), 1e-12);
}

template <class Act>
void eval_equals_deploy(std::int64_t i, std::int64_t o, std::int64_t k, std::int64_t s, std::int64_t g) {
  OREPA<float, Act> block(OrepaOptions(i, o, k).stride(s).groups(g).seed(5));
  Rng rng(5);
  test::randomise(block, rng);
  auto x = random_tensor<float>({2, i, 13, 13}, rng);
  const auto deployed = block.deploy();
  const auto eval = block.forward_eval(x);
  test::expect_close(deployed.forward(x), eval, 1e-5, std::string("deploy vs eval, ") + Act::name);
  // In double: the folded kernel is exact.
  OREPA<double, Act> blockd(OrepaOptions(i, o, k).stride(s).groups(g).seed(5));
  Rng rng2(5);
  test::randomise(blockd, rng2);
  auto xd = x.cast<double>();
  test::expect_close(blockd.deploy().forward(xd), blockd.forward_eval(xd), 1e-12, "double deploy vs eval");
  EXPECT_EQ(deployed.primitive_creations(), 1);
  deployed.forward(x);
  EXPECT_EQ(deployed.primitive_creations(), 1);  // cached per shape
}

TEST(Orepa, EvalEqualsDeployIdentity) { eval_equals_deploy<Identity>(8, 16, 3, 1, 1); }
TEST(Orepa, EvalEqualsDeployReLU) { eval_equals_deploy<ReLU>(8, 12, 3, 2, 2); }
TEST(Orepa, EvalEqualsDeploySiLU) { eval_equals_deploy<SiLU>(16, 16, 5, 1, 8); }

// A user functor activation: applied after the fused conv + bias.
struct LeakyTenth {
  static constexpr ActivationKind kind = ActivationKind::custom;
  static constexpr const char* name = "leaky";
  template <class S> S operator()(S x) const { return x > 0 ? x : S(0.1) * x; }
  template <class S> S derivative(S x) const { return x > 0 ? S(1) : S(0.1); }
};
TEST(Orepa, EvalEqualsDeployUserActivation) { eval_equals_deploy<LeakyTenth>(4, 8, 3, 1, 1); }

TEST(Orepa, TrainForwardBatchStatisticsAndRunningUpdate) {
  OREPA<double, SiLU> block(OrepaOptions(4, 6, 3).groups(2).seed(1));
  Rng rng(2);
  test::randomise(block, rng);
  auto x = random_tensor<double>({3, 4, 7, 7}, rng);
  const auto rm0 = block.bn().running_mean.value, rv0 = block.bn().running_var.value;
  const auto y = reference::conv2d(x, block.squeeze(), block.geometry());
  const auto out = block.forward_train(x);
  const auto P = 49, N = 3;
  const double n = N * P;
  for (std::int64_t c = 0; c < 6; ++c) {
    double mean = 0, var = 0;
    for (int b = 0; b < N; ++b)
      for (int j = 0; j < P; ++j) mean += y(b, c, j / 7, j % 7);
    mean /= n;
    for (int b = 0; b < N; ++b)
      for (int j = 0; j < P; ++j) var += std::pow(y(b, c, j / 7, j % 7) - mean, 2);
    var /= n;  // biased, for normalising
    for (int b = 0; b < N; ++b)
      for (int j = 0; j < P; ++j) {
        const double z = (y(b, c, j / 7, j % 7) - mean) / std::sqrt(var + 1e-5) * block.bn().weight.value[c] +
                         block.bn().bias.value[c];
        EXPECT_NEAR(out(b, c, j / 7, j % 7), z / (1 + std::exp(-z)), 1e-10);
      }
    EXPECT_NEAR(block.bn().running_mean.value[c], 0.9 * rm0[c] + 0.1 * mean, 1e-12);
    EXPECT_NEAR(block.bn().running_var.value[c], 0.9 * rv0[c] + 0.1 * var * n / (n - 1), 1e-12);  // unbiased
  }
  EXPECT_EQ(block.bn().num_batches_tracked, 1);
}

// Finite-difference checks in double of every parameter and the input.
struct GradCase {
  std::int64_t i, o, k, s, g;
  int act;  // 0 identity, 1 relu, 2 silu
};
class OrepaGradient : public ::testing::TestWithParam<GradCase> {};

template <class Act>
void gradient_check(const GradCase& c) {
  OREPA<double, Act> block(OrepaOptions(c.i, c.o, c.k).stride(c.s).groups(c.g).seed(4));
  Rng rng(8);
  test::randomise(block, rng);
  test::check_block_gradients(block, random_tensor<double>({2, c.i, 7, 7}, rng), rng);
}

TEST_P(OrepaGradient, MatchesFiniteDifferences) {
  const auto c = GetParam();
  if (c.act == 0) gradient_check<Identity>(c);
  if (c.act == 1) gradient_check<ReLU>(c);
  if (c.act == 2) gradient_check<SiLU>(c);
}
INSTANTIATE_TEST_SUITE_P(Configs, OrepaGradient,
                         ::testing::Values(GradCase{4, 4, 3, 1, 1, 0}, GradCase{4, 6, 3, 2, 2, 1},
                                           GradCase{4, 4, 5, 1, 2, 2}, GradCase{2, 4, 5, 2, 1, 1},
                                           GradCase{4, 8, 3, 1, 1, 2}, GradCase{4, 4, 3, 2, 2, 0}));

TEST(Orepa, GradientsAccumulateUntilZeroed) {
  OREPA<float, ReLU> block(OrepaOptions(4, 8, 3));
  Rng rng(1);
  auto x = random_tensor<float>({2, 4, 6, 6}, rng);
  auto g = random_tensor<float>({2, 8, 6, 6}, rng);
  block.forward_train(x);
  block.backward(g);
  const auto once = block.param("weight_orepa_origin").grad;
  block.forward_train(x);
  block.backward(g);
  const auto& twice = block.param("weight_orepa_origin").grad;
  for (std::int64_t j = 0; j < once.numel(); ++j) EXPECT_NEAR(twice[j], 2 * once[j], 1e-4 * (1 + std::abs(once[j])));
  block.zero_grad();
  for (auto v : block.param("weight_orepa_origin").grad) EXPECT_EQ(v, 0.0f);
}

TEST(Orepa, TrainingStepReusesPrimitives) {
  OREPA<float, SiLU> block(OrepaOptions(8, 8, 3));
  Rng rng(1);
  auto x = random_tensor<float>({2, 8, 10, 10}, rng);
  auto g = random_tensor<float>({2, 8, 10, 10}, rng);
  for (int step = 0; step < 3; ++step) {
    block.forward_train(x);
    block.backward(g);
  }
  EXPECT_EQ(block.primitive_creations(), 1);
}

TEST(Orepa, BadInputAndConfigurationThrow) {
  EXPECT_THROW(OREPA<float>(OrepaOptions(8, 16, 4)), config_error);
  EXPECT_THROW(OREPA<float>(OrepaOptions(8, 16, 3).groups(3)), config_error);
  EXPECT_THROW(OREPA<float>(OrepaOptions(8, 16, 3).stride(0)), config_error);
  EXPECT_THROW(OREPA<float>(OrepaOptions(8, 16, 3).dilation(0)), config_error);
  EXPECT_THROW(OREPA<float>(OrepaOptions(8, 16, 3).padding(-3)), config_error);
  EXPECT_THROW(OREPA<float>(OrepaOptions(8, 16, -1)), config_error);
  OREPA<float> block(OrepaOptions(8, 16, 3).padding(0));
  try {
    block.forward_train(Tensor<float>({2, 4, 8, 8}));
    FAIL();
  } catch (const shape_error& e) {
    EXPECT_NE(std::string(e.what()).find("input must be [N, 8, H, W], got [2, 4, 8, 8]"), std::string::npos) << e.what();
  }
  EXPECT_THROW(block.forward_eval(Tensor<float>({1, 8, 2, 2})), shape_error);   // smaller than the kernel
  EXPECT_THROW(block.forward_train(Tensor<float>({1, 8, 3, 3})), state_error);  // one value per channel
  EXPECT_THROW(block.backward(Tensor<float>({1, 16, 1, 1})), state_error);      // no forward yet
  block.forward_train(Tensor<float>({2, 8, 5, 5}, 1.0f));
  EXPECT_THROW(block.backward(Tensor<float>({2, 16, 4, 4})), shape_error);
  EXPECT_THROW(block.param("nope"), config_error);
  auto d = block.deploy();
  EXPECT_THROW(d.forward(Tensor<float>({1, 3, 8, 8})), shape_error);
}
