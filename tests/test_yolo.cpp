// Tests of the YOLOv5 modules in include/orepa/nn/yolo.hpp: channel concat / split,
// finite-difference gradient checks (double) of Bottleneck and C3 built from OREPA
// blocks, deploy == eval (float) for C3 built from every block type, inside a Sequential
// too, and the configuration errors.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "orepa/nn/layers.hpp"
#include "orepa/nn/sequential.hpp"
#include "orepa/nn/yolo.hpp"
#include "test_util.hpp"

using namespace orepa;
using orepa::test::check_grad;
using orepa::test::expect_close;
using orepa::test::random_tensor;
using orepa::test::randomise;

namespace {

/// Checks dL/dx and every trainable tensor's gradient of `module` against central
/// differences for L = sum(forward_train(x) * r) (BN uses batch statistics, so L is a
/// deterministic function of x and the parameters).
template <class Module>
void gradient_check(Module& module, const Shape& x_shape, std::uint64_t seed, const std::string& what) {
  Rng rng(seed);
  randomise(module, rng);  // every tensor non-trivial (e.g. OREPA's zero-initialised ones)
  Tensor<double> x = random_tensor<double>(x_shape, rng);
  const Shape y_shape = module.forward_train(x).sizes();
  const Tensor<double> r = random_tensor<double>(y_shape, rng);
  auto loss = [&]() {
    const Tensor<double>& y = module.forward_train(x);
    double l = 0;
    for (std::int64_t j = 0; j < y.numel(); ++j) l += y[j] * r[j];
    return l;
  };

  module.zero_grad();
  module.forward_train(x);
  const Tensor<double> dx = module.backward(r);  // copy: the buffer is the module's
  ASSERT_EQ(dx.sizes(), x.sizes()) << what;
  check_grad(x, dx, loss, what + " input", 1e-5, 16);

  std::int64_t checked = 0;
  for (auto& [name, p] : module.named_parameters()) {
    const Tensor<double> analytic = p->grad;  // the numeric loss never runs backward, but be safe
    check_grad(p->value, analytic, loss, what + " " + name, 1e-5, 6);
    ++checked;
  }
  EXPECT_GT(checked, 0) << what;
}

/// max |eval - deploy| of a randomised module in float, after a few training forwards
/// (so the running statistics are not the initial ones).
template <class Module>
void eval_equals_deploy(Module& module, const Shape& x_shape, std::uint64_t seed, const std::string& what) {
  Rng rng(seed);
  randomise(module, rng);
  for (int i = 0; i < 3; ++i) module.forward_train(random_tensor<float>(x_shape, rng));
  const Tensor<float> x = random_tensor<float>(x_shape, rng);
  const Tensor<float> eval = module.forward_eval(x);
  const auto deployed = module.deploy();
  expect_close(deployed.forward(x), eval, 1e-4, what + ": deploy vs eval");
  // Deploying is a snapshot: another training forward changes the running statistics of
  // the module but not the deployed object.
  const Tensor<float> before = deployed.forward(x);
  module.forward_train(random_tensor<float>(x_shape, rng));
  EXPECT_EQ(max_abs_diff(deployed.forward(x), before), 0.0) << what;
}

}  // namespace

TEST(Yolo, ConcatAndSplitChannelsRoundTripInBothLayouts) {
  Rng rng(1);
  const Tensor<float> a = random_tensor<float>({2, 3, 4, 5}, rng), b = random_tensor<float>({2, 2, 4, 5}, rng),
                      c = random_tensor<float>({2, 4, 4, 5}, rng);
  for (auto f : {MemoryFormat::contiguous, MemoryFormat::channels_last}) {
    const std::string what = f == MemoryFormat::contiguous ? "NCHW" : "NHWC";
    Tensor<float> cat;
    concat_channels<float>({a.to(f), b.to(f), c.to(f)}, cat);
    ASSERT_EQ(cat.sizes(), (Shape{2, 9, 4, 5})) << what;
    EXPECT_EQ(cat.memory_format(), f) << what;
    for (std::int64_t n = 0; n < 2; ++n)
      for (std::int64_t ch = 0; ch < 9; ++ch)
        for (std::int64_t h = 0; h < 4; ++h)
          for (std::int64_t w = 0; w < 5; ++w)
            EXPECT_EQ(cat(n, ch, h, w), ch < 3 ? a(n, ch, h, w) : ch < 5 ? b(n, ch - 3, h, w) : c(n, ch - 5, h, w))
                << what << " at " << n << ", " << ch << ", " << h << ", " << w;
    std::vector<Tensor<float>> parts;
    split_channels<float>(cat, {3, 2, 4}, parts);
    ASSERT_EQ(parts.size(), 3u);
    EXPECT_EQ(parts[0].memory_format(), f) << what;
    EXPECT_EQ(max_abs_diff(parts[0], a), 0.0) << what;
    EXPECT_EQ(max_abs_diff(parts[1], b), 0.0) << what;
    EXPECT_EQ(max_abs_diff(parts[2], c), 0.0) << what;
  }
  Tensor<float> mixed;  // one NCHW input: the result is NCHW
  concat_channels(a.to(MemoryFormat::channels_last), b, mixed);
  EXPECT_TRUE(mixed.is_contiguous());
  EXPECT_EQ(mixed(1, 4, 3, 2), b(1, 1, 3, 2));
  std::vector<Tensor<float>> parts;
  EXPECT_THROW(concat_channels(a, Tensor<float>({2, 2, 4, 4}), mixed), shape_error);
  EXPECT_THROW(split_channels<float>(mixed, {3, 3}, parts), shape_error);
  EXPECT_THROW(split_channels<float>(mixed, {0, 5}, parts), shape_error);
}

