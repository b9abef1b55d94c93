// Tests of the training pieces in include/orepa/nn: finite-difference gradient checks of
// the layers and of a small Sequential, optimizer steps against an independent
// re-computation of PyTorch's formulas, schedules against their closed forms, and the
// shape / configuration errors.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "orepa/blocks/orepa.hpp"
#include "orepa/nn/layers.hpp"
#include "orepa/nn/optim.hpp"
#include "orepa/nn/schedule.hpp"
#include "orepa/nn/sequential.hpp"
#include "orepa/nn/synthetic.hpp"

#include "test_util.hpp"

using namespace orepa;
using orepa::test::contains;
using orepa::test::message_of;

namespace {

Tensor<double> random_tensor_nn(const Shape& shape, Rng& rng, double bound = 1.0) {
  Tensor<double> t(shape);
  fill_uniform(t, bound, rng);
  return t;
}

/// Central differences of `loss` w.r.t. every element of `t` (h = 1e-6).
Tensor<double> numeric_gradient(Tensor<double>& t, const std::function<double()>& loss, double h = 1e-6) {
  Tensor<double> g(t.sizes());
  for (std::int64_t j = 0; j < t.numel(); ++j) {
    const double keep = t[j];
    t[j] = keep + h;
    const double up = loss();
    t[j] = keep - h;
    const double down = loss();
    t[j] = keep;
    g[j] = (up - down) / (2 * h);
  }
  return g;
}

/// ||a - n|| / max(||a||, ||n||): the whole-tensor relative error of a gradient.
double relative_error(const Tensor<double>& a, const Tensor<double>& n) {
  EXPECT_EQ(a.sizes(), n.sizes());
  double d = 0, na = 0, nn = 0;
  for (std::int64_t j = 0; j < a.numel(); ++j) {
    d += (a[j] - n[j]) * (a[j] - n[j]);
    na += a[j] * a[j];
    nn += n[j] * n[j];
  }
  const double den = std::max(std::sqrt(std::max(na, nn)), 1e-300);
  return std::sqrt(d) / den;
}

/// sum(w .* y): a loss whose gradient w.r.t. y is `w`.
double weighted_sum(const Tensor<double>& y, const Tensor<double>& w) {
  double s = 0;
  for (std::int64_t j = 0; j < y.numel(); ++j) s += y[j] * w[j];
  return s;
}

constexpr double kGradTol = 1e-6;

}  // namespace

// ---------------------------------------------------------------------------------------
// Gradient checks (double)

TEST(NnGrad, GlobalAvgPool) {
  Rng rng(1);
  Tensor<double> x = random_tensor_nn({2, 3, 4, 5}, rng), w = random_tensor_nn({2, 3}, rng);
  GlobalAvgPool<double> pool;
  const auto& y = pool.forward_train(x);
  ASSERT_EQ(y.sizes(), Shape({2, 3}));
  double mean = 0;
  for (std::int64_t j = 0; j < 20; ++j) mean += x[20 + j];  // plane (0, 1)
  EXPECT_NEAR(y(0, 1), mean / 20, 1e-15);
  const Tensor<double> dx = pool.backward(w);
  auto loss = [&] { return weighted_sum(pool.forward_eval(x), w); };
  EXPECT_LT(relative_error(dx, numeric_gradient(x, loss)), kGradTol);
}

TEST(NnGrad, LinearInputWeightBias) {
  Rng rng(2);
  Linear<double> lin(5, 3, 7);
  Tensor<double> x = random_tensor_nn({4, 5}, rng), w = random_tensor_nn({4, 3}, rng);
  lin.zero_grad();
  lin.forward_train(x);
  const Tensor<double> dx = lin.backward(w);
  auto loss = [&] { return weighted_sum(lin.forward_eval(x), w); };
  EXPECT_LT(relative_error(dx, numeric_gradient(x, loss)), kGradTol) << "input";
  EXPECT_LT(relative_error(lin.weight().grad, numeric_gradient(lin.weight().value, loss)), kGradTol) << "weight";
  EXPECT_LT(relative_error(lin.bias().grad, numeric_gradient(lin.bias().value, loss)), kGradTol) << "bias";
  // Gradients accumulate until zeroed (PyTorch semantics).
  const Tensor<double> once = lin.weight().grad;
  lin.forward_train(x);
  lin.backward(w);
  for (std::int64_t j = 0; j < once.numel(); ++j) EXPECT_NEAR(lin.weight().grad[j], 2 * once[j], 1e-14);
  lin.zero_grad();
  for (auto v : lin.bias().grad) EXPECT_EQ(v, 0.0);
}

