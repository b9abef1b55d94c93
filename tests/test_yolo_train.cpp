// YOLOv5's training recipe (nn/yolo_train.hpp) against values computed by hand from the
// formulas of YOLOv5 v7.0's train.py: the three parameter groups, the warm-up of learning
// rates, momentum and accumulation, the linear and cosine decay, the scaled weight decay,
// when the optimizer steps, and ModelEMA's average with its ramp.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "test_util.hpp"

using namespace orepa;
using orepa::test::contains;
using orepa::test::message_of;

namespace {

// The names of the parameters in `group`, looked up in `net`'s named parameters.
template <class Net, class S>
std::set<std::string> names_of(Net& net, const ParamGroup<S>& group) {
  std::set<std::string> out;
  for (auto* p : group.params)
    for (auto& [n, q] : net.named_parameters())
      if (q == p) out.insert(n);
  return out;
}

Sequential<double> ema_net(std::uint64_t seed) {
  Sequential<double> net;
  net.add(ConvBN<double, Identity>(ConvOptions(1, 2, 1).seed(seed)));
  net.add(GlobalAvgPool<double>());
  net.add(Linear<double>(2, 2, seed + 1));
  return net;
}

}  // namespace

TEST(YoloTrain, ParamGroupsAreBiasesWeightsAndBnWeights) {
  Sequential<float> net;
  net.add(ConvBN<float, SiLU>(ConvOptions(2, 4, 3).seed(1)));
  net.add(OREPA_1x1<float, SiLU>(ConvOptions(4, 4, 1).seed(2)));
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(4, 3, 3));
  const auto g = yolo_param_groups(net, 5e-4);
  ASSERT_EQ(g.size(), 3u);
  EXPECT_EQ(names_of(net, g[0]), (std::set<std::string>{"0.bn.bias", "1.bn.bias", "3.bias"}));
  EXPECT_EQ(names_of(net, g[1]), (std::set<std::string>{"0.conv.weight", "1.weight_or1x1_origin", "1.weight_or1x1_l2i_conv1",
                                                        "1.weight_or1x1_l2i_conv2", "1.vector", "3.weight"}));
  EXPECT_EQ(names_of(net, g[2]), (std::set<std::string>{"0.bn.weight", "1.bn.weight"}));
  EXPECT_EQ(*g[0].weight_decay, 0.f);
  EXPECT_EQ(*g[1].weight_decay, 5e-4f);
  EXPECT_EQ(*g[2].weight_decay, 0.f);
  EXPECT_FALSE(g[0].lr.has_value());
  EXPECT_THROW(yolo_param_groups(net, -1.0), config_error);
}

