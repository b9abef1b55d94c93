// The baseline blocks ConvBN and DBB: eval against conv + BN written out in the test,
// the DBB training forward computed independently branch by branch (BN-and-pad border
// from the updated running statistics), eval vs deploy, float (oneDNN) vs double
// (reference) training steps, finite-difference gradients, names, bad configurations.
#include "test_util.hpp"

#include <string>
#include <utility>
#include <vector>

#include "orepa/blocks/conv_bn.hpp"
#include "orepa/blocks/dbb.hpp"

using namespace orepa;
using test::random_tensor;

namespace {

constexpr double kEps = 1e-5;

// A BatchNorm written out in the test: batch statistics with the running-statistics
// update (training) or the running statistics (eval). Starts from a block BN's values.
struct RefBN {
  Tensor<double> gamma, beta, rm, rv;
  explicit RefBN(const BatchNorm2d<double>& bn)
      : gamma(bn.weight.value), beta(bn.bias.value), rm(bn.running_mean.value), rv(bn.running_var.value) {}

  Tensor<double> train(const Tensor<double>& y) {
    const auto N = y.size(0), C = y.size(1), H = y.size(2), W = y.size(3);
    const double n = double(N * H * W);
    Tensor<double> z(y.sizes());
    for (std::int64_t c = 0; c < C; ++c) {
      double mean = 0, var = 0;
      for (std::int64_t b = 0; b < N; ++b)
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t w = 0; w < W; ++w) mean += y(b, c, h, w);
      mean /= n;
      for (std::int64_t b = 0; b < N; ++b)
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t w = 0; w < W; ++w) var += (y(b, c, h, w) - mean) * (y(b, c, h, w) - mean);
      var /= n;  // biased for normalising
      for (std::int64_t b = 0; b < N; ++b)
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t w = 0; w < W; ++w)
            z(b, c, h, w) = (y(b, c, h, w) - mean) / std::sqrt(var + kEps) * gamma[c] + beta[c];
      rm[c] = 0.9 * rm[c] + 0.1 * mean;
      rv[c] = 0.9 * rv[c] + 0.1 * var * n / (n - 1);  // unbiased for the running variance
    }
    return z;
  }
  Tensor<double> eval(const Tensor<double>& y) const {
    Tensor<double> z(y.sizes());
    const auto C = y.size(1), P = y.size(2) * y.size(3);
    for (std::int64_t j = 0; j < y.numel(); ++j) {
      const auto c = (j / P) % C;
      z[j] = (y[j] - rm[c]) / std::sqrt(rv[c] + kEps) * gamma[c] + beta[c];
    }
    return z;
  }
  // The BN-and-pad border value from the current running statistics.
  double border(std::int64_t c) const { return beta[c] - rm[c] * gamma[c] / std::sqrt(rv[c] + kEps); }
};

// Pads z by p on every side with bn.border(c) in channel c.
Tensor<double> pad_with_border(const Tensor<double>& z, std::int64_t p, const RefBN& bn) {
  const auto N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3);
  Tensor<double> out({N, C, H + 2 * p, W + 2 * p});
  for (std::int64_t b = 0; b < N; ++b)
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t h = 0; h < H + 2 * p; ++h)
        for (std::int64_t w = 0; w < W + 2 * p; ++w) {
          const bool inside = h >= p && h < H + p && w >= p && w < W + p;
          out(b, c, h, w) = inside ? z(b, c, h - p, w - p) : bn.border(c);
        }
  return out;
}

// k x k average pool with zero padding p counted in the divisor (count_include_pad).
Tensor<double> avg_pool(const Tensor<double>& x, std::int64_t k, std::int64_t s, std::int64_t p) {
  const auto N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto OH = (H + 2 * p - k) / s + 1, OW = (W + 2 * p - k) / s + 1;
  Tensor<double> y({N, C, OH, OW});
  for (std::int64_t b = 0; b < N; ++b)
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t oh = 0; oh < OH; ++oh)
        for (std::int64_t ow = 0; ow < OW; ++ow) {
          double sum = 0;
          for (std::int64_t i = 0; i < k; ++i)
            for (std::int64_t j = 0; j < k; ++j) {
              const auto h = oh * s - p + i, w = ow * s - p + j;
              if (h >= 0 && h < H && w >= 0 && w < W) sum += x(b, c, h, w);
            }
          y(b, c, oh, ow) = sum / double(k * k);
        }
  return y;
}

ConvGeometry geom(std::int64_t i, std::int64_t o, std::int64_t k, std::int64_t s, std::int64_t p, std::int64_t g) {
  ConvGeometry r;
  r.in_channels = i, r.out_channels = o, r.kernel = k, r.stride = s, r.padding = p, r.groups = g;
  return r;
}

