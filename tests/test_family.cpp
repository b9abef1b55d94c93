// OREPA_1x1, OREPA_LargeConv and user-defined blocks: squeeze against explicit
// computations, finite-difference gradients, eval vs deploy, configuration errors.
#include <string>

#include "test_util.hpp"

using namespace orepa;
using test::random_tensor;

namespace {
// Randomises the block, then checks every gradient against finite differences.
template <class Block>
void gradient_check(Block& block, std::int64_t in_channels, std::int64_t h, std::uint64_t seed) {
  Rng rng(seed);
  test::randomise(block, rng);
  test::check_block_gradients(block, random_tensor<double>({2, in_channels, h, h}, rng), rng);
}

Tensor<double> flipped(const Tensor<double>& w) {  // both spatial axes
  Tensor<double> r(w.sizes());
  const auto k = w.size(2);
  for (std::int64_t a = 0; a < w.size(0); ++a)
    for (std::int64_t b = 0; b < w.size(1); ++b)
      for (std::int64_t i = 0; i < k; ++i)
        for (std::int64_t j = 0; j < k; ++j) r(a, b, i, j) = w(a, b, k - 1 - i, k - 1 - j);
  return r;
}
}  // namespace

TEST(Orepa1x1, SqueezeIsOriginPlusLowRankProduct) {
  for (auto [i, o] : {std::pair{8, 16}, std::pair{16, 8}}) {
    OREPA_1x1<double> block(ConvOptions(i, o, 1).seed(2));
    // Identity rule: O > I -> T = I, conv1 = eye; else T = O, conv2 = eye.
    const auto& c1 = block.param("weight_or1x1_l2i_conv1").value;
    const auto& c2 = block.param("weight_or1x1_l2i_conv2").value;
    const std::int64_t T = o > i ? i : o;
    EXPECT_EQ(c1.sizes(), (Shape{T, i, 1, 1}));
    const auto& eye = o > i ? c1 : c2;
    for (std::int64_t t = 0; t < T; ++t) EXPECT_EQ(eye[t * eye.size(1) + t], 1.0);
    Rng rng(3);
    test::randomise(block, rng);
    const auto& v = block.param("vector").value;
    const auto& orig = block.param("weight_or1x1_origin").value;
    auto w = block.squeeze();
    for (std::int64_t a = 0; a < o; ++a)
      for (std::int64_t b = 0; b < i; ++b) {
        double lr = 0;
        for (std::int64_t t = 0; t < T; ++t) lr += c2[a * T + t] * c1[t * i + b];
        EXPECT_NEAR(w[a * i + b], orig[a * i + b] * v(0, a) + lr * v(1, a), 1e-12);
      }
  }
}

TEST(Orepa1x1, GradientsAndDeploy) {
  OREPA_1x1<double, SiLU> block(ConvOptions(4, 6, 1).stride(2));
  gradient_check(block, 4, 6, 5);
  OREPA_1x1<float, SiLU> f(ConvOptions(8, 4, 1));
  Rng rng(1);
  test::randomise(f, rng);
  auto x = random_tensor<float>({2, 8, 9, 9}, rng);
  test::expect_close(f.deploy().forward(x), f.forward_eval(x), 1e-5, "OREPA_1x1 deploy vs eval");
  EXPECT_THROW(OREPA_1x1<float>(ConvOptions(4, 4, 3)), config_error);
  EXPECT_THROW(OREPA_1x1<float>(ConvOptions(4, 4, 1).groups(2)), config_error);
}

// With zero padding, the composed kernel applied once equals the layers applied in
// sequence with W_1.. flipped (SPEC section 3: the reference composes by cross-correlation).
TEST(LargeConv, ComposedKernelEqualsSequentialLayersWithFlips) {
  for (std::int64_t k : {5, 7}) {
    OREPA_LargeConv<double> block(ConvOptions(3, 4, k).padding(0).seed(4));
    Rng rng(6);
    test::randomise(block, rng);
    auto x = random_tensor<double>({1, 3, 12, 12}, rng);
    ConvGeometry g0;
    g0.in_channels = 3, g0.out_channels = 4, g0.kernel = 3;
    auto y = reference::conv2d(x, block.layers()[0].squeeze(), g0);
    for (std::size_t j = 1; j < block.layers().size(); ++j) {
      ConvGeometry gj = g0;
      gj.in_channels = 4;
      y = reference::conv2d(y, flipped(block.layers()[j].squeeze()), gj);
    }
    test::expect_close(reference::conv2d(x, block.squeeze(), block.geometry()), y, 1e-10,
                       "LargeConv k" + std::to_string(k));
  }
}