TEST(YoloTrain, WarmupAndDecayAreYolov5sClosedForms) {
  // 300 epochs of 50 batches of 16: nw = max(round(3 * 50), 100) = 150, accumulate
  // round(64 / 16) = 4, weight decay 5e-4 * 16 * 4 / 64 = 5e-4.
  const YoloSchedule s(YoloScheduleOptions(300, 16, 50));
  EXPECT_EQ(s.warmup_iterations(), 150);
  EXPECT_EQ(s.accumulate(), 4);
  EXPECT_NEAR(s.weight_decay(), 5e-4, 1e-18);
  // ni = 0: bias group from warmup_bias_lr, others from 0, momentum from 0.8.
  EXPECT_EQ(s.lr(0, 0, 0), 0.1);
  EXPECT_EQ(s.lr(1, 0, 0), 0.0);
  EXPECT_EQ(s.lr(2, 0, 0), 0.0);
  EXPECT_EQ(s.momentum(0), 0.8);
  // ni = 60 in epoch 1 (0.4 of the warm-up): target lr0 * lf(1) = 0.01 * 0.9967.
  EXPECT_NEAR(s.lr(0, 60, 1), 0.0639868, 1e-15);
  EXPECT_NEAR(s.lr(1, 60, 1), 0.0039868, 1e-15);
  EXPECT_NEAR(s.lr(2, 60, 1), 0.0039868, 1e-15);
  EXPECT_NEAR(s.momentum(60), 0.8548, 1e-15);
  // The warm-up's end and after: lr0 * lf(epoch) for every group, momentum 0.937.
  EXPECT_NEAR(s.lr(0, 150, 3), 0.009901, 1e-15);
  EXPECT_NEAR(s.lr(1, 150, 3), 0.009901, 1e-15);
  EXPECT_EQ(s.momentum(150), 0.937);
  EXPECT_NEAR(s.lr(0, 5000, 100), 0.0067, 1e-15);
  EXPECT_NEAR(s.lr(2, 5000, 100), 0.0067, 1e-15);
  EXPECT_EQ(s.momentum(5000), 0.937);
  EXPECT_EQ(s.accumulate(5000), 4);
  EXPECT_NEAR(s.lf(300), 0.01, 1e-15);
  EXPECT_EQ(s.lf(0), 1.0);

  // Cosine (one_cycle): lf(150) = 0.505, lf(100) = 0.7525, lf(300) = lrf.
  const YoloSchedule c(YoloScheduleOptions(300, 16, 50).decay(LrDecay::cosine));
  EXPECT_NEAR(c.lf(0), 1.0, 1e-15);
  EXPECT_NEAR(c.lf(100), 0.7525, 1e-15);
  EXPECT_NEAR(c.lf(150), 0.505, 1e-15);
  EXPECT_NEAR(c.lf(300), 0.01, 1e-15);
  EXPECT_NEAR(c.lr(1, 5000, 150), 0.00505, 1e-15);
}

TEST(YoloTrain, RoundingIsPythonsHalfToEven) {
  // Warm-up length: round(2.5 * 45) = round(112.5) = 112; round(3 * 10) = 30 -> at least 100.
  EXPECT_EQ(YoloSchedule(YoloScheduleOptions(10, 16, 45).warmup_epochs(2.5)).warmup_iterations(), 112);
  EXPECT_EQ(YoloSchedule(YoloScheduleOptions(10, 16, 10)).warmup_iterations(), 100);
  // Accumulation: 64 / 24 = 2.67 -> 3 (decay 5e-4 * 24 * 3 / 64); 64 / 128 = 0.5 -> 0 -> 1
  // (decay 5e-4 * 128 / 64); 64 / 40 = 1.6 -> 2.
  const YoloSchedule b24(YoloScheduleOptions(10, 24, 10)), b128(YoloScheduleOptions(10, 128, 10)),
      b40(YoloScheduleOptions(10, 40, 10));
  EXPECT_EQ(b24.accumulate(), 3);
  EXPECT_NEAR(b24.weight_decay(), 5.625e-4, 1e-18);
  EXPECT_EQ(b128.accumulate(), 1);
  EXPECT_NEAR(b128.weight_decay(), 1e-3, 1e-18);
  EXPECT_EQ(b40.accumulate(), 2);
  // During the warm-up of nw = 192 (6 epochs of 32) at batch 16 the accumulation is
  // round(1 + 3 ni / 192) = round(1 + ni / 64), exact in binary: 1.5 -> 2, 2.5 -> 2, 3.5 -> 4.
  const YoloSchedule w(YoloScheduleOptions(10, 16, 32).warmup_epochs(6));
  ASSERT_EQ(w.warmup_iterations(), 192);
  const std::vector<std::pair<std::int64_t, std::int64_t>> expect{{0, 1},  {31, 1},  {32, 2},  {95, 2},  {96, 2},
                                                                  {97, 3}, {159, 3}, {160, 4}, {192, 4}, {500, 4}};
  for (auto [ni, acc] : expect) EXPECT_EQ(w.accumulate(ni), acc) << "ni " << ni;
}