TEST(NnGrad, LinearInitialisationLikeTorch) {
  Linear<float> lin(64, 10, 3);
  const double bound = 1.0 / 8.0;
  for (auto v : lin.weight().value) EXPECT_LE(std::abs(v), bound);
  for (auto v : lin.bias().value) EXPECT_LE(std::abs(v), bound);
  EXPECT_EQ(lin.weight().value.sizes(), Shape({10, 64}));
  EXPECT_EQ(&lin.param("weight"), &lin.weight());
  EXPECT_EQ(lin.weight().kind, ParamKind::kernel);
  EXPECT_EQ(&lin.param("bias"), &lin.bias());
  EXPECT_EQ(lin.bias().kind, ParamKind::bias);
  Linear<float> same(64, 10, 3), other(64, 10, 4);
  EXPECT_EQ(max_abs_diff(lin.weight().value, same.weight().value), 0.0);
  EXPECT_GT(max_abs_diff(lin.weight().value, other.weight().value), 0.0);
}

TEST(Nn, ArgmaxRowsAndAccuracy) {
  const Tensor<float> logits({3, 2}, std::vector<float>{1, 2, 3, 0, 0, 0.5f});
  EXPECT_EQ(argmax_rows(logits), (std::vector<int>{1, 0, 1}));
  EXPECT_DOUBLE_EQ(accuracy(logits, {1, 0, 0}), 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(accuracy(logits, argmax_rows(logits)), 1.0);
  EXPECT_THROW(accuracy(logits, {1, 0}), shape_error);
}

TEST(NnGrad, SoftmaxCrossEntropyLogits) {
  Rng rng(3);
  Tensor<double> z = random_tensor_nn({5, 4}, rng, 3.0);
  const std::vector<int> labels{0, 3, 1, 1, 2};
  SoftmaxCrossEntropy<double> ce;
  const double loss = ce.forward_train(z, labels);
  // Direct formula (small logits: no stabilisation needed here).
  double expect = 0;
  for (int n = 0; n < 5; ++n) {
    double s = 0;
    for (int c = 0; c < 4; ++c) s += std::exp(z(n, c));
    expect += std::log(s) - z(n, labels[std::size_t(n)]);
  }
  EXPECT_NEAR(loss, expect / 5, 1e-14);
  const Tensor<double> dz = ce.backward();
  auto f = [&] { return ce.forward_eval(z, labels); };
  EXPECT_LT(relative_error(dz, numeric_gradient(z, f)), kGradTol);
  // grad_loss scales the gradient.
  const Tensor<double> dz2 = ce.backward(2.5);
  for (std::int64_t j = 0; j < dz.numel(); ++j) EXPECT_NEAR(dz2[j], 2.5 * dz[j], 1e-15);
}

TEST(NnGrad, SoftmaxCrossEntropyIsStableForHugeLogits) {
  Tensor<float> z({2, 3}, std::vector<float>{1000.f, 999.f, -1000.f, -5000.f, 3000.f, 2990.f});
  Tensor<float> shifted({2, 3}, std::vector<float>{1.f, 0.f, -2000.f, -8000.f, 10.f, 0.f});
  SoftmaxCrossEntropy<float> ce;
  const float a = ce.forward_train(z, {1, 2});
  const float b = ce.forward_eval(shifted, {1, 2});
  EXPECT_TRUE(std::isfinite(a));
  EXPECT_NEAR(a, b, 1e-5);
  const auto& g = ce.backward();
  for (auto v : g) EXPECT_TRUE(std::isfinite(v));
  EXPECT_NEAR(ce.probabilities()(1, 1), 1.0f, 1e-4f);
}

TEST(NnGrad, SequentialOrepaPoolLinearLoss) {
  Rng rng(4);
  Sequential<double> net;
  auto& block = net.add(OREPA<double, SiLU>(OrepaOptions(2, 4, 3).seed(5)));
  net.add(GlobalAvgPool<double>());
  net.add(Linear<double>(4, 3, 6));
  // Randomise every trainable tensor so zero-initialised ones (idconv1, the prior's
  // scale row) take part in the check.
  for (auto* p : block.parameters()) fill_uniform(p->value, 0.5, rng);
  Tensor<double> x = random_tensor_nn({3, 2, 5, 5}, rng);
  const std::vector<int> labels{2, 0, 1};
  SoftmaxCrossEntropy<double> ce;

  net.zero_grad();
  ce.forward_train(net.forward_train(x), labels);
  const Tensor<double> dx = net.backward(ce.backward());
  // The training forward (batch statistics) is the function being differentiated.
  auto loss = [&] { return ce.forward_eval(net.forward_train(x), labels); };

  EXPECT_LT(relative_error(dx, numeric_gradient(x, loss)), kGradTol) << "input";
  for (const char* name : {"0.weight_orepa_origin", "0.weight_orepa_1x1_kxk_idconv1", "0.weight_orepa_gconv_dw",
                           "0.vector", "0.bn.weight", "0.bn.bias", "2.weight", "2.bias"}) {
    Param<double>& p = net.param(name);
    const Tensor<double> analytic = p.grad;
    EXPECT_LT(relative_error(analytic, numeric_gradient(p.value, loss)), kGradTol) << name;
  }
}

// ---------------------------------------------------------------------------------------
// Sequential structure and deployment

// The layer concept Sequential relies on (blocks/block.hpp).
static_assert(is_layer<OREPA<float, ReLU>, float>::value);
static_assert(is_layer<GlobalAvgPool<float>, float>::value && is_layer<Linear<float>, float>::value);
static_assert(is_layer<Sequential<float>, float>::value && is_layer<AnyBlock<float>, float>::value);
static_assert(!is_layer<Linear<float>, double>::value && !is_layer<int, float>::value);
static_assert(!is_layer<SoftmaxCrossEntropy<float>, float>::value);  // needs labels: not a chain layer
static_assert(!is_block<Linear<float>, float>::value && !is_block<Sequential<float>, float>::value);

TEST(NnSequential, NamesGetAndDeploy) {
  Rng rng(8);
  Sequential<double> net;
  net.add(OREPA<double, ReLU>(OrepaOptions(2, 4, 3).seed(1)));
  net.add(OREPA<double, SiLU>(OrepaOptions(4, 6, 3).stride(2).seed(2)));
  net.add(GlobalAvgPool<double>());
  net.add(Linear<double>(6, 3, 3));
  ASSERT_EQ(net.size(), 4u);

  auto named = net.named_parameters();
  EXPECT_EQ(named.front().first, "0.weight_orepa_origin");
  EXPECT_EQ(named.back().first, "3.bias");
  EXPECT_EQ(named.size(), net.parameters().size());
  EXPECT_EQ(net.named_buffers().front().first, "0.weight_orepa_avg_avg");
  using Block1 = OREPA<double, SiLU>;
  EXPECT_EQ(&net.param("1.vector"), &net.get<Block1>(1).scales());
  EXPECT_EQ(&net.param("3.weight"), &net.get<Linear<double>>(3).weight());
  EXPECT_TRUE(contains(message_of<config_error>([&] { net.param("9.weight"); }), "9.weight"));
  EXPECT_TRUE(contains(message_of<config_error>([&] { net.get<Linear<double>>(2); }), "layer 2"));
  EXPECT_TRUE(contains(message_of<config_error>([&] { net.get<Linear<double>>(7); }), "out of range"));

  // A few training steps so BN's running statistics are not the identity.
  for (int i = 0; i < 3; ++i) net.forward_train(random_tensor_nn({4, 2, 8, 8}, rng));
  Tensor<double> x = random_tensor_nn({3, 2, 8, 8}, rng);
  const Tensor<double> eval = net.forward_eval(x);
  InferenceChain<double> chain = net.deploy();
  ASSERT_EQ(chain.size(), 4u);
  EXPECT_NE(chain.stage(0).target<DeployedConv<double>>(), nullptr);  // blocks deploy to one conv
  EXPECT_NE(chain.stage(1).target<DeployedConv<double>>(), nullptr);
  EXPECT_EQ(chain.stage(3).target<DeployedConv<double>>(), nullptr);
  EXPECT_LE(max_abs_diff(chain.forward(x), eval), 1e-12);

  // The chain is a snapshot: later changes to the network do not reach it.
  net.get<Linear<double>>(3).bias().value.fill(5.0);
  EXPECT_LE(max_abs_diff(chain.forward(x), eval), 1e-12);
  EXPECT_GT(max_abs_diff(net.forward_eval(x), eval), 1.0);
}

TEST(NnSequential, NestedChainsAndErrors) {
  Sequential<double> inner;
  inner.add(GlobalAvgPool<double>());
  inner.add(Linear<double>(3, 2, 1));
  Sequential<double> outer;
  outer.add(OREPA<double>(OrepaOptions(1, 3, 3)));
  outer.add(std::move(inner));
  EXPECT_EQ(outer.named_parameters().back().first, "1.1.bias");  // names compose, as in PyTorch
  Rng rng(9);
  Tensor<double> x = random_tensor_nn({2, 1, 6, 6}, rng);
  EXPECT_EQ(outer.forward_train(x).sizes(), Shape({2, 2}));
  auto chain = outer.deploy();
  EXPECT_NE(chain.stage(1).target<InferenceChain<double>>(), nullptr);  // a Sequential deploys too
  EXPECT_LE(max_abs_diff(chain.forward(x), outer.forward_eval(x)), 1e-12);

  Sequential<float> empty;
  EXPECT_TRUE(contains(message_of<state_error>([&] { empty.forward_train(Tensor<float>({1, 1})); }), "no layers"));
}

// ---------------------------------------------------------------------------------------
// Shape and configuration errors name the tensor

TEST(NnErrors, ShapeErrorsNameTheTensor) {
  GlobalAvgPool<float> pool;
  auto m = message_of<shape_error>([&] { pool.forward_train(Tensor<float>({2, 3, 4})); });
  EXPECT_TRUE(contains(m, "GlobalAvgPool::forward_train input")) << m;
  EXPECT_TRUE(contains(m, "[2, 3, 4]")) << m;
  EXPECT_TRUE(contains(message_of<state_error>([&] { pool.backward(Tensor<float>({2, 3})); }), "forward_train"));
  pool.forward_train(Tensor<float>({2, 3, 4, 4}));
  m = message_of<shape_error>([&] { pool.backward(Tensor<float>({2, 4})); });
  EXPECT_TRUE(contains(m, "GlobalAvgPool::backward grad_output")) << m;
  EXPECT_TRUE(contains(m, "[2, 3]") && contains(m, "[2, 4]")) << m;

  Linear<float> lin(8, 4);
  m = message_of<shape_error>([&] { lin.forward_eval(Tensor<float>({2, 7})); });
  EXPECT_TRUE(contains(m, "Linear::forward_eval input") && contains(m, "[N, 8]") && contains(m, "[2, 7]")) << m;
  m = message_of<shape_error>([&] { lin.forward_train(Tensor<float>({2, 8, 1, 1})); });
  EXPECT_TRUE(contains(m, "Linear::forward_train input") && contains(m, "[2, 8, 1, 1]")) << m;
  lin.forward_train(Tensor<float>({2, 8}));
  m = message_of<shape_error>([&] { lin.backward(Tensor<float>({2, 5})); });
  EXPECT_TRUE(contains(m, "Linear::backward grad_output") && contains(m, "[2, 4]")) << m;
  EXPECT_THROW(Linear<float>(0, 3), config_error);

  SoftmaxCrossEntropy<float> ce;
  m = message_of<shape_error>([&] { ce.forward_train(Tensor<float>({3, 4}), {0, 1}); });
  EXPECT_TRUE(contains(m, "labels") && contains(m, "expected 3") && contains(m, "got 2")) << m;
  m = message_of<shape_error>([&] { ce.forward_eval(Tensor<float>({3, 4, 1}), {0, 1, 2}); });
  EXPECT_TRUE(contains(m, "logits") && contains(m, "[3, 4, 1]")) << m;
  m = message_of<config_error>([&] { ce.forward_train(Tensor<float>({3, 4}), {0, 4, 1}); });
  EXPECT_TRUE(contains(m, "label 4 at index 1") && contains(m, "[0, 4)")) << m;
  EXPECT_THROW(ce.forward_train(Tensor<float>({1, 4}), {-1}), config_error);
  EXPECT_THROW(SoftmaxCrossEntropy<float>().backward(), state_error);

  Sequential<float> net;
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(3, 2));
  m = message_of<shape_error>([&] { net.forward_eval(Tensor<float>({1, 5, 4, 4})); });  // names the layer (error_path.hpp)
  EXPECT_TRUE(contains(m, "Sequential[1] (Linear): forward_eval input") && contains(m, "[1, 5]")) << m;
}