void add_into(Tensor<double>& acc, const Tensor<double>& y) {
  ASSERT_EQ(acc.sizes(), y.sizes());
  for (std::int64_t j = 0; j < y.numel(); ++j) acc[j] += y[j];
}

template <class Act>
Tensor<double> activate(Tensor<double> t) {
  for (auto& v : t) v = Act{}(v);
  return t;
}

// Which BNs of a DBB are BN-and-pad layers.
template <class Block>
std::vector<BatchNorm2d<double>*> padded_bns(Block& b) {
  std::vector<BatchNorm2d<double>*> r{&test::batch_norm(b, "dbb_1x1_kxk.bn1.bn.")};
  if (b.has_1x1_branch()) r.push_back(&test::batch_norm(b, "dbb_avg.bn.bn."));
  return r;
}

// The names of a block's parameters and of its buffers.
template <class Block>
std::pair<std::vector<std::string>, std::vector<std::string>> names_of(Block& b) {
  std::pair<std::vector<std::string>, std::vector<std::string>> r;
  for (auto& [n, p] : b.named_parameters()) r.first.push_back(n);
  for (auto& [n, p] : b.named_buffers()) r.second.push_back(n);
  return r;
}
// `all` split into the running statistics (buffers) and the rest (parameters).
std::pair<std::vector<std::string>, std::vector<std::string>> split_buffers(const std::vector<std::string>& all) {
  std::pair<std::vector<std::string>, std::vector<std::string>> r;
  for (const auto& n : all) (n.find("running_") == std::string::npos ? r.first : r.second).push_back(n);
  return r;
}

}  // namespace

// ---------------------------------------------------------------------------------- ConvBN