TEST(YoloTrain, OptimizerStepsEveryAccumulateBatches) {
  // nw = 128 (4 epochs of 32) at batch 32: accumulate round(1 + ni / 128) is 1 below
  // ni = 64 and 2 from there on, so steps come at 0, 1, ..., 63, then 65, 67, 69, ...
  YoloSchedule s(YoloScheduleOptions(10, 32, 32).warmup_epochs(4));
  std::vector<std::int64_t> steps, expect;
  for (std::int64_t ni = 0; ni < 200; ++ni)
    if (s.should_step(ni)) steps.push_back(ni);
  for (std::int64_t ni = 0; ni < 64; ++ni) expect.push_back(ni);
  for (std::int64_t ni = 65; ni < 200; ni += 2) expect.push_back(ni);
  EXPECT_EQ(steps, expect);

  // Its state resumes the count: saved after ni = 64 (no step), the copy steps at 65.
  YoloSchedule a(YoloScheduleOptions(10, 32, 32).warmup_epochs(4)), b(YoloScheduleOptions(1, 1, 1));
  for (std::int64_t ni = 0; ni <= 64; ++ni) (void)a.should_step(ni);
  b.load_state_dict(a.state_dict());
  EXPECT_EQ(b.last_step(), 63);
  EXPECT_EQ(b.warmup_iterations(), 128);
  EXPECT_EQ(b.should_step(65), true);
  EXPECT_EQ(a.should_step(65), true);

  auto sd = a.state_dict();
  sd.erase("lrf");
  sd.insert_real("lrf", 2.0);
  const auto m = message_of<format_error>([&] { b.load_state_dict(sd); });
  EXPECT_TRUE(contains(m, "YoloSchedule::load_state_dict") && contains(m, "lrf must be in [0, 1], got 2")) << m;
  EXPECT_EQ(b.options().lrf(), 0.01);
}

TEST(YoloTrain, ApplySetsEveryGroupsLrAndTheMomentum) {
  Sequential<float> net;
  net.add(ConvBN<float, SiLU>(ConvOptions(2, 4, 3).seed(1)));
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(4, 3, 3));
  const YoloSchedule s(YoloScheduleOptions(300, 16, 50));
  SGD<float> opt(yolo_param_groups(net, s.weight_decay()), SGDOptions(0.01).momentum(0.937).nesterov(true));
  s.apply(opt, 60, 1);
  EXPECT_EQ(*opt.groups()[0].lr, float(0.0639868));
  EXPECT_EQ(*opt.groups()[1].lr, float(0.0039868));
  EXPECT_EQ(*opt.groups()[2].lr, float(0.0039868));
  EXPECT_NEAR(opt.options().momentum(), 0.8548, 1e-15);
  EXPECT_EQ(*opt.groups()[1].weight_decay, 5e-4f);
  EXPECT_THROW(s.apply(opt, -1, 0), config_error);
  EXPECT_THROW(YoloSchedule(YoloScheduleOptions(0, 16, 50)), config_error);
  EXPECT_THROW(YoloSchedule(YoloScheduleOptions(10, 16, 50).momentum(0)), config_error);
}