// ---------------------------------------------------------------------------------------
// Optimizers vs an independent re-computation of PyTorch's formulas

namespace {

/// Quadratic loss 0.5 * sum a_j (p_j - c_j)^2 on two parameters plus a buffer; the
/// gradient a (p - c) is written by hand before every step.
struct Quadratic {
  Param<double> w{Tensor<double>({3}, std::vector<double>{1.0, -2.0, 0.5}), ParamKind::kernel};
  Param<double> b{Tensor<double>({2}, std::vector<double>{0.3, -0.7}), ParamKind::bias};
  Param<double> s{Tensor<double>({2}, std::vector<double>{1.5, 0.25}), ParamKind::scale};
  Param<double> buf{Tensor<double>({2}, std::vector<double>{4.0, 5.0}), ParamKind::buffer};
  static constexpr double a[3] = {1.0, 3.0, 0.5}, c[3] = {0.2, 1.0, -1.0};

  ParamList<double> params() { return {&w, &b, &s, &buf}; }
  void set_grads() {
    for (auto* p : {&w, &b, &s}) {
      p->zero_grad();
      for (std::int64_t j = 0; j < p->value.numel(); ++j) p->grad[j] = a[j] * (p->value[j] - c[j]);
    }
  }
};

/// PyTorch SGD for one scalar over `steps` steps of the quadratic (element j).
double torch_sgd(double p, int j, int steps, double lr, double momentum, double dampening, double wd, bool nesterov) {
  double buf = 0;
  for (int t = 0; t < steps; ++t) {
    double d = Quadratic::a[j] * (p - Quadratic::c[j]);
    if (wd != 0) d = d + wd * p;
    if (momentum != 0) {
      buf = t == 0 ? d : momentum * buf + (1 - dampening) * d;
      d = nesterov ? d + momentum * buf : buf;
    }
    p = p - lr * d;
  }
  return p;
}

/// PyTorch AdamW for one scalar over `steps` steps of the quadratic (element j).
double torch_adamw(double p, int j, int steps, double lr, double b1, double b2, double eps, double wd) {
  double m = 0, v = 0;
  for (int t = 1; t <= steps; ++t) {
    const double g = Quadratic::a[j] * (p - Quadratic::c[j]);
    p = p * (1 - lr * wd);
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    const double mhat = m / (1 - std::pow(b1, t)), vhat = v / (1 - std::pow(b2, t));
    p = p - lr * mhat / (std::sqrt(vhat) + eps);
  }
  return p;
}

template <class Opt>
void run_steps(Quadratic& q, Opt& opt, int steps) {
  for (int t = 0; t < steps; ++t) {
    opt.zero_grad();
    q.set_grads();
    opt.step();
  }
}

}  // namespace

