// Builds an OREPA block from the installed headers, deploys it and checks eval == deploy.
#include <orepa/orepa.hpp>

#include <cstdio>

int main() {
  orepa::OREPA<float, orepa::SiLU> block(orepa::OrepaOptions(4, 8, 3));
  orepa::Tensor<float> x({1, 4, 6, 6});
  orepa::Rng rng(7);
  orepa::fill_uniform(x, 1.0, rng);
  const double err = orepa::max_abs_diff(block.forward_eval(x), block.deploy().forward(x));
  std::printf("orepa %s consumer: max |eval - deploy| = %.3g\n", orepa::version_string, err);
  return err < 1e-4 ? 0 : 1;
}
