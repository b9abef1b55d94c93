// Every branch against its own definition, in double: the scaled squeeze adds exactly
// v[o] * K[o], and its adjoint passes the dot-product test parameter by parameter
// (<v * A_i(d), G> == <d, A_i^T(G)> with A_i the kernel's linear dependence on parameter
// i, measured as K(p + d) - K(p)), with dv[o] = <G[o], K[o]>. Also the block concept:
// every block type models it.
#include <string>
#include <vector>

#include "test_util.hpp"

using namespace orepa;
using test::random_tensor;

namespace {

double dot(const Tensor<double>& a, const Tensor<double>& b) {
  double s = 0;
  for (std::int64_t j = 0; j < a.numel(); ++j) s += a[j] * b[j];
  return s;
}

// The squeeze contract and the adjoint test of one branch built for geometry `g`.
void check_branch(Branch<double>& b, const ConvGeometry& g, const std::string& what) {
  SCOPED_TRACE(what);
  Rng rng(7);
  NamedParams<double> tensors;
  b.collect_tensors(tensors, "");
  for (auto& [n, p] : tensors)
    if (p->trainable()) fill_uniform(p->value, 1.0, rng);  // zero-initialised ones (idconv1) too
  const Tensor<double> K = branch_kernel(b, g);
  ASSERT_EQ(K.sizes(), g.weight_shape());
  const std::int64_t O = g.out_channels, per = K.numel() / O;
  const auto v = random_tensor<double>({O}, rng), G = random_tensor<double>(g.weight_shape(), rng);

  // add_scaled_kernel accumulates v[o] * K[o].
  const auto W0 = random_tensor<double>(g.weight_shape(), rng);
  Tensor<double> W = W0;
  b.add_scaled_kernel(W, v.data(), &eigen_gemm<double>);
  double err = 0;
  for (std::int64_t j = 0; j < W.numel(); ++j) err = std::max(err, std::abs(W[j] - W0[j] - v[j / per] * K[j]));
  EXPECT_LE(err, 1e-12) << "add_scaled_kernel";

  // The adjoint: every parameter's gradient, and dv.
  for (auto& [n, p] : tensors) p->zero_grad();
  const auto dv0 = random_tensor<double>({O}, rng);
  Tensor<double> dv = dv0;
  b.scaled_kernel_backward(G, v.data(), dv.data(), &eigen_gemm<double>);
  for (std::int64_t o = 0; o < O; ++o) {
    double want = 0;
    for (std::int64_t j = o * per; j < (o + 1) * per; ++j) want += G[j] * K[j];
    EXPECT_NEAR(dv[o] - dv0[o], want, 1e-10 * (1 + std::abs(want))) << "dv[" << o << "]";
  }
  int checked = 0;
  for (auto& [n, p] : tensors) {
    if (!p->trainable()) {
      EXPECT_TRUE(p->grad.empty()) << n << " is a buffer";
      continue;
    }
    const Tensor<double> keep = p->value, d = random_tensor<double>(p->value.sizes(), rng);
    for (std::int64_t j = 0; j < d.numel(); ++j) p->value[j] += d[j];
    Tensor<double> lin = branch_kernel(b, g);  // A_i(d) = K(p + d) - K(p): K is affine in each parameter
    p->value = keep;
    for (std::int64_t j = 0; j < lin.numel(); ++j) lin[j] = v[j / per] * (lin[j] - K[j]);
    const double lhs = dot(lin, G), rhs = dot(d, p->grad);
    EXPECT_NEAR(lhs, rhs, 1e-10 * (1 + std::abs(lhs))) << "<v A(d), G> vs <d, A^T G> for " << n;
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

ConvGeometry geometry(std::int64_t i, std::int64_t o, std::int64_t k, std::int64_t groups = 1) {
  return ConvGeometry{i, o, k, 1, k / 2, 1, groups};
}

// A user branch through SimpleBranch: a centre tap times a "plus" stencil.
class Plus final : public SimpleBranch<double> {
 public:
  explicit Plus(const ConvGeometry& g) : w_(Tensor<double>({g.out_channels, g.in_per_group()})) {}
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

TEST(Branches, EveryOrepaBranchPassesTheAdjointTest) {
  using namespace branches;
  Rng rng(1);
  const Init init{};
  for (auto g : {geometry(4, 6, 3), geometry(4, 6, 3, 2), geometry(6, 6, 5, 3), geometry(8, 8, 3, 8)}) {
    const std::string at = " (" + std::to_string(g.in_channels) + "->" + std::to_string(g.out_channels) + " k" +
                           std::to_string(g.kernel) + " g" + std::to_string(g.groups) + ")";
    Origin<double> origin(g, "orepa", init, rng);
    check_branch(origin, g, "Origin" + at);
    Avg<double> avg(g, "orepa", init, rng);
    check_branch(avg, g, "Avg" + at);
    Prior<double> prior(g, "orepa", init, rng);
    check_branch(prior, g, "Prior" + at);
    OneByOneKxk<double> kxk_id(g, "orepa", g.in_channels, true, init, rng);
    check_branch(kxk_id, g, "OneByOneKxk identity-based, T = I" + at);
    OneByOneKxk<double> kxk_wide(g, "orepa", 2 * g.in_channels, false, init, rng);
    check_branch(kxk_wide, g, "OneByOneKxk free conv1, T = 2I" + at);
    OneByOne<double> one(g, "orepa", init, rng);
    check_branch(one, g, "OneByOne" + at);
    DepthwiseSeparable<double> dw(g, "orepa", init, rng);
    check_branch(dw, g, "DepthwiseSeparable" + at);
  }
  for (auto g : {geometry(4, 6, 1), geometry(6, 4, 1)}) {  // O > I: conv1 = eye; else conv2 = eye
    LowRankIdentity<double> low(g, init, rng);
    check_branch(low, g, "LowRankIdentity " + std::to_string(g.in_channels) + "->" + std::to_string(g.out_channels));
  }
  const auto g = geometry(3, 4, 3);
  Plus plus(g);
  check_branch(plus, g, "a user SimpleBranch");
}

// The oneDNN matmul the float blocks pass in computes what Eigen computes.
TEST(Branches, FloatWithTheOnednnGemmMatchesDouble) {
  using namespace branches;
  const auto g = geometry(8, 12, 3, 2);
  Rng rf(3), rd(3);
  DepthwiseSeparable<float> f(g, "orepa", Init{}, rf);
  DepthwiseSeparable<double> d(g, "orepa", Init{}, rd);
  NamedParams<float> tf;
  NamedParams<double> td;
  f.collect_tensors(tf, "");
  d.collect_tensors(td, "");
  Rng rng(4);
  for (std::size_t j = 0; j < td.size(); ++j) {
    fill_uniform(td[j].second->value, 1.0, rng);
    tf[j].second->value = td[j].second->value.cast<float>();
  }
  const auto v = random_tensor<double>({12}, rng);
  const auto vf = v.cast<float>();
  Tensor<float> wf(g.weight_shape());
  Tensor<double> wd(g.weight_shape());
  f.add_scaled_kernel(wf, vf.data(), engine::fast_gemm<float>());
  d.add_scaled_kernel(wd, v.data(), engine::fast_gemm<double>());
  test::expect_close(wf, wd, 1e-5, "DW-separable kernel, oneDNN vs Eigen");
}

// The block concept (blocks/block.hpp), modelled by every block type and a user's block.
static_assert(is_block<OREPA<float, SiLU>, float>::value && is_block<OREPA<double>, double>::value);
static_assert(is_block<OREPA_1x1<float, ReLU>, float>::value);
static_assert(is_block<OREPA_LargeConv<float>, float>::value);
static_assert(is_block<RepVGGBlock_OREPA<float>, float>::value);
static_assert(is_block<ConvBN<double, SiLU>, double>::value);
static_assert(is_block<DBB<float, SiLU>, float>::value);
static_assert(is_block<OnlineBlock<float, SiLU>, float>::value);
static_assert(!is_block<OREPA<float>, double>::value, "a block is a block of its own scalar");
static_assert(is_layer<AnyBlock<double>, double>::value && !is_block<AnyBlock<float>, float>::value,
              "the holder is a layer; its conv members are checked at run time");

TEST(AnyBlock, HoldsBlocksAndLayersWithTheConvMembersOnlyForBlocks) {
  AnyBlock<double> conv = OREPA<double, SiLU>(OrepaOptions(2, 4, 3).seed(1));
  AnyBlock<double> head = Linear<double>(4, 3);
  EXPECT_TRUE(conv.is_conv());
  EXPECT_FALSE(head.is_conv());
  EXPECT_EQ(conv.geometry().out_channels, 4);
  const auto* o = conv.target<OREPA<double, SiLU>>();
  ASSERT_NE(o, nullptr);
  const auto f = conv.folded(), direct = o->folded();
  EXPECT_EQ(max_abs_diff(f.weight, direct.weight), 0.0);
  EXPECT_EQ((conv.target<ConvBN<double, SiLU>>()), nullptr);
  EXPECT_THROW((void)head.geometry(), config_error);
  EXPECT_THROW((void)head.folded(), config_error);
  EXPECT_EQ(head.type_name(), "Linear");
  EXPECT_EQ(head.named_parameters("fc.").front().first, "fc.weight");
}

// Training on a channels-last input gives the NCHW outputs and gradients, for a block on
// the fused trunk, one of paths and one of separate conv + BN.
template <class Block>
void channels_last_trains_like_nchw(typename Block::Options opts, const std::string& what) {
  Block a(opts), b(opts);
  Rng rng(41);
  const auto x = random_tensor<double>({2, 4, 7, 6}, rng);
  const auto& ya = a.forward_train(x);
  test::expect_close(b.forward_train(x.to(MemoryFormat::channels_last)), ya, 1e-12, what + " output");
  const auto g = random_tensor<double>(ya.sizes(), rng);
  const auto& dxa = a.backward(g);
  test::expect_close(b.backward(g.to(MemoryFormat::channels_last)), dxa, 1e-12, what + " input gradient");
  const auto pa = a.named_parameters(), pb = b.named_parameters();
  for (std::size_t j = 0; j < pa.size(); ++j)
    test::expect_close(pb[j].second->grad, pa[j].second->grad, 1e-12, what + " " + pa[j].first);
}

// Float blocks on the fused pipeline keep a channels-last input's layout: every
// primitive runs on NHWC, and the output and input gradient come back channels-last with
// the NCHW run's values; set_input_grad(false) leaves the input gradient out only.
template <class Block>
void float_trains_on_nhwc(typename Block::Options opts, const std::string& what) {
  Block a(opts), b(opts);
  Rng rng(43);
  const auto x = random_tensor<float>({3, 4, 9, 7}, rng);
  const Tensor<float> ya = a.forward_train(x);
  const Tensor<float> yb = b.forward_train(x.to(MemoryFormat::channels_last));
  EXPECT_EQ(yb.memory_format(), MemoryFormat::channels_last) << what;
  EXPECT_LT(max_abs_diff(yb, ya), 1e-5) << what << " output";
  const auto g = random_tensor<float>(ya.sizes(), rng);
  const Tensor<float> dxa = a.backward(g);
  const Tensor<float> dxb = b.backward(g.to(MemoryFormat::channels_last));
  EXPECT_EQ(dxb.memory_format(), MemoryFormat::channels_last) << what;
  EXPECT_LT(max_abs_diff(dxb, dxa), 1e-5) << what << " input gradient";
  const auto pa = a.named_parameters(), pb = b.named_parameters();
  std::vector<Tensor<float>> grads;
  for (std::size_t j = 0; j < pa.size(); ++j) {
    EXPECT_LT(max_abs_diff(pb[j].second->grad, pa[j].second->grad), 1e-4) << what << " " << pa[j].first;
    grads.push_back(pb[j].second->grad);
  }
  b.set_input_grad(false);
  b.zero_grad();
  b.forward_train(x.to(MemoryFormat::channels_last));
  EXPECT_TRUE(b.backward(g.to(MemoryFormat::channels_last)).empty()) << what;
  for (std::size_t j = 0; j < pb.size(); ++j)
    EXPECT_EQ(max_abs_diff(pb[j].second->grad, grads[j]), 0.0) << what << " " << pb[j].first;
}

TEST(AnyBlock, FloatBlocksTrainOnNhwcWithoutReorders) {
  float_trains_on_nhwc<OREPA<float, SiLU>>(OrepaOptions(4, 6, 3).seed(2), "OREPA");
  float_trains_on_nhwc<ConvBN<float, ReLU>>(ConvOptions(4, 5, 3).stride(2).seed(5), "ConvBN");
  float_trains_on_nhwc<ConvBN<float>>(ConvOptions(4, 5, 1).seed(6), "ConvBN identity");
}

TEST(AnyBlock, ChannelsLastInputTrainsLikeNchw) {
  channels_last_trains_like_nchw<OREPA<double, SiLU>>(OrepaOptions(4, 6, 3).seed(2), "OREPA");
  channels_last_trains_like_nchw<RepVGGBlock_OREPA<double>>(RepVGGOptions(4, 4, 3).seed(3), "RepVGG");
  channels_last_trains_like_nchw<DBB<double, ReLU>>(DbbOptions(4, 6, 3).seed(4), "DBB");
}