TEST(NnOptim, SgdMomentumWithSplitDecay) {
  Quadratic q;
  const Quadratic init;
  SGD<double> opt(split_decay(q.params(), 0.1, 0.0), SGDOptions(0.05).momentum(0.9));
  ASSERT_EQ(opt.groups().size(), 2u);
  EXPECT_EQ(opt.groups()[0].params.size(), 1u);  // w
  EXPECT_EQ(opt.groups()[1].params.size(), 2u);  // b, s (buffer dropped)
  run_steps(q, opt, 3);
  for (int j = 0; j < 3; ++j)
    EXPECT_NEAR(q.w.value[j], torch_sgd(init.w.value[j], j, 3, 0.05, 0.9, 0, 0.1, false), 1e-15) << j;
  for (int j = 0; j < 2; ++j) {
    EXPECT_NEAR(q.b.value[j], torch_sgd(init.b.value[j], j, 3, 0.05, 0.9, 0, 0.0, false), 1e-15) << j;
    EXPECT_NEAR(q.s.value[j], torch_sgd(init.s.value[j], j, 3, 0.05, 0.9, 0, 0.0, false), 1e-15) << j;
  }
  EXPECT_EQ(q.buf.value[0], 4.0);  // buffers are never updated
  EXPECT_EQ(q.buf.value[1], 5.0);
  EXPECT_EQ(opt.steps(), 3);
}