TEST(Yolo, BottleneckGradientsMatchFiniteDifferences) {
  // With the residual (c1 == c2): cv1 is OREPA_1x1, cv2 an OREPA 3x3 block.
  Bottleneck<double> with(4, 4, true, 0.5, /*seed=*/3, orepa_maker<double>());
  ASSERT_TRUE(with.has_residual());
  EXPECT_EQ(with.cv1().type_name(), "OREPA_1x1");
  EXPECT_EQ(with.cv2().type_name(), "OREPA");
  gradient_check(with, {2, 4, 5, 5}, 11, "Bottleneck(4, 4, shortcut)");
  // Without (c1 != c2).
  Bottleneck<double> without(3, 4, true, 0.5, /*seed=*/4, orepa_maker<double>());
  ASSERT_FALSE(without.has_residual());
  gradient_check(without, {2, 3, 5, 5}, 12, "Bottleneck(3, 4)");
}

TEST(Yolo, C3GradientsMatchFiniteDifferences) {
  C3<double> c3(4, 4, /*n=*/2, true, 0.5, /*seed=*/5, orepa_maker<double>());
  EXPECT_EQ(c3.m().size(), 2u);
  EXPECT_TRUE(c3.m()[0].has_residual());
  gradient_check(c3, {2, 4, 4, 4}, 13, "C3(4, 4, n=2)");
  C3<double> narrow(3, 4, /*n=*/1, false, 0.5, /*seed=*/6, orepa_maker<double>());
  EXPECT_FALSE(narrow.m()[0].has_residual());
  gradient_check(narrow, {2, 3, 4, 4}, 14, "C3(3, 4, no shortcut)");
}

TEST(Yolo, C3NamedParametersFollowYoloV5Paths) {
  C3<double> c3(4, 8, /*n=*/2, true, 0.5, 0, orepa_maker<double>());
  std::vector<std::string> names;
  for (auto& [name, p] : c3.named_parameters("model.2.")) names.push_back(name);
  EXPECT_EQ(c3.parameters().size(), names.size());
  auto has_prefix = [&](const std::string& prefix) {
    for (const auto& n : names)
      if (n.rfind(prefix, 0) == 0) return true;
    return false;
  };
  for (const char* p : {"model.2.cv1.", "model.2.cv2.", "model.2.cv3.", "model.2.m.0.cv1.", "model.2.m.1.cv2."})
    EXPECT_TRUE(has_prefix(p)) << p;
}

TEST(Yolo, C3DeployEqualsEvalOrepa) {
  C3<float> c3(8, 16, /*n=*/2, true, 0.5, /*seed=*/7, orepa_maker<float>());
  eval_equals_deploy(c3, {4, 8, 9, 9}, 21, "C3 OREPA");
}

TEST(Yolo, C3DeployEqualsEvalDbb) {
  C3<float> c3(8, 8, /*n=*/1, true, 0.5, /*seed=*/8, dbb_maker<float>());
  EXPECT_EQ(c3.m()[0].cv2().type_name(), "DBB");
  EXPECT_EQ(c3.cv1().type_name(), "ConvBN");
  eval_equals_deploy(c3, {4, 8, 7, 7}, 22, "C3 DBB");
}

namespace {
// A maker of `Block` wherever its kernel rule allows (OREPA_1x1: 1x1 only; RepVGG and
// OREPA_LargeConv: 3x3), ConvBN elsewhere.
template <template <class, class> class Block>
BlockMaker<float> maker_where_it_fits() {
  return [](const ConvOptions& opts) -> AnyBlock<float> {
    using B = Block<float, SiLU>;
    try {
      return B(typename B::Options(opts));
    } catch (const config_error&) {
      return ConvBN<float, SiLU>(opts);
    }
  };
}

// One C3 of `Block`: a training step (SGD), then deployed vs eval.
template <template <class, class> class Block>
void c3_of(const std::string& type) {
  C3<float> c3(8, 8, /*n=*/1, true, 0.5, /*seed=*/11, maker_where_it_fits<Block>());
  int blocks = 0;
  for (auto* b : {&c3.cv1(), &c3.cv2(), &c3.cv3(), &c3.m()[0].cv1(), &c3.m()[0].cv2()})
    blocks += b->type_name() == type;
  EXPECT_GT(blocks, 0) << "a C3 of " << type << " holds one";
  Rng rng(12);
  const auto x = random_tensor<float>({4, 8, 7, 7}, rng);
  c3.zero_grad();
  c3.backward(random_tensor<float>(c3.forward_train(x).sizes(), rng));
  for (auto* p : c3.parameters())
    for (std::int64_t j = 0; j < p->value.numel(); ++j) p->value[j] -= 0.05f * p->grad[j];
  const Tensor<float> eval = c3.forward_eval(x);
  expect_close(c3.deploy().forward(x), eval, 1e-4, "C3 of " + type + ": deploy vs eval");
}
}  // namespace

