// train_classifier: the nn/ API end to end on a small plain network. Three OREPA blocks
// (ReLU) in a Sequential, global average pooling and a linear head learn the synthetic
// bar-orientation task (nn/synthetic.hpp) with SGD + Nesterov momentum and a cosine
// learning-rate schedule, one progress line per epoch. Then the network is deployed
// (every block one fused oneDNN convolution) and the example prints the eval-vs-deploy
// difference and the inference speed-up of the deployed network over the eval forward.
//
//   train_classifier [--epochs N] [--batch B] [--help]
//
// Exit status 0 on success, 1 when deploy and eval disagree or on any error.
#include <orepa/orepa.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

using namespace orepa;

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// "--flag value" as a positive integer; throws config_error naming the flag.
std::int64_t flag_value(int argc, char** argv, int& i) {
  if (i + 1 >= argc) throw config_error(detail::cat(argv[i], ": missing value"));
  const std::string v = argv[++i];
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x < 1 || x > 100000)
    throw config_error(detail::cat(argv[i - 1], ": expected an integer in [1, 100000], got '", v, "'"));
  return x;
}

}  // namespace

int main(int argc, char** argv) try {
  std::int64_t epochs = 4, batch = 32;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--epochs")) epochs = flag_value(argc, argv, i);
    else if (!std::strcmp(argv[i], "--batch")) batch = std::max<std::int64_t>(2, flag_value(argc, argv, i));
    else if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
      std::printf("usage: train_classifier [--epochs N (default 4)] [--batch B (default 32)]\n");
      return 0;
    } else {
      throw config_error(detail::cat("unknown argument '", argv[i], "' (see --help)"));
    }
  }

  // 16x16 images with one bar each; the label is its orientation (- | \ /).
  const auto train = make_bars_dataset<float>(2048, /*seed=*/1);
  const auto test = make_bars_dataset<float>(512, /*seed=*/2);
  batch = std::min(batch, train.size());

  Sequential<float> net;
  net.add(OREPA<float, ReLU>(OrepaOptions(1, 16, 3).seed(1)));
  net.add(OREPA<float, ReLU>(OrepaOptions(16, 32, 3).stride(2).seed(2)));
  net.add(OREPA<float, ReLU>(OrepaOptions(32, 32, 3).seed(3)));
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(32, train.num_classes, /*seed=*/4));

  const std::int64_t steps_per_epoch = train.size() / batch, total_steps = epochs * steps_per_epoch;
  const double base_lr = 0.1;
  // Weight decay on kernels only (not on OREPA's scaling vectors, BN parameters, biases).
  SGD<float> opt(split_decay(net.parameters(), 5e-4), SGDOptions(base_lr).momentum(0.9).nesterov(true));
  const CosineSchedule schedule(base_lr, total_steps, std::min<std::int64_t>(10, total_steps - 1));
  SoftmaxCrossEntropy<float> ce;

  std::printf("training 3 OREPA blocks + pool + linear on %lld bar images, %lld epochs of %lld steps (batch %lld)\n",
              static_cast<long long>(train.size()), static_cast<long long>(epochs),
              static_cast<long long>(steps_per_epoch), static_cast<long long>(batch));
  Rng rng(7);
  std::vector<std::int64_t> order(static_cast<std::size_t>(train.size()));
  std::iota(order.begin(), order.end(), 0);
  const auto t_train = Clock::now();
  std::int64_t step = 0;
  double train_seconds = 0;  // optimisation only (img/s); the ETA uses the wall time
  for (std::int64_t epoch = 0; epoch < epochs; ++epoch) {
    const auto t_epoch = Clock::now();
    for (std::size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
    double loss_sum = 0, acc_sum = 0;
    for (std::int64_t s = 0; s < steps_per_epoch; ++s, ++step) {
      const auto first = order.begin() + std::ptrdiff_t(s * batch);
      auto [x, y] = train.batch(std::vector<std::int64_t>(first, first + std::ptrdiff_t(batch)));
      opt.zero_grad();
      const Tensor<float>& logits = net.forward_train(x);
      acc_sum += accuracy(logits, y);
      loss_sum += ce.forward_train(logits, y);
      net.backward(ce.backward());
      opt.set_lr(float(schedule.lr(step)));
      opt.step();
    }
    train_seconds += since(t_epoch);
    const auto [tx, ty] = test.slice(0, test.size());
    const double held_out = accuracy(net.forward_eval(tx), ty);
    const double elapsed = since(t_train);
    const double eta = elapsed / double(epoch + 1) * double(epochs - epoch - 1);
    std::printf("epoch %lld/%lld  loss %.4f  train acc %5.1f%%  held-out acc %5.1f%%  %5.0f img/s  ETA %.1f s\n",
                static_cast<long long>(epoch + 1), static_cast<long long>(epochs), loss_sum / double(steps_per_epoch),
                100 * acc_sum / double(steps_per_epoch), 100 * held_out,
                double(step * batch) / train_seconds, eta);
    std::fflush(stdout);
  }

  // Deploy: the blocks become DeployedConv (BN folded, bias + ReLU fused), the pool and
  // the head run their eval forward.
  const InferenceChain<float> deployed = net.deploy();
  const auto [x, y] = test.slice(0, test.size());
  const Tensor<float> eval = net.forward_eval(x), dep = deployed.forward(x);
  const auto pe = argmax_rows(eval), pd = argmax_rows(dep);
  const auto agree = std::inner_product(pe.begin(), pe.end(), pd.begin(), std::int64_t(0), std::plus<>(),
                                        [](int a, int b) { return std::int64_t(a == b); });
  const double diff = max_abs_diff(eval, dep);
  std::printf("deployed vs eval on %lld held-out images: max |logit difference| %.3g, same class on %lld\n",
              static_cast<long long>(test.size()), diff, static_cast<long long>(agree));

  // Inference speed: median of interleaved repetitions after one warm-up each.
  std::vector<double> te, td;
  (void)net.forward_eval(x);
  (void)deployed.forward(x);
  for (int r = 0; r < 7; ++r) {
    auto t0 = Clock::now();
    (void)net.forward_eval(x);
    te.push_back(since(t0));
    t0 = Clock::now();
    (void)deployed.forward(x);
    td.push_back(since(t0));
  }
  std::sort(te.begin(), te.end());
  std::sort(td.begin(), td.end());
  const double me = te[te.size() / 2] * 1e3, md = td[td.size() / 2] * 1e3;
  std::printf("inference on %lld images: eval forward %.2f ms, deployed %.2f ms, speed-up %.2fx\n",
              static_cast<long long>(test.size()), me, md, me / md);
  double scale = 1;  // tolerance relative to the largest logit
  for (float v : eval) scale = std::max(scale, double(std::abs(v)));
  return agree == test.size() && diff <= 1e-4 * scale ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "train_classifier: %s\n", e.what());
  return 1;
}