TEST(LargeConv, NamesGradientsDeployAndGroups) {
  OREPA_LargeConv<double, ReLU> block(ConvOptions(2, 3, 7).stride(2));
  EXPECT_EQ(block.layers().size(), 3u);
  EXPECT_EQ(block.param("weight0.weight_orepa_origin").value.sizes(), (Shape{3, 2, 3, 3}));
  EXPECT_EQ(block.param("weight2.weight_orepa_gconv_pw").value.sizes(), (Shape{3, 24, 1, 1}));
  EXPECT_EQ(block.param("bn.weight").value.sizes(), (Shape{3}));
  gradient_check(block, 2, 9, 7);
  OREPA_LargeConv<float, SiLU> f(ConvOptions(3, 8, 5));
  Rng rng(1);
  test::randomise(f, rng);
  auto x = random_tensor<float>({2, 3, 11, 11}, rng);
  test::expect_close(f.deploy().forward(x), f.forward_eval(x), 1e-5, "LargeConv deploy vs eval");
  EXPECT_THROW(OREPA_LargeConv<float>(ConvOptions(4, 4, 7).groups(2)), config_error);
  EXPECT_THROW(OREPA_LargeConv<float>(ConvOptions(4, 4, 1)), config_error);
}

TEST(YoloConv, PicksTheReferenceBlockByKernelSize) {
  auto c1 = yolo_conv<float>(ConvOptions(8, 16, 1));
  auto c3 = yolo_conv<float>(ConvOptions(8, 16, 3).stride(2));
  auto c7 = yolo_conv<float>(ConvOptions(3, 16, 7).stride(2));
  EXPECT_EQ(c1.type_name(), "OREPA_1x1");
  EXPECT_EQ(c3.type_name(), "OREPA");
  EXPECT_EQ(c7.type_name(), "OREPA_LargeConv");
  EXPECT_NE((c3.target<OREPA<float, SiLU>>()), nullptr);
  EXPECT_EQ(c3.geometry().padding, 1);
  EXPECT_EQ(c7.geometry().padding, 3);
  EXPECT_EQ(yolo_conv<float>(ConvOptions(8, 8, 3).dilation(2)).geometry().padding, 2);  // autopad with dilation
  Tensor<float> x({2, 3, 32, 32}, 0.5f);
  EXPECT_EQ(c7.forward_train(x).sizes(), (Shape{2, 16, 16, 16}));
  EXPECT_THROW(yolo_conv<float>(ConvOptions(3, 32, 6).stride(2)), config_error);
}

namespace {
// A user branch defined outside the library: a learnable per-(o, i) centre tap times a
// fixed "plus" stencil.
class PlusStencil final : public SimpleBranch<double> {
 public:
  PlusStencil(const ConvGeometry& g) : w_(Tensor<double>({g.out_channels, g.in_per_group()})) {}
  void kernel(TensorView<double> out) const override {
    const auto k = out.size(2), c = k / 2;
    for (std::int64_t p = 0; p < w_.value.numel(); ++p)
      for (auto [h, w] : {std::pair{c, c}, {c - 1, c}, {c + 1, c}, {c, c - 1}, {c, c + 1}})
        out[p * k * k + h * k + w] += w_.value[p];
  }
  void kernel_backward(ConstTensorView<double> dk) override {
    const auto k = dk.size(2), c = k / 2;
    for (std::int64_t p = 0; p < w_.value.numel(); ++p)
      for (auto [h, w] : {std::pair{c, c}, {c - 1, c}, {c + 1, c}, {c, c - 1}, {c, c + 1}})
        w_.grad[p] += dk[p * k * k + h * k + w];
  }
  void collect_tensors(NamedParams<double>& out, const std::string& prefix) override {
    out.emplace_back(prefix + "weight_plus", &w_);
  }
  double initial_scale() const override { return 1.0; }

 private:
  Param<double> w_;
};
}  // namespace

