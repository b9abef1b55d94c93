// One training step of an OREPA block, through the fused training pipeline (whose code
// orepa::precompiled compiles once): the build links against the installed package, and
// the gradient equals central differences of the loss sum(y * g) in two input elements.
#include <orepa/orepa.hpp>

#include <cmath>
#include <cstdio>

int main() {
  orepa::OREPA<float, orepa::SiLU> block(orepa::OrepaOptions(4, 8, 3));
  orepa::Tensor<float> x({2, 4, 6, 6});
  orepa::Rng rng(5);
  orepa::fill_uniform(x, 1.0, rng);
  orepa::Tensor<float> g(block.forward_train(x).sizes());
  orepa::fill_uniform(g, 1.0, rng);
  const orepa::Tensor<float> dx = block.backward(g);
  auto loss = [&] {
    const orepa::Tensor<float> y = block.forward_train(x);
    double s = 0;
    for (std::int64_t i = 0; i < y.numel(); ++i) s += double(y[i]) * g[i];
    return s;
  };
  double worst = 0;
  for (std::int64_t i : {std::int64_t(3), std::int64_t(100)}) {
    const float keep = x[i], h = 1e-2f;
    x[i] = keep + h;
    const double up = loss();
    x[i] = keep - h;
    const double down = loss();
    x[i] = keep;
    worst = std::fmax(worst, std::abs((up - down) / (2 * double(h)) - dx[i]));
  }
  std::printf("orepa %s training consumer: max |dx - central difference| = %.3g\n", orepa::version_string, worst);
  return worst < 2e-2 ? 0 : 1;
}
