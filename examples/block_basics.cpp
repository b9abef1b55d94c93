// block_basics: the OREPA life cycle on one block. Builds an OREPA 3x3 block (SiLU),
// runs one training step (squeeze + one conv + BN + SiLU, then backward into every
// branch), deploys it to a single fused oneDNN convolution and prints
// max |eval - deploy| and the time of each forward.
#include <orepa/orepa.hpp>

#include <chrono>
#include <cstdio>

int main() try {
  using namespace orepa;
  using clock = std::chrono::steady_clock;
  auto ms = [](clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); };

  OREPA<float, SiLU> block(OrepaOptions(32, 64, 3).seed(1));
  Rng rng(2);
  Tensor<float> x({8, 32, 28, 28});
  fill_uniform(x, 1.0, rng);

  // One training step: forward squeezes the six branches into one kernel.
  auto t0 = clock::now();
  Tensor<float> y = block.forward_train(x);
  auto t1 = clock::now();
  Tensor<float> grad(y.sizes(), 1.0f / float(y.numel()));  // d mean(y) / dy
  block.backward(grad);
  auto t2 = clock::now();
  float lr = 0.1f;
  for (auto* p : block.parameters())
    if (p->trainable())
      for (std::int64_t j = 0; j < p->value.numel(); ++j) p->value[j] -= lr * p->grad[j];

  // Eval (running statistics) vs the deployed single convolution.
  auto t3 = clock::now();
  const Tensor<float> eval = block.forward_eval(x);
  auto t4 = clock::now();
  const auto deployed = block.deploy();
  deployed.forward(x);  // warm-up: primitive creation and the one-time weight reorder
  auto t5 = clock::now();
  const Tensor<float> dep = deployed.forward(x);
  auto t6 = clock::now();

  std::printf("OREPA 32->64 k3 SiLU on %s\n", shape_str(x.sizes()).c_str());
  std::printf("  train forward  %8.2f ms (squeeze + one conv + BN + SiLU)\n", ms(t1 - t0));
  std::printf("  train backward %8.2f ms (into %zu tensors)\n", ms(t2 - t1), block.parameters().size());
  std::printf("  eval forward   %8.2f ms\n", ms(t4 - t3));
  std::printf("  deploy forward %8.2f ms (one fused conv + bias + SiLU)\n", ms(t6 - t5));
  const double err = max_abs_diff(eval, dep);
  std::printf("  max |eval - deploy| = %.3g\n", err);
  return err < 1e-4 ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "block_basics: %s\n", e.what());
  return 1;
}
