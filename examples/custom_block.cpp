// custom_block: a block of your own from OREPA's branches plus one new branch, without
// touching the library. The new branch is ACNet's asymmetric pair (a 1 x k and a k x 1
// kernel on the centre row and column). It trains a few steps to imitate a random
// target convolution, then deploys and checks eval == deploy.
#include <orepa/orepa.hpp>

#include <cstdio>
#include <string>

using namespace orepa;

// A branch is a linear map from its parameters to a [O, Ig, k, k] kernel plus its adjoint;
// SimpleBranch derives the scaled squeeze and its adjoint from the two.
class Asymmetric final : public SimpleBranch<float> {
 public:
  Asymmetric(const ConvGeometry& g, Rng& rng)
      : hor_(Tensor<float>({g.out_channels, g.in_per_group(), 1, g.kernel})),
        ver_(Tensor<float>({g.out_channels, g.in_per_group(), g.kernel, 1})) {
    kaiming_uniform(hor_.value, 1.0, rng);
    kaiming_uniform(ver_.value, 1.0, rng);
  }
  // K[o, i, c, w] += hor[o, i, w]; K[o, i, h, c] += ver[o, i, h] (c = centre).
  void kernel(TensorView<float> out) const override {
    const auto k = out.size(2), c = k / 2, planes = out.size(0) * out.size(1);
    for (std::int64_t p = 0; p < planes; ++p)
      for (std::int64_t j = 0; j < k; ++j) {
        out[p * k * k + c * k + j] += hor_.value[p * k + j];
        out[p * k * k + j * k + c] += ver_.value[p * k + j];
      }
  }
  // The adjoint reads the same cells back.
  void kernel_backward(ConstTensorView<float> dk) override {
    const auto k = dk.size(2), c = k / 2, planes = dk.size(0) * dk.size(1);
    for (std::int64_t p = 0; p < planes; ++p)
      for (std::int64_t j = 0; j < k; ++j) {
        hor_.grad[p * k + j] += dk[p * k * k + c * k + j];
        ver_.grad[p * k + j] += dk[p * k * k + j * k + c];
      }
  }
  // Its tensors under their state-dict names.
  void collect_tensors(NamedParams<float>& out, const std::string& prefix) override {
    out.emplace_back(prefix + "weight_acb_hor", &hor_);
    out.emplace_back(prefix + "weight_acb_ver", &ver_);
  }
  double initial_scale() const override { return 0.5; }

 private:
  Param<float> hor_, ver_;
};

int main(int argc, char** argv) try {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 60;
  const auto opts = OrepaOptions(4, 8, 3);
  const ConvGeometry g = opts.geometry();
  Rng rng(1);
  BranchList<float> branches = make_orepa_branches<float>(g, 0, rng);  // the six OREPA rows
  branches.push_back(std::make_unique<Asymmetric>(g, rng));            // row 6: ours
  OnlineBlock<float, SiLU> block(g, std::move(branches), "OREPA+ACB");

  // Task: imitate a fixed random convolution followed by SiLU.
  Tensor<float> target_w(g.weight_shape());
  fill_uniform(target_w, 0.3, rng);
  DeployedConv<float> teacher(g, target_w, Tensor<float>({g.out_channels}), SiLU{});
  Tensor<float> x({16, 4, 12, 12});
  double first = 0, last = 0;
  const float lr = 0.05f;
  for (int step = 0; step < steps; ++step) {
    fill_uniform(x, 1.0, rng);
    const Tensor<float> want = teacher.forward(x);
    Tensor<float> y = block.forward_train(x);
    Tensor<float> grad(y.sizes());
    double loss = 0;
    for (std::int64_t j = 0; j < y.numel(); ++j) {
      const double d = y[j] - want[j];
      loss += d * d / double(y.numel());
      grad[j] = float(2 * d / double(y.numel()));
    }
    block.zero_grad();
    block.backward(grad);
    for (auto* p : block.parameters())
      for (std::int64_t j = 0; j < p->value.numel(); ++j) p->value[j] -= lr * p->grad[j];
    if (step == 0) first = loss;
    last = loss;
  }
  std::printf("custom block with %zu branches (vector %s): mse %.4f -> %.4f after %d steps\n",
              block.branches().size(), shape_str(block.scales().value.sizes()).c_str(), first, last, steps);
  fill_uniform(x, 1.0, rng);
  const double err = max_abs_diff(block.forward_eval(x), block.deploy().forward(x));
  std::printf("max |eval - deploy| = %.3g\n", err);
  return err < 1e-4 && last < first ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "custom_block: %s\n", e.what());
  return 1;
}