TEST(Yolo, C3OfEveryBlockTypeTrainsAndDeploys) {
  c3_of<OREPA>("OREPA");
  c3_of<OREPA_1x1>("OREPA_1x1");
  c3_of<OREPA_LargeConv>("OREPA_LargeConv");
  c3_of<RepVGGBlock_OREPA>("RepVGGBlock_OREPA");
  c3_of<ConvBN>("ConvBN");
  c3_of<DBB>("DBB");
}

TEST(Yolo, ModulesDeployInsideSequential) {
  Sequential<float> net;
  net.add(orepa_maker<float>()(ConvOptions(3, 8, 3).stride(2).seed(1)));
  net.add(C3<float>(8, 8, 1, true, 0.5, 2));
  net.add(Bottleneck<float>(8, 8, true, 0.5, 3));
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(8, 4, 4));
  Rng rng(31);
  for (int i = 0; i < 2; ++i) {
    const Tensor<float> x = random_tensor<float>({4, 3, 12, 12}, rng);
    net.zero_grad();
    net.backward(Tensor<float>(net.forward_train(x).sizes(), 0.1f));
  }
  const auto chain = net.deploy();
  ASSERT_EQ(chain.size(), 5u);
  EXPECT_NE(chain.stage(0).target<DeployedConv<float>>(), nullptr);
  EXPECT_NE(chain.stage(1).target<DeployedC3<float>>(), nullptr);
  EXPECT_NE(chain.stage(2).target<DeployedBottleneck<float>>(), nullptr);
  const Tensor<float> x = random_tensor<float>({4, 3, 12, 12}, rng);
  expect_close(chain.forward(x), net.forward_eval(x), 1e-4, "Sequential of YOLO modules");
  EXPECT_GT(net.get<C3<float>>(1).deploy().num_parameters(), 0);
}

// A channels-last input through the deployed chain of YOLO modules gives the NCHW
// numbers and comes back channels-last; a user stage without a preferred_format() gets NCHW.
TEST(Yolo, InferenceChainTakesChannelsLastInput) {
  Sequential<float> net;
  net.add(orepa_maker<float>()(ConvOptions(3, 8, 3).stride(2).seed(1)));
  net.add(C3<float>(8, 8, 1, true, 0.5, 2));
  net.add(Bottleneck<float>(8, 8, true, 0.5, 3));
  Rng rng(32);
  net.forward_train(random_tensor<float>({4, 3, 12, 12}, rng));
  const auto chain = net.deploy();
  const auto x = random_tensor<float>({2, 3, 12, 12}, rng);
  const Tensor<float> want = net.forward_eval(x);
  const Tensor<float> y = chain.forward(x.to(MemoryFormat::channels_last));
  EXPECT_EQ(y.memory_format(), MemoryFormat::channels_last);
  expect_close(y, want, 1e-4, "chain on NHWC");
  expect_close(chain.forward(x), want, 1e-4, "chain on NCHW");
  EXPECT_TRUE(chain.forward(x).is_contiguous());

  struct NchwOnly {  // reads the flat storage as NCHW: must be given NCHW
    Tensor<float> forward(ConstTensorView<float> v) const {
      EXPECT_TRUE(v.is_contiguous());
      return Tensor<float>(v.sizes(), std::vector<float>(v.begin(), v.end()));
    }
  };
  InferenceChain<float> with_user;
  with_user.add(chain);
  with_user.add(NchwOnly{});
  expect_close(with_user.forward(x.to(MemoryFormat::channels_last)), want, 1e-4, "chain then an NCHW-only stage");
}

TEST(Yolo, BadConfigurationThrows) {
  using B = Bottleneck<float>;
  using C = C3<float>;
  EXPECT_THROW(B(4, 1, true, 0.5), config_error);  // int(1 * 0.5) = 0 hidden channels
  EXPECT_THROW(B(0, 4), config_error);
  EXPECT_THROW(C(4, 4, 0), config_error);
  EXPECT_THROW(C(4, 1), config_error);
  C c3(4, 4);
  EXPECT_THROW(c3.backward(Tensor<float>({1, 4, 3, 3})), state_error);  // no forward_train yet
  EXPECT_THROW(c3.forward_train(Tensor<float>({2, 3, 5, 5})), shape_error);  // wrong channel count
}