TEST(NnOptim, SgdNesterovWeightDecayAndGroupDecay) {
  Quadratic q;
  const Quadratic init;
  // Explicit groups: w with its own lr and decay, {b, s} with the options' defaults.
  std::vector<ParamGroup<double>> groups{{{&q.w}, 0.02, 0.3}, {{&q.b, &q.s, &q.buf}}};
  SGD<double> opt(groups, SGDOptions(0.1).momentum(0.8).nesterov(true).weight_decay(0.05));
  EXPECT_EQ(*opt.groups()[1].lr, 0.1);
  EXPECT_EQ(*opt.groups()[1].weight_decay, 0.05);
  run_steps(q, opt, 3);
  for (int j = 0; j < 3; ++j)
    EXPECT_NEAR(q.w.value[j], torch_sgd(init.w.value[j], j, 3, 0.02, 0.8, 0, 0.3, true), 1e-15) << j;
  for (int j = 0; j < 2; ++j)
    EXPECT_NEAR(q.b.value[j], torch_sgd(init.b.value[j], j, 3, 0.1, 0.8, 0, 0.05, true), 1e-15) << j;
}

TEST(NnOptim, SgdPlainAndDampening) {
  Quadratic q1, q2;
  const Quadratic init;
  SGD<double> plain(q1.params(), SGDOptions(0.2).weight_decay(0.01));
  SGD<double> damp(q2.params(), SGDOptions(0.2).momentum(0.5).dampening(0.4));
  run_steps(q1, plain, 3);
  run_steps(q2, damp, 3);
  for (int j = 0; j < 3; ++j) {
    EXPECT_NEAR(q1.w.value[j], torch_sgd(init.w.value[j], j, 3, 0.2, 0, 0, 0.01, false), 1e-15) << j;
    EXPECT_NEAR(q2.w.value[j], torch_sgd(init.w.value[j], j, 3, 0.2, 0.5, 0.4, 0, false), 1e-15) << j;
  }
}