TEST(CustomBlock, UserBranchSqueezesAndTrains) {
  const auto g = OrepaOptions(3, 4, 3).groups(1).geometry();
  Rng rng(2);
  BranchList<double> list = make_orepa_branches<double>(g, 0, rng);
  list.push_back(std::make_unique<PlusStencil>(g));
  OnlineBlock<double, SiLU> block(g, std::move(list), "OREPA+plus");
  EXPECT_EQ(block.scales().value.sizes(), (Shape{7, 4}));
  Rng r2(4);
  test::randomise(block, r2);
  // Squeeze = the six OREPA rows + v6 * plus stencil.
  OREPA<double> plain(OrepaOptions(3, 4, 3));
  for (auto& [n, p] : plain.named_parameters()) p->value = block.param(n).value;
  for (auto& [n, p] : plain.named_buffers()) p->value = block.param(n).value;
  plain.param("vector").value = Tensor<double>({6, 4});
  for (std::int64_t j = 0; j < 24; ++j) plain.param("vector").value[j] = block.scales().value[j];
  auto w = block.squeeze(), w6 = plain.squeeze();
  const auto& pw = block.param("weight_plus").value;
  for (std::int64_t o = 0; o < 4; ++o)
    for (std::int64_t i = 0; i < 3; ++i)
      for (std::int64_t h = 0; h < 3; ++h)
        for (std::int64_t x = 0; x < 3; ++x) {
          const bool on = (h == 1 || x == 1);
          EXPECT_NEAR(w(o, i, h, x), w6(o, i, h, x) + (on ? block.scales().value(6, o) * pw(o, i) : 0.0), 1e-12);
        }
  gradient_check(block, 3, 6, 9);
}

TEST(RepVGG, PathsDeployAndGradients) {
  RepVGGBlock_OREPA<double, ReLU> with_id(RepVGGOptions(4, 4, 3));
  EXPECT_TRUE(with_id.has_identity());
  EXPECT_EQ(with_id.param("rbr_dense.vector").value.sizes(), (Shape{6, 4}));
  for (std::int64_t o = 0; o < 4; ++o) EXPECT_EQ(with_id.param("rbr_dense.vector").value(5, o), 0.0);
  EXPECT_EQ(with_id.param("rbr_dense.weight_rbr_gconv_pw").value.sizes(), (Shape{4, 32, 1, 1}));
  EXPECT_EQ(with_id.param("rbr_1x1.conv.weight").value.sizes(), (Shape{4, 4, 1, 1}));
  EXPECT_EQ(with_id.param("rbr_identity.running_var").value.sizes(), (Shape{4}));
  RepVGGBlock_OREPA<double, SiLU> strided(RepVGGOptions(4, 6, 3).stride(2));
  EXPECT_FALSE(strided.has_identity());
  EXPECT_EQ(strided.param("rbr_dense.vector").value.sizes(), (Shape{5, 6}));
  gradient_check(with_id, 4, 6, 3);
  gradient_check(strided, 4, 7, 4);
  // Eval = explicit sum of the three paths; deploy = eval.
  Rng rng(5);
  test::randomise(with_id, rng);
  auto x = random_tensor<double>({2, 4, 7, 7}, rng);
  // The paths by hand: conv(x, dense kernel) -> BN, conv1x1 -> BN, BN(x).
  auto bn_eval = [](const BatchNorm2d<double>& bn, const Tensor<double>& y) {
    Tensor<double> z;
    bn.forward_eval(y, z);
    return z;
  };
  const auto bns = with_id.batch_norms();
  const auto g1 = ConvGeometry{4, 4, 1, 1, 0, 1, 1};
  Tensor<double> sum = bn_eval(*bns[0], reference::conv2d(x, with_id.squeeze(), with_id.geometry())),
                 one = bn_eval(*bns[1], reference::conv2d(x, with_id.param("rbr_1x1.conv.weight").value, g1)),
                 id = bn_eval(*bns[2], x);
  for (std::int64_t j = 0; j < sum.numel(); ++j) sum[j] = std::max(0.0, sum[j] + one[j] + id[j]);
  test::expect_close(with_id.forward_eval(x), sum, 1e-12, "RepVGG eval vs three paths");
  test::expect_close(with_id.deploy().forward(x), sum, 1e-10, "RepVGG deploy vs three paths");
  RepVGGBlock_OREPA<float, ReLU> f(RepVGGOptions(8, 8, 3));
  Rng r2(6);
  test::randomise(f, r2);
  auto xf = random_tensor<float>({2, 8, 9, 9}, r2);
  test::expect_close(f.deploy().forward(xf), f.forward_eval(xf), 1e-5, "RepVGG float deploy vs eval");
  EXPECT_THROW(RepVGGBlock_OREPA<float>(RepVGGOptions(4, 4, 5)), config_error);
  EXPECT_THROW(RepVGGBlock_OREPA<float>(RepVGGOptions(4, 4, 3).groups(2)), config_error);
}