TEST(ConvBN, NamesShapesAndInit) {
  ConvBN<double> b(ConvOptions(6, 8, 3).groups(2).seed(7));
  EXPECT_EQ(names_of(b), split_buffers({"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}));
  const auto& w = b.param("conv.weight").value;
  EXPECT_EQ(w.sizes(), (Shape{8, 3, 3, 3}));
  // PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 3*3*3.
  const double bound = 1 / std::sqrt(27.0);
  double m = 0;
  for (auto v : w) m = std::max(m, std::abs(v));
  EXPECT_LE(m, bound);
  EXPECT_GT(m, 0.8 * bound);
  for (auto v : b.param("bn.weight").value) EXPECT_EQ(v, 1.0);
  for (auto v : b.param("bn.running_var").value) EXPECT_EQ(v, 1.0);
  EXPECT_EQ(test::bn_prefixes(b), std::vector<std::string>{"bn."});
  EXPECT_EQ(max_abs_diff(b.squeeze(), w), 0.0);
  EXPECT_EQ(b.geometry().padding, 1);
  EXPECT_THROW(b.param("conv.bias"), config_error);
  ConvBN<double> same(ConvOptions(6, 8, 3).groups(2).seed(7)), other(ConvOptions(6, 8, 3).groups(2).seed(8));
  EXPECT_EQ(max_abs_diff(same.squeeze(), w), 0.0);
  EXPECT_GT(max_abs_diff(other.squeeze(), w), 0.0);
  // Listed as part of another block: every name under a prefix.
  ConvBN<float> nested(ConvOptions(6, 8, 1));
  EXPECT_EQ(nested.named_parameters("rbr_1x1.")[0].first, "rbr_1x1.conv.weight");
  EXPECT_EQ(nested.named_buffers("rbr_1x1.").back().first, "rbr_1x1.bn.running_var");
}

template <class Act>
void convbn_eval_and_deploy(const ConvOptions& opts, std::int64_t h) {
  ConvBN<double, Act> b(opts);
  Rng rng(3);
  test::randomise(b, rng);
  const auto g = b.geometry();
  auto x = random_tensor<double>({2, g.in_channels, h, h}, rng);
  // Eval = act(BN(conv(x))) with running statistics, written out here.
  const auto y = reference::conv2d(x, b.param("conv.weight").value, g);
  const auto want = activate<Act>(RefBN(b.bn()).eval(y));
  test::expect_close(b.forward_eval(x), want, 1e-12, std::string("ConvBN eval, ") + Act::name);
  test::expect_close(b.deploy().forward(x), want, 1e-12, std::string("ConvBN double deploy, ") + Act::name);
  // float: same parameters, deployed through oneDNN.
  ConvBN<float, Act> f(opts);
  test::copy_tensors(b, f);
  const auto xf = x.template cast<float>();
  test::expect_close(f.deploy().forward(xf), f.forward_eval(xf), 1e-5, std::string("ConvBN float deploy, ") + Act::name);
  test::expect_close(f.forward_eval(xf), want, 1e-5, std::string("ConvBN float eval, ") + Act::name);
}

TEST(ConvBN, EvalEqualsConvPlusBNAndDeploy) {
  convbn_eval_and_deploy<Identity>(ConvOptions(4, 6, 3), 7);
  convbn_eval_and_deploy<ReLU>(ConvOptions(4, 6, 3).groups(2).stride(2), 9);
  convbn_eval_and_deploy<SiLU>(ConvOptions(4, 4, 5).dilation(2).padding(3), 11);
  convbn_eval_and_deploy<SiLU>(ConvOptions(3, 5, 1).stride(2), 6);
  convbn_eval_and_deploy<Identity>(ConvOptions(4, 4, 2).padding(0), 6);  // even kernels are fine for a plain conv
  convbn_eval_and_deploy<Sigmoid>(ConvOptions(4, 6, 1), 5);
}

TEST(ConvBN, TrainForwardBatchStatistics) {
  ConvBN<double, SiLU> b(ConvOptions(4, 6, 3).groups(2).stride(2).seed(1));
  Rng rng(2);
  test::randomise(b, rng);
  auto x = random_tensor<double>({3, 4, 7, 7}, rng);
  RefBN ref(b.bn());
  const auto want = activate<SiLU>(ref.train(reference::conv2d(x, b.param("conv.weight").value, b.geometry())));
  test::expect_close(b.forward_train(x), want, 1e-12, "ConvBN train forward");
  test::expect_close(b.bn().running_mean.value, ref.rm, 1e-14, "running_mean");
  test::expect_close(b.bn().running_var.value, ref.rv, 1e-14, "running_var");
  EXPECT_EQ(b.bn().num_batches_tracked, 1);
}

struct ConvBNGradCase {
  std::int64_t i, o, k, s, g;
  int act;  // 0 identity, 1 relu, 2 silu, 3 sigmoid
};
class ConvBNGradient : public ::testing::TestWithParam<ConvBNGradCase> {};

template <class Act>
void convbn_gradient_check(const ConvBNGradCase& c) {
  ConvBN<double, Act> block(ConvOptions(c.i, c.o, c.k).stride(c.s).groups(c.g).seed(4));
  Rng rng(8);
  test::randomise(block, rng);
  // Running statistics do not change a training forward, so nothing is pinned here.
  test::check_block_gradients(block, random_tensor<double>({2, c.i, 7, 7}, rng), rng);
}

TEST_P(ConvBNGradient, MatchesFiniteDifferences) {
  const auto c = GetParam();
  if (c.act == 0) convbn_gradient_check<Identity>(c);
  if (c.act == 1) convbn_gradient_check<ReLU>(c);
  if (c.act == 2) convbn_gradient_check<SiLU>(c);
  if (c.act == 3) convbn_gradient_check<Sigmoid>(c);
}
INSTANTIATE_TEST_SUITE_P(Configs, ConvBNGradient,
                         ::testing::Values(ConvBNGradCase{4, 4, 3, 1, 1, 0}, ConvBNGradCase{4, 6, 3, 2, 2, 1},
                                           ConvBNGradCase{4, 6, 3, 1, 2, 2}, ConvBNGradCase{2, 4, 1, 2, 1, 2},
                                           ConvBNGradCase{4, 4, 5, 2, 1, 1}, ConvBNGradCase{4, 4, 3, 1, 1, 3}));

// The float (oneDNN) training step agrees with the double (reference) one.
template <class Block32, class Block64>
void float_matches_double(Block32& f, Block64& d, const Shape& xs, const std::string& what) {
  Rng rng(21);
  test::randomise(d, rng);
  test::copy_tensors(d, f);
  const auto x = random_tensor<double>(xs, rng);
  const auto yd = d.forward_train(x);
  const auto gout = random_tensor<double>(yd.sizes(), rng);
  const auto yf = f.forward_train(x.cast<float>());
  test::expect_close(yf, yd, 1e-4, what + " output");
  d.zero_grad();
  f.zero_grad();
  test::expect_close(f.backward(gout.template cast<float>()), d.backward(gout), 1e-3, what + " dx");
  const auto dp = d.named_parameters(), db = d.named_buffers();
  const auto fp = f.named_parameters(), fb = f.named_buffers();
  for (std::size_t j = 0; j < dp.size(); ++j)
    test::expect_close(fp[j].second->grad, dp[j].second->grad, 1e-3, what + " grad " + dp[j].first);
  for (std::size_t j = 0; j < db.size(); ++j)
    test::expect_close(fb[j].second->value, db[j].second->value, 1e-5, what + " buffer " + db[j].first);
}

TEST(ConvBN, FloatTrainingStepMatchesDouble) {
  const auto opts = ConvOptions(4, 8, 3).groups(2).stride(2);
  ConvBN<float, SiLU> f(opts);
  ConvBN<double, SiLU> d(opts);
  float_matches_double(f, d, {2, 4, 9, 9}, "ConvBN");
  EXPECT_EQ(f.primitive_creations(), 1);
  // Sigmoid: oneDNN's logistic forward and backward against the double reference.
  ConvBN<float, Sigmoid> fs(opts);
  ConvBN<double, Sigmoid> ds(opts);
  float_matches_double(fs, ds, {2, 4, 9, 9}, "ConvBN Sigmoid");
}

TEST(ConvBN, BadInputAndConfigurationThrow) {
  EXPECT_THROW(ConvBN<float>(ConvOptions(8, 16, 3).groups(3)), config_error);
  EXPECT_THROW(ConvBN<float>(ConvOptions(8, 16, 3).stride(0)), config_error);
  ConvBN<float> b(ConvOptions(8, 16, 3));
  EXPECT_THROW(b.forward_train(Tensor<float>({2, 4, 8, 8})), shape_error);
  EXPECT_THROW(b.forward_train(Tensor<float>({1, 8, 1, 1})), state_error);
  EXPECT_THROW(b.backward(Tensor<float>({2, 16, 8, 8})), state_error);
  b.forward_train(Tensor<float>({2, 8, 5, 5}, 1.0f));
  EXPECT_THROW(b.backward(Tensor<float>({2, 16, 4, 4})), shape_error);
}

// ------------------------------------------------------------------------------------- DBB

TEST(DBB, NamesShapesAndInitOfBothVariants) {
  DBB<double> narrow(DbbOptions(4, 6, 3).groups(2));
  EXPECT_TRUE(narrow.has_1x1_branch());
  EXPECT_EQ(narrow.internal_channels(), 4);
  auto bn = [](const std::string& p) {
    return std::vector<std::string>{p + "weight", p + "bias", p + "running_mean", p + "running_var"};
  };
  std::vector<std::string> want{"dbb_origin.conv.weight"};
  for (const auto& group : {bn("dbb_origin.bn."), std::vector<std::string>{"dbb_avg.conv.weight"}, bn("dbb_avg.bn.bn."),
                            bn("dbb_avg.avgbn."), std::vector<std::string>{"dbb_1x1.conv.weight"}, bn("dbb_1x1.bn."),
                            std::vector<std::string>{"dbb_1x1_kxk.idconv1.weight"}, bn("dbb_1x1_kxk.bn1.bn."),
                            std::vector<std::string>{"dbb_1x1_kxk.conv2.weight"}, bn("dbb_1x1_kxk.bn2.")})
    want.insert(want.end(), group.begin(), group.end());
  EXPECT_EQ(names_of(narrow), split_buffers(want));
  EXPECT_EQ(narrow.param("dbb_origin.conv.weight").value.sizes(), (Shape{6, 2, 3, 3}));
  EXPECT_EQ(narrow.param("dbb_avg.conv.weight").value.sizes(), (Shape{6, 2, 1, 1}));
  EXPECT_EQ(narrow.param("dbb_1x1.conv.weight").value.sizes(), (Shape{6, 2, 1, 1}));
  EXPECT_EQ(narrow.param("dbb_1x1_kxk.idconv1.weight").value.sizes(), (Shape{4, 2, 1, 1}));
  EXPECT_EQ(narrow.param("dbb_1x1_kxk.bn1.bn.weight").value.sizes(), (Shape{4}));
  EXPECT_EQ(narrow.param("dbb_1x1_kxk.conv2.weight").value.sizes(), (Shape{6, 2, 3, 3}));
  for (auto v : narrow.param("dbb_1x1_kxk.idconv1.weight").value) EXPECT_EQ(v, 0.0);  // reference: zeros
  // PyTorch default conv init bound 1/sqrt(fan_in) for the origin (fan_in 2*3*3).
  for (auto v : narrow.param("dbb_origin.conv.weight").value) EXPECT_LE(std::abs(v), 1 / std::sqrt(18.0));
  EXPECT_EQ(test::bn_prefixes(narrow), (std::vector<std::string>{"dbb_origin.bn.", "dbb_avg.bn.bn.", "dbb_avg.avgbn.", "dbb_1x1.bn.",
                                                   "dbb_1x1_kxk.bn1.bn.", "dbb_1x1_kxk.bn2."}));

  DBB<double> depthwise(DbbOptions(4, 4, 3).groups(4));
  EXPECT_FALSE(depthwise.has_1x1_branch());
  EXPECT_EQ(depthwise.internal_channels(), 8);
  want = {"dbb_origin.conv.weight"};
  for (const auto& group : {bn("dbb_origin.bn."), bn("dbb_avg.avgbn."), std::vector<std::string>{"dbb_1x1_kxk.conv1.weight"},
                            bn("dbb_1x1_kxk.bn1.bn."), std::vector<std::string>{"dbb_1x1_kxk.conv2.weight"},
                            bn("dbb_1x1_kxk.bn2.")})
    want.insert(want.end(), group.begin(), group.end());
  EXPECT_EQ(names_of(depthwise), split_buffers(want));
  EXPECT_EQ(depthwise.param("dbb_1x1_kxk.conv1.weight").value.sizes(), (Shape{8, 1, 1, 1}));
  EXPECT_EQ(depthwise.param("dbb_1x1_kxk.conv2.weight").value.sizes(), (Shape{4, 2, 3, 3}));
  EXPECT_EQ(depthwise.batch_norms().size(), 4u);
  EXPECT_THROW(test::batch_norm(depthwise, "dbb_1x1.bn."), config_error);

  // internal_channels overrides T; T != I gives a plain conv1.
  DBB<float> wide(DbbOptions(4, 6, 3).internal_channels(6));
  EXPECT_EQ(wide.param("dbb_1x1_kxk.conv1.weight").value.sizes(), (Shape{6, 4, 1, 1}));
}

// Expected DBB training forward, written from reference::conv2d and RefBN; `refs` gets the
// reference BNs (with their updated running statistics) in batch_norms() order.
template <class Act>
Tensor<double> dbb_train_by_hand(DBB<double, Act>& b, const Tensor<double>& x, std::vector<RefBN>& refs) {
  const auto g = b.geometry();
  const auto I = g.in_channels, O = g.out_channels, k = g.kernel, s = g.stride, p = g.padding, G = g.groups;
  const auto T = b.internal_channels();
  auto W = [&](const std::string& n) -> const Tensor<double>& { return b.param(n).value; };
  auto ref = [&](const std::string& prefix) { return RefBN(test::batch_norm(b, prefix)); };

  RefBN origin_bn = ref("dbb_origin.bn."), avgbn = ref("dbb_avg.avgbn."), bn1 = ref("dbb_1x1_kxk.bn1.bn."),
        bn2 = ref("dbb_1x1_kxk.bn2.");
  Tensor<double> sum = origin_bn.train(reference::conv2d(x, W("dbb_origin.conv.weight"), g));
  std::vector<RefBN> extra;
  if (b.has_1x1_branch()) {
    RefBN one_bn = ref("dbb_1x1.bn."), pad_bn = ref("dbb_avg.bn.bn.");
    add_into(sum, one_bn.train(reference::conv2d(x, W("dbb_1x1.conv.weight"), geom(I, O, 1, s, 0, G))));
    auto c = pad_bn.train(reference::conv2d(x, W("dbb_avg.conv.weight"), geom(I, O, 1, 1, 0, G)));
    add_into(sum, avgbn.train(avg_pool(pad_with_border(c, p, pad_bn), k, s, 0)));  // border after the update
    extra = {one_bn, pad_bn};
  } else {
    add_into(sum, avgbn.train(avg_pool(x, k, s, p)));
  }
  Tensor<double> c1 = b.has_1x1_branch() ? W("dbb_1x1_kxk.idconv1.weight") : W("dbb_1x1_kxk.conv1.weight");
  if (T == I)
    for (std::int64_t t = 0; t < I; ++t) c1[t * (I / G) + t % (I / G)] += 1.0;  // id[t, t mod Ig] = 1
  auto mid = bn1.train(reference::conv2d(x, c1, geom(I, T, 1, 1, 0, G)));
  auto z = bn2.train(reference::conv2d(pad_with_border(mid, p, bn1), W("dbb_1x1_kxk.conv2.weight"), geom(T, O, k, s, 0, G)));
  add_into(sum, z);
  if (b.has_1x1_branch()) refs = {origin_bn, extra[1], avgbn, extra[0], bn1, bn2};
  else refs = {origin_bn, avgbn, bn1, bn2};
  return sum;
}

// Expected DBB eval forward from the same pieces with running statistics.
template <class Act>
Tensor<double> dbb_eval_by_hand(DBB<double, Act>& b, const Tensor<double>& x) {
  const auto g = b.geometry();
  const auto I = g.in_channels, O = g.out_channels, k = g.kernel, s = g.stride, p = g.padding, G = g.groups;
  const auto T = b.internal_channels();
  auto W = [&](const std::string& n) -> const Tensor<double>& { return b.param(n).value; };
  auto ref = [&](const std::string& prefix) { return RefBN(test::batch_norm(b, prefix)); };
  Tensor<double> sum = ref("dbb_origin.bn.").eval(reference::conv2d(x, W("dbb_origin.conv.weight"), g));
  if (b.has_1x1_branch()) {
    add_into(sum, ref("dbb_1x1.bn.").eval(reference::conv2d(x, W("dbb_1x1.conv.weight"), geom(I, O, 1, s, 0, G))));
    auto pad_bn = ref("dbb_avg.bn.bn.");
    auto c = pad_bn.eval(reference::conv2d(x, W("dbb_avg.conv.weight"), geom(I, O, 1, 1, 0, G)));
    add_into(sum, ref("dbb_avg.avgbn.").eval(avg_pool(pad_with_border(c, p, pad_bn), k, s, 0)));
  } else {
    add_into(sum, ref("dbb_avg.avgbn.").eval(avg_pool(x, k, s, p)));
  }
  Tensor<double> c1 = b.has_1x1_branch() ? W("dbb_1x1_kxk.idconv1.weight") : W("dbb_1x1_kxk.conv1.weight");
  if (T == I)
    for (std::int64_t t = 0; t < I; ++t) c1[t * (I / G) + t % (I / G)] += 1.0;
  auto bn1 = ref("dbb_1x1_kxk.bn1.bn.");
  auto mid = bn1.eval(reference::conv2d(x, c1, geom(I, T, 1, 1, 0, G)));
  add_into(sum, ref("dbb_1x1_kxk.bn2.").eval(
                    reference::conv2d(pad_with_border(mid, p, bn1), W("dbb_1x1_kxk.conv2.weight"), geom(T, O, k, s, 0, G))));
  return sum;
}

template <class Act>
void dbb_train_forward_check(const DbbOptions& opts, std::int64_t h) {
  DBB<double, Act> b(opts);
  Rng rng(2);
  test::randomise(b, rng);
  auto x = random_tensor<double>({2, b.geometry().in_channels, h, h}, rng);
  std::vector<RefBN> refs;
  const auto want = activate<Act>(dbb_train_by_hand(b, x, refs));
  test::expect_close(b.forward_train(x), want, 1e-10, std::string("DBB train forward, ") + Act::name);
  // Every BN's running statistics updated once (n/(n-1) for the variance).
  const auto bns = b.batch_norms();
  const auto prefixes = test::bn_prefixes(b);
  ASSERT_EQ(bns.size(), refs.size());
  for (std::size_t j = 0; j < bns.size(); ++j) {
    test::expect_close(bns[j]->running_mean.value, refs[j].rm, 1e-12, prefixes[j] + "running_mean");
    test::expect_close(bns[j]->running_var.value, refs[j].rv, 1e-12, prefixes[j] + "running_var");
    EXPECT_EQ(bns[j]->num_batches_tracked, 1) << prefixes[j];
  }
  // Eval afterwards: branch by branch with the updated running statistics.
  test::expect_close(b.forward_eval(x), activate<Act>(dbb_eval_by_hand(b, x)), 1e-10, "DBB eval forward");
}

TEST(DBB, TrainForwardMatchesIndependentBranchSum) {
  dbb_train_forward_check<Identity>(DbbOptions(4, 6, 3).groups(2).seed(1), 6);       // g < O, idconv1
  dbb_train_forward_check<SiLU>(DbbOptions(3, 4, 3).stride(2).seed(2), 7);           // g = 1, stride 2
  dbb_train_forward_check<ReLU>(DbbOptions(4, 4, 3).groups(4).stride(2).seed(3), 7); // depthwise, conv1 (2I)
  dbb_train_forward_check<Identity>(DbbOptions(2, 4, 5).seed(4), 6);                 // k = 5
}

struct DbbCase {
  std::int64_t i, o, k, s, g, h;
};
class DbbDeploy : public ::testing::TestWithParam<DbbCase> {};

template <class Act>
void dbb_eval_equals_deploy(const DbbCase& c) {
  const auto opts = DbbOptions(c.i, c.o, c.k).stride(c.s).groups(c.g).seed(5);
  DBB<double, Act> d(opts);
  Rng rng(5);
  test::randomise(d, rng);
  auto x = random_tensor<double>({2, c.i, c.h, c.h}, rng);
  d.forward_train(x);  // running statistics from a real step as well
  const auto eval = d.forward_eval(x);
  test::expect_close(d.deploy().forward(x), eval, 1e-10, std::string("double deploy vs eval, ") + Act::name);
  DBB<float, Act> f(opts);
  test::copy_tensors(d, f);
  const auto xf = x.cast<float>();
  const auto ef = f.forward_eval(xf);
  test::expect_close(ef, eval, 1e-5, "float eval vs double eval");
  test::expect_close(f.deploy().forward(xf), ef, 1e-5, std::string("float deploy vs eval, ") + Act::name);
}

TEST_P(DbbDeploy, EvalEqualsDeployedConv) {
  dbb_eval_equals_deploy<Identity>(GetParam());
  dbb_eval_equals_deploy<SiLU>(GetParam());
}
INSTANTIATE_TEST_SUITE_P(Configs, DbbDeploy,
                         ::testing::Values(DbbCase{4, 6, 3, 1, 1, 8}, DbbCase{4, 6, 3, 2, 1, 9},
                                           DbbCase{4, 6, 3, 1, 2, 8}, DbbCase{4, 8, 5, 2, 2, 11},
                                           DbbCase{4, 6, 5, 1, 1, 9}, DbbCase{4, 4, 3, 1, 4, 8},
                                           DbbCase{4, 4, 3, 2, 4, 9}, DbbCase{4, 4, 5, 1, 4, 8},
                                           DbbCase{6, 6, 5, 2, 6, 10}),
                         [](const auto& info) {
                           const auto& c = info.param;
                           return "i" + std::to_string(c.i) + "o" + std::to_string(c.o) + "k" + std::to_string(c.k) +
                                  "s" + std::to_string(c.s) + "g" + std::to_string(c.g);
                         });

// Finite-difference gradients in double. What is differentiated: the reference (PyTorch
// autograd) treats the BN-and-pad border as a constant: gamma and beta are detached
// there and the running statistics are buffers updated under no_grad. A plain finite
// difference of forward_train does not see that function: with momentum 0.1 the border
// uses running statistics updated from this batch's mean and variance, which depend on
// x and on every weight upstream, and the border also moves with gamma and beta. So the
// loss below is the detached formulation, with the border pinned at its unperturbed
// value: the BN-and-pad BNs get momentum 0 (their running statistics stay what we set),
// and before every evaluation their running_mean is solved from the current gamma and
// beta so that beta - running_mean * gamma / sqrt(running_var + eps) equals the pinned
// border (their gammas are kept away from 0 so the solve is well conditioned). Every BN's
// running statistics are also restored before each evaluation, so every evaluation starts
// from the same state. The interior (batch statistics) is untouched, and an analytic
// gradient that let anything flow from the border would fail this check. That the border
// really uses the updated statistics at momentum 0.1 is checked by
// TrainForwardMatchesIndependentBranchSum.
struct DbbGradCase {
  std::int64_t i, o, k, s, g;
  int act;  // 0 identity, 1 relu, 2 silu
};
class DbbGradient : public ::testing::TestWithParam<DbbGradCase> {};

template <class Act>
void dbb_gradient_check(const DbbGradCase& c) {
  DBB<double, Act> block(DbbOptions(c.i, c.o, c.k).stride(c.s).groups(c.g).seed(4));
  Rng rng(8);
  test::randomise(block, rng);
  const auto padded = padded_bns(block);
  std::vector<Tensor<double>> border;
  for (auto* bn : padded) {
    bn->momentum = 0;
    for (auto& v : bn->weight.value) v = (rng.uniform() < 0.5 ? -1 : 1) * rng.uniform(0.5, 1.0);
    Tensor<double> b0({bn->channels()});
    for (std::int64_t ch = 0; ch < bn->channels(); ++ch)
      b0[ch] = bn->bias.value[ch] -
               bn->running_mean.value[ch] * bn->weight.value[ch] / std::sqrt(bn->running_var.value[ch] + bn->eps);
    border.push_back(b0);
  }
  std::vector<std::pair<Tensor<double>, Tensor<double>>> saved;
  for (auto* bn : block.batch_norms()) saved.emplace_back(bn->running_mean.value, bn->running_var.value);
  auto prepare = [&] {
    const auto bns = block.batch_norms();
    for (std::size_t j = 0; j < bns.size(); ++j) {
      bns[j]->running_mean.value = saved[j].first;
      bns[j]->running_var.value = saved[j].second;
    }
    for (std::size_t j = 0; j < padded.size(); ++j) {
      auto* bn = padded[j];
      for (std::int64_t ch = 0; ch < bn->channels(); ++ch)
        bn->running_mean.value[ch] = (bn->bias.value[ch] - border[j][ch]) *
                                     std::sqrt(bn->running_var.value[ch] + bn->eps) / bn->weight.value[ch];
    }
  };
  test::check_block_gradients(block, random_tensor<double>({2, c.i, 7, 7}, rng), rng, prepare);
}

TEST_P(DbbGradient, MatchesFiniteDifferencesWithDetachedBorder) {
  const auto c = GetParam();
  if (c.act == 0) dbb_gradient_check<Identity>(c);
  if (c.act == 1) dbb_gradient_check<ReLU>(c);
  if (c.act == 2) dbb_gradient_check<SiLU>(c);
}
INSTANTIATE_TEST_SUITE_P(Configs, DbbGradient,
                         ::testing::Values(DbbGradCase{4, 4, 3, 1, 1, 0}, DbbGradCase{4, 6, 3, 2, 2, 2},
                                           DbbGradCase{2, 4, 5, 1, 1, 1}, DbbGradCase{4, 4, 3, 1, 4, 2},
                                           DbbGradCase{4, 4, 3, 2, 4, 0}));

TEST(DBB, FloatTrainingStepMatchesDoubleAndReusesPrimitives) {
  {
    const auto opts = DbbOptions(4, 6, 3).groups(2).stride(2);
    DBB<float, SiLU> f(opts);
    DBB<double, SiLU> d(opts);
    float_matches_double(f, d, {2, 4, 9, 9}, "DBB g=2");
    // One set per stage: origin, 1x1 and conv2 (+ bn2) trunks, avg conv, pool, conv1, and
    // the three NCHW BNs (BN-and-pad twice, avgbn).
    EXPECT_EQ(f.primitive_creations(), 9);
    for (int step = 0; step < 2; ++step) {
      f.forward_train(Tensor<float>({2, 4, 9, 9}, 0.5f));
      f.backward(Tensor<float>({2, 6, 5, 5}, 1.0f));
    }
    EXPECT_EQ(f.primitive_creations(), 9);
  }
  {
    const auto opts = DbbOptions(4, 4, 5).groups(4);
    DBB<float, ReLU> f(opts);
    DBB<double, ReLU> d(opts);
    float_matches_double(f, d, {2, 4, 8, 8}, "DBB depthwise");
    EXPECT_EQ(f.primitive_creations(), 6);  // origin and conv2 trunks, pool, conv1, BN-and-pad, avgbn
  }
}

TEST(DBB, GradientsAccumulateUntilZeroed) {
  DBB<float, ReLU> block(DbbOptions(4, 8, 3));
  Rng rng(1);
  auto x = random_tensor<float>({2, 4, 6, 6}, rng);
  auto g = random_tensor<float>({2, 8, 6, 6}, rng);
  // The BN-and-pad borders follow the running statistics, which each step moves: restore
  // them so that the second step computes exactly the same gradient as the first.
  std::vector<std::pair<Tensor<float>, Tensor<float>>> saved;
  for (auto* bn : block.batch_norms()) saved.emplace_back(bn->running_mean.value, bn->running_var.value);
  block.forward_train(x);
  block.backward(g);
  const auto once = block.param("dbb_1x1_kxk.idconv1.weight").grad;
  for (std::size_t j = 0; j < saved.size(); ++j) {
    block.batch_norms()[j]->running_mean.value = saved[j].first;
    block.batch_norms()[j]->running_var.value = saved[j].second;
  }
  block.forward_train(x);
  block.backward(g);
  const auto& twice = block.param("dbb_1x1_kxk.idconv1.weight").grad;
  for (std::int64_t j = 0; j < once.numel(); ++j) EXPECT_NEAR(twice[j], 2 * once[j], 1e-3 * (1 + std::abs(once[j])));
  block.zero_grad();
  for (auto& [n, p] : block.named_parameters())
    for (auto v : p->grad) EXPECT_EQ(v, 0.0f) << n;
}

TEST(DBB, BadConfigurationThrows) {
  EXPECT_THROW(DBB<float>(DbbOptions(8, 16, 4)), config_error);                // even kernel
  EXPECT_THROW(DBB<float>(DbbOptions(8, 16, 3).padding(0)), config_error);     // padding != k/2
  EXPECT_THROW(DBB<float>(DbbOptions(8, 16, 5).padding(1)), config_error);
  EXPECT_THROW(DBB<float>(DbbOptions(8, 16, 3).groups(3)), config_error);      // groups not dividing
  EXPECT_THROW(DBB<float>(DbbOptions(6, 8, 3).groups(4)), config_error);
  EXPECT_THROW(DBB<float>(DbbOptions(8, 16, 3).dilation(2)), config_error);
  EXPECT_THROW(DBB<float>(DbbOptions(8, 4, 3).groups(4)), config_error);       // g >= O needs I == O
  EXPECT_THROW(DBB<float>(DbbOptions(8, 16, 3).groups(2).internal_channels(5)), config_error);
  try {
    DBB<float>(DbbOptions(8, 16, 3).padding(2));
    FAIL();
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find("padding must be kernel_size / 2 = 1, got 2"), std::string::npos) << e.what();
  }
  DBB<float> b(DbbOptions(4, 4, 3));
  EXPECT_THROW(b.forward_train(Tensor<float>({2, 3, 8, 8})), shape_error);
  EXPECT_THROW(b.forward_train(Tensor<float>({1, 4, 1, 1})), state_error);
  EXPECT_THROW(b.backward(Tensor<float>({2, 4, 8, 8})), state_error);
  EXPECT_THROW(b.param("dbb_reparam.weight"), config_error);
}
