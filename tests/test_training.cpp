// End-to-end training: a small OREPA classifier learns the synthetic bar-orientation task
// (include/orepa/nn/synthetic.hpp) with SGD + Nesterov momentum and a cosine schedule,
// reaches >= 95% held-out accuracy, and its deployed chain predicts exactly as the eval
// forward does.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <numeric>
#include <vector>

#include "orepa/blocks/orepa.hpp"
#include "orepa/nn/layers.hpp"
#include "orepa/nn/optim.hpp"
#include "orepa/nn/schedule.hpp"
#include "orepa/nn/sequential.hpp"
#include "orepa/nn/synthetic.hpp"

using namespace orepa;

TEST(NnTraining, OrepaClassifierLearnsBarsAndDeploysExactly) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto train = make_bars_dataset<float>(2048, /*seed=*/101);
  const auto test = make_bars_dataset<float>(512, /*seed=*/202);

  Sequential<float> net;
  net.add(OREPA<float, ReLU>(OrepaOptions(1, 8, 3).seed(1)));
  net.add(OREPA<float, ReLU>(OrepaOptions(8, 16, 3).stride(2).seed(2)));
  net.add(OREPA<float, ReLU>(OrepaOptions(16, 16, 3).seed(3)));
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(16, train.num_classes, /*seed=*/4));

  const std::int64_t steps = 200, batch = 32;
  const double base_lr = 0.1;
  // No weight decay on the branch-scaling vectors, BN parameters and biases.
  SGD<float> opt(split_decay(net.parameters(), 5e-4, 0.0), SGDOptions(base_lr).momentum(0.9).nesterov(true));
  CosineSchedule schedule(base_lr, steps, /*warmup_steps=*/10);
  SoftmaxCrossEntropy<float> ce;

  // Epochs of shuffled minibatches (fixed seed).
  Rng rng(7);
  std::vector<std::int64_t> order(std::size_t(train.size()));
  std::iota(order.begin(), order.end(), 0);
  std::size_t cursor = order.size();
  double recent_loss = 0;
  for (std::int64_t step = 0; step < steps; ++step) {
    if (cursor + std::size_t(batch) > order.size()) {
      for (std::size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
      cursor = 0;
    }
    std::vector<std::int64_t> idx(order.begin() + std::ptrdiff_t(cursor), order.begin() + std::ptrdiff_t(cursor + batch));
    cursor += std::size_t(batch);
    auto [x, y] = train.batch(idx);

    opt.zero_grad();
    const float loss = ce.forward_train(net.forward_train(x), y);
    ASSERT_TRUE(std::isfinite(loss)) << "step " << step;
    net.backward(ce.backward());
    opt.set_lr(float(schedule.lr(step)));
    opt.step();
    if (step >= steps - 20) recent_loss += loss / 20.0;
  }
  const double train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // Held-out accuracy with the eval forward (BN running statistics), then the deployed chain.
  const InferenceChain<float> deployed = net.deploy();
  ASSERT_EQ(deployed.size(), 5u);
  for (std::size_t i = 0; i < 3; ++i) EXPECT_NE(deployed.stage(i).target<DeployedConv<float>>(), nullptr) << i;
  std::int64_t correct = 0, agree = 0;
  double worst_rel = 0;
  for (std::int64_t begin = 0; begin < test.size(); begin += 128) {
    auto [x, y] = test.slice(begin, 128);
    const Tensor<float> eval = net.forward_eval(x), dep = deployed.forward(x);
    ASSERT_EQ(dep.sizes(), eval.sizes());
    const auto pe = argmax_rows(eval), pd = argmax_rows(dep);
    for (std::size_t n = 0; n < y.size(); ++n) {
      correct += pe[n] == y[n];
      agree += pe[n] == pd[n];
      EXPECT_EQ(pd[n], pe[n]) << "test image " << begin + std::int64_t(n);
      // Per image: max |deployed - eval| relative to max(1, max |eval logit|).
      double diff = 0, scale = 1;
      for (std::int64_t k = 0; k < eval.size(1); ++k) {
        diff = std::max(diff, std::abs(double(dep(std::int64_t(n), k)) - double(eval(std::int64_t(n), k))));
        scale = std::max(scale, std::abs(double(eval(std::int64_t(n), k))));
      }
      worst_rel = std::max(worst_rel, diff / scale);
    }
  }
  const double accuracy = double(correct) / double(test.size());
  const double total_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "[ training ] " << steps << " steps of batch " << batch << ", final loss ~" << recent_loss
            << ", held-out accuracy " << accuracy * 100 << "% (" << correct << "/" << test.size()
            << "), deployed agrees on " << agree << "/" << test.size() << ", worst relative logit diff "
            << worst_rel << ", train " << train_seconds << " s, total " << total_seconds << " s\n";
  RecordProperty("accuracy", std::to_string(accuracy));
  EXPECT_GE(accuracy, 0.95);
  EXPECT_EQ(agree, test.size());
  EXPECT_LE(worst_rel, 1e-3);
}