TEST(NnOptim, AdamWDecoupledDecayPerGroup) {
  Quadratic q;
  const Quadratic init;
  auto groups = split_decay(q.params(), 0.2, 0.0);
  AdamW<double> opt(groups, AdamWOptions(0.05));
  run_steps(q, opt, 3);
  for (int j = 0; j < 3; ++j)
    EXPECT_NEAR(q.w.value[j], torch_adamw(init.w.value[j], j, 3, 0.05, 0.9, 0.999, 1e-8, 0.2), 1e-14) << j;
  for (int j = 0; j < 2; ++j) {
    EXPECT_NEAR(q.b.value[j], torch_adamw(init.b.value[j], j, 3, 0.05, 0.9, 0.999, 1e-8, 0.0), 1e-14) << j;
    EXPECT_NEAR(q.s.value[j], torch_adamw(init.s.value[j], j, 3, 0.05, 0.9, 0.999, 1e-8, 0.0), 1e-14) << j;
  }
  EXPECT_EQ(q.buf.value[0], 4.0);

  // Defaults (weight decay 0.01), other betas / eps, and set_lr between steps.
  Quadratic r;
  AdamW<double> opt2(r.params(), AdamWOptions(0.1).betas({0.8, 0.99}).eps(1e-3));
  EXPECT_EQ(*opt2.groups()[0].weight_decay, 0.01);
  run_steps(r, opt2, 3);
  for (int j = 0; j < 3; ++j)
    EXPECT_NEAR(r.w.value[j], torch_adamw(init.w.value[j], j, 3, 0.1, 0.8, 0.99, 1e-3, 0.01), 1e-14) << j;
  opt2.set_lr(0.0);
  const double keep = r.w.value[0];
  run_steps(r, opt2, 1);
  EXPECT_EQ(r.w.value[0], keep);  // lr 0: neither the step nor the decoupled decay moves p
}