// The average by hand: e1 = d1 w0 + (1 - d1) w1, e2 = d2 e1 + (1 - d2) w2 with
// d_k = decay (1 - exp(-k / tau)), for every parameter and buffer (BN running statistics).
TEST(YoloTrain, ModelEmaIsTheRampedAverageOfParametersAndBuffers) {
  const double decay = 0.9, tau = 3;
  Sequential<double> model = ema_net(1);
  ModelEMA<Sequential<double>> ema(ema_net(2), model, ModelEMAOptions().decay(decay).tau(tau));
  const auto w0 = model.state_dict();
  for (const auto& [n, e] : ema.module().state_dict()) {
    if (e.is_tensor()) {
      EXPECT_EQ(max_abs_diff(e.tensor(), w0.tensor(n)), 0.0) << n << ": starts as the model";
    }
  }

  Rng rng(5);
  auto perturb = [&] {
    for (auto* p : model.parameters()) fill_uniform(p->value, 1.0, rng);
    for (auto* p : model.buffers()) fill_uniform(p->value, 1.0, rng);
  };
  std::map<std::string, std::vector<double>> expect;
  for (const auto& [n, e] : w0)
    if (e.is_tensor()) expect[n] = std::vector<double>(e.tensor().begin(), e.tensor().end());
  for (int k = 1; k <= 2; ++k) {
    perturb();
    model.get<ConvBN<double, Identity>>(0).batch_norms()[0]->num_batches_tracked = 10 * k;
    const double d = decay * (1 - std::exp(-double(k) / tau));
    const auto wk = model.state_dict();
    for (auto& [n, v] : expect)
      for (std::size_t j = 0; j < v.size(); ++j) v[j] = d * v[j] + (1 - d) * wk.tensor(n)[std::int64_t(j)];
    ema.update(model);
  }
  EXPECT_EQ(ema.updates(), 2);
  const auto got = ema.module().state_dict();
  EXPECT_EQ(expect.size(), 7u);  // conv.weight, bn.{weight, bias, running_mean, running_var}, 2.{weight, bias}
  for (const auto& [n, v] : expect)
    for (std::size_t j = 0; j < v.size(); ++j)
      EXPECT_NEAR(got.tensor(n)[std::int64_t(j)], v[j], 1e-15) << n << "[" << j << "]";
  EXPECT_EQ(got.count("0.bn.num_batches_tracked"), 20);

  // YOLOv5's defaults: d(1) = 0.9999 (1 - e^(-1/2000)), d(2000) = 0.9999 (1 - 1/e).
  ModelEMA<Sequential<double>> dflt(ema_net(3), model);
  EXPECT_NEAR(dflt.decay(1), 0.000499825033328626, 1e-17);
  EXPECT_NEAR(dflt.decay(2000), 0.6320573467726748, 1e-15);
}

TEST(YoloTrain, ModelEmaStateResumesAndMismatchesAreNamed) {
  Sequential<double> model = ema_net(1);
  ModelEMA<Sequential<double>> a(ema_net(2), model, ModelEMAOptions().decay(0.8).tau(5));
  Rng rng(3);
  for (int k = 0; k < 3; ++k) {
    for (auto* p : model.parameters()) fill_uniform(p->value, 1.0, rng);
    a.update(model);
  }
  ModelEMA<Sequential<double>> b(ema_net(4), ema_net(5));
  b.load_state_dict(a.state_dict());
  EXPECT_EQ(b.updates(), 3);
  EXPECT_EQ(b.options().tau(), 5.0);
  for (auto* p : model.parameters()) fill_uniform(p->value, 1.0, rng);
  a.update(model);
  b.update(model);
  const auto sa = a.state_dict(), sb = b.state_dict();
  for (const auto& [n, e] : sa) {
    if (e.is_tensor()) {
      EXPECT_EQ(max_abs_diff(e.tensor(), sb.tensor(n)), 0.0) << n;
    }
  }

  // Another structure: named, nothing changed.
  Sequential<double> other;
  other.add(ConvBN<double, Identity>(ConvOptions(1, 3, 1).seed(1)));
  other.add(GlobalAvgPool<double>());
  other.add(Linear<double>(3, 2, 2));
  const auto m = message_of<state_error>([&] { a.update(other); });
  EXPECT_TRUE(contains(m, "0.conv.weight [3, 1, 1, 1] in the model but 0.conv.weight [2, 1, 1, 1] in the EMA")) << m;
  EXPECT_EQ(a.updates(), 4);
  auto bad = a.state_dict();
  bad.erase("tau");
  bad.insert_real("tau", 0.0);
  const auto m2 = message_of<format_error>([&] { b.load_state_dict(bad); });
  EXPECT_TRUE(contains(m2, "ModelEMA::load_state_dict") && contains(m2, "tau must be finite and > 0")) << m2;
  EXPECT_THROW(ModelEMA<Sequential<double>>(ema_net(1), model, ModelEMAOptions().decay(1.5)), config_error);
}