TEST(NnOptim, ConfigurationErrors) {
  Quadratic q;
  EXPECT_THROW(SGD<double>(q.params(), SGDOptions(0.1).nesterov(true)), config_error);
  EXPECT_THROW(SGD<double>(q.params(), SGDOptions(-0.1)), config_error);
  EXPECT_THROW(AdamW<double>(q.params(), AdamWOptions().betas({0.9, 1.0})), config_error);
  std::vector<ParamGroup<double>> dup{{{&q.w}}, {{&q.w, &q.b}}};
  auto m = message_of<config_error>([&] { SGD<double>(dup, SGDOptions(0.1)); });
  EXPECT_TRUE(contains(m, "parameter 0 of group 1") && contains(m, "earlier group")) << m;
  SGD<double> opt(q.params(), SGDOptions(0.1));
  EXPECT_THROW(opt.set_lr(-1.0), config_error);
  EXPECT_THROW(opt.set_lr(3, 0.1), config_error);
  q.w.grad = Tensor<double>({2});
  EXPECT_THROW(opt.step(), state_error);
}

// ---------------------------------------------------------------------------------------
// Schedules vs closed form

TEST(NnSchedule, CosineWithWarmup) {
  const double pi = std::acos(-1.0);
  CosineSchedule s(0.1, 100, 10, 0.001);
  EXPECT_NEAR(s.lr(0), 0.01, 1e-15);
  EXPECT_NEAR(s.lr(4), 0.05, 1e-15);
  EXPECT_NEAR(s.lr(9), 0.1, 1e-15);
  EXPECT_NEAR(s.lr(10), 0.1, 1e-15);
  EXPECT_NEAR(s.lr(55), 0.001 + 0.099 * 0.5 * (1 + std::cos(pi * 45.0 / 90.0)), 1e-15);
  EXPECT_NEAR(s.lr(37), 0.001 + 0.099 * 0.5 * (1 + std::cos(pi * 27.0 / 90.0)), 1e-15);
  EXPECT_NEAR(s.lr(100), 0.001, 1e-15);
  EXPECT_NEAR(s.lr(1000), 0.001, 1e-15);
  CosineSchedule plain(1.0, 4);
  EXPECT_NEAR(plain.lr(0), 1.0, 1e-15);
  EXPECT_NEAR(plain.lr(1), 0.5 * (1 + std::cos(pi / 4)), 1e-15);
  EXPECT_NEAR(plain.lr(2), 0.5, 1e-15);
  EXPECT_NEAR(plain.lr(4), 0.0, 1e-15);
  EXPECT_THROW(CosineSchedule(0.1, 0), config_error);
  EXPECT_THROW(CosineSchedule(0.1, 10, 10), config_error);
  EXPECT_THROW(plain.lr(-1), config_error);
}

TEST(NnSchedule, StepDecay) {
  StepSchedule s(0.1, 30, 0.1);
  EXPECT_NEAR(s.lr(0), 0.1, 1e-15);
  EXPECT_NEAR(s.lr(29), 0.1, 1e-15);
  EXPECT_NEAR(s.lr(30), 0.01, 1e-15);
  EXPECT_NEAR(s.lr(65), 0.001, 1e-15);
  StepSchedule half(2.0, 1, 0.5);
  EXPECT_NEAR(half.lr(3), 0.25, 1e-15);
  EXPECT_THROW(StepSchedule(0.1, 0), config_error);
}

// ---------------------------------------------------------------------------------------
// Synthetic data

TEST(NnSynthetic, BarsAreDeterministicBalancedAndBatchable) {
  auto a = make_bars_dataset<float>(40, 11), b = make_bars_dataset<float>(40, 11), c = make_bars_dataset<float>(40, 12);
  EXPECT_EQ(a.images.sizes(), Shape({40, 1, 16, 16}));
  EXPECT_EQ(max_abs_diff(a.images, b.images), 0.0);
  EXPECT_GT(max_abs_diff(a.images, c.images), 0.0);
  std::vector<int> count(4, 0);
  for (int l : a.labels) ++count[std::size_t(l)];
  EXPECT_EQ(count, std::vector<int>(4, 10));
  auto [x, y] = a.batch({5, 2});
  EXPECT_EQ(x.sizes(), Shape({2, 1, 16, 16}));
  EXPECT_EQ(y, (std::vector<int>{a.labels[5], a.labels[2]}));
  EXPECT_EQ(x(1, 0, 3, 4), a.images(2, 0, 3, 4));
  EXPECT_EQ(a.slice(38, 10).second.size(), 2u);
  EXPECT_THROW(a.batch({40}), config_error);
}
