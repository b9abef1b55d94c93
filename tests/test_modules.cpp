// Tests of the module layer's ownership rules (issue 23): results that stay valid while
// the user holds them, tensors that copy deeply unless aliased on purpose.
#include <gtest/gtest.h>

#include <vector>

#include "test_util.hpp"

using namespace orepa;
using orepa::test::random_tensor;

namespace {

Sequential<float> small_net() {
  Sequential<float> net;
  net.add(ConvBN<float, SiLU>(ConvOptions(3, 8, 3).seed(1)));
  net.add(OREPA<float, SiLU>(OrepaOptions(8, 8, 3).seed(2)));
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(8, 4, 3));
  return net;
}

}  // namespace

TEST(TensorStorage, CopiesAreDeepAndAliasesShareUntilAWholeTensorWrite) {
  Tensor<float> a({2, 3}, 1.f);
  Tensor<float> copy = a;
  copy[0] = 5.f;
  EXPECT_EQ(a[0], 1.f);  // a copy has storage of its own
  EXPECT_FALSE(a.is_shared());

  Tensor<float> alias = a.alias();
  EXPECT_TRUE(a.is_shared());
  alias[1] = 7.f;
  EXPECT_EQ(a[1], 7.f);  // element writes are seen through every alias

  a.resize({4});  // a whole-tensor write gives `a` storage of its own: the alias keeps its values
  EXPECT_FALSE(a.is_shared());
  EXPECT_EQ(alias.sizes(), (Shape{2, 3}));
  EXPECT_EQ(alias[1], 7.f);
  a.fill(0.f);
  EXPECT_EQ(alias[1], 7.f);

  Tensor<float> b = alias.alias();
  b.zero();  // zero() of a shared tensor: fresh zeros, the other alias unchanged
  EXPECT_EQ(alias[1], 7.f);
  EXPECT_EQ(b[1], 0.f);
  b = copy;  // copy assignment into a tensor nobody else holds reuses its storage
  EXPECT_EQ(b[0], 5.f);
  EXPECT_FALSE(b.is_shared());
}

TEST(ModuleResults, ForwardResultsStayValidWhileHeld) {
  Rng rng(3);
  auto net = small_net();
  const auto a = random_tensor<float>({4, 3, 8, 8}, rng), b = random_tensor<float>({4, 3, 8, 8}, rng);
  const Tensor<float> ya_alone = net.forward_train(a).to(MemoryFormat::contiguous);  // a deep copy of the result
  const Tensor<float> yb_alone = net.forward_train(b).to(MemoryFormat::contiguous);
  ASSERT_GT(max_abs_diff(ya_alone, yb_alone), 1e-3);  // the two inputs give different outputs

  // The libtorch user's line: both results held at once are two different tensors.
  EXPECT_EQ(max_abs_diff(net.forward_train(a), net.forward_train(b)), max_abs_diff(ya_alone, yb_alone));
  const Tensor<float> ya = net.forward_train(a);
  const Tensor<float> yb = net.forward_train(b);
  EXPECT_EQ(max_abs_diff(ya, ya_alone), 0.0);  // ya was not overwritten by the second forward
  EXPECT_EQ(max_abs_diff(yb, yb_alone), 0.0);

  // The same for gradients: a held dL/dx survives the next backward.
  Tensor<float> dy({4, 4}, 0.25f);
  net.forward_train(a);
  const Tensor<float> dxa = net.backward(dy);
  const Tensor<float> dxa_copy = dxa.to(MemoryFormat::contiguous);
  net.forward_train(b);
  const Tensor<float> dxb = net.backward(dy);
  EXPECT_EQ(max_abs_diff(dxa, dxa_copy), 0.0);
  EXPECT_GT(max_abs_diff(dxa, dxb), 1e-6);
}

TEST(ModuleResults, ADroppedResultLetsTheModuleReuseItsBuffer) {
  Rng rng(4);
  OREPA<float, SiLU> block(OrepaOptions(4, 8, 3).seed(5));
  const auto x = random_tensor<float>({2, 4, 6, 6}, rng);
  const float* first = block.forward_train(x).data();
  EXPECT_EQ(block.forward_train(x).data(), first);  // nobody held the result: same buffer
  const Tensor<float> held = block.forward_train(x);
  EXPECT_NE(block.forward_train(x).data(), held.data());  // held: the next forward writes elsewhere
}

namespace {

// clone() of `b` computes what `b` computes and is independent of it afterwards.
template <class Block>
void expect_independent_clone(Block& b, const Shape& x_shape) {
  Rng rng(11);
  orepa::test::randomise(b, rng);
  const auto x = random_tensor<float>(x_shape, rng);
  Block c = b.clone();
  EXPECT_EQ(b.state_dict().names(), c.state_dict().names());
  EXPECT_EQ(max_abs_diff(b.forward_eval(x), c.forward_eval(x)), 0.0) << b.type_name();
  EXPECT_EQ(max_abs_diff(b.forward_train(x), c.forward_train(x)), 0.0) << b.type_name();
  // Training the clone leaves the original alone.
  for (auto* p : c.parameters()) p->value.fill(0.5f);
  EXPECT_GT(max_abs_diff(b.forward_eval(x), c.forward_eval(x)), 1e-4) << b.type_name();
  // b ran forward_train; a clone of it has nothing saved for backward.
  Block fresh = b.clone();
  EXPECT_THROW(fresh.backward(b.forward_eval(x)), state_error) << b.type_name();
}

}  // namespace

TEST(ModuleOwnership, EveryBlockTypeClonesDeeply) {
  {
    OREPA<float, SiLU> b(OrepaOptions(4, 8, 3).seed(1));
    expect_independent_clone(b, {2, 4, 6, 6});
  }
  {
    OREPA_1x1<float, SiLU> b(ConvOptions(4, 8, 1).seed(2));
    expect_independent_clone(b, {2, 4, 6, 6});
  }
  {
    OREPA_LargeConv<float, SiLU> b(ConvOptions(4, 8, 5).seed(3));
    expect_independent_clone(b, {2, 4, 8, 8});
  }
  {
    ConvBN<float, SiLU> b(ConvOptions(4, 8, 3).seed(4));
    expect_independent_clone(b, {2, 4, 6, 6});
  }
  {
    DBB<float, SiLU> b(DbbOptions(4, 8, 3).seed(5));
    expect_independent_clone(b, {2, 4, 6, 6});
  }
  {
    RepVGGBlock_OREPA<float, ReLU> b(RepVGGOptions(8, 8, 3).seed(6));
    expect_independent_clone(b, {2, 8, 6, 6});
  }
  {
    C3<float> b(8, 8, 2, true, 0.5, 7);
    expect_independent_clone(b, {2, 8, 6, 6});
  }
}

TEST(ModuleOwnership, SequentialAddMovesInAndReturnsTheStoredLayer) {
  Sequential<float> net;
  ConvBN<float, SiLU> block(ConvOptions(3, 4, 3).seed(1));
  auto& stored = net.add(std::move(block));
  Linear<float>& head = net.add(Linear<float>(4, 2, 1));
  net.add(GlobalAvgPool<float>());  // more layers: earlier references stay valid
  for (int i = 0; i < 20; ++i) net.add(AnyBlock<float>(GlobalAvgPool<float>()));
  EXPECT_EQ(&stored, (&net.get<ConvBN<float, SiLU>>(0)));
  EXPECT_EQ(&head, &net.get<Linear<float>>(1));
  stored.bn().weight.value.fill(3.f);  // training through the reference trains the network's layer
  EXPECT_EQ(net.state_dict().tensor("0.bn.weight")[0], 3.f);

  Sequential<float> copy = net.clone();
  copy.get<ConvBN<float, SiLU>>(0).bn().weight.value.fill(1.f);
  EXPECT_EQ(net.state_dict().tensor("0.bn.weight")[0], 3.f);
  EXPECT_EQ(copy.size(), net.size());
}

TEST(ModuleOwnership, ABranchWithoutCloneIsAClearError) {
  struct Plain final : SimpleBranch<float> {
    explicit Plain(const ConvGeometry& g) : w(Tensor<float>(g.weight_shape(), 0.1f), ParamKind::kernel) {}
    void kernel(TensorView<float> out) const override { std::copy(w.value.begin(), w.value.end(), out.begin()); }
    void kernel_backward(ConstTensorView<float> g) override {
      for (std::int64_t j = 0; j < g.numel(); ++j) w.grad[j] += g[j];
    }
    void collect_tensors(NamedParams<float>& out, const std::string& prefix) override { out.emplace_back(prefix + "w", &w); }
    double initial_scale() const override { return 1.0; }
    Param<float> w;
  };
  const auto g = OrepaOptions(2, 2, 3).geometry();
  BranchList<float> list;
  list.push_back(std::make_unique<Plain>(g));
  OnlineBlock<float> block(g, std::move(list), "Mine");
  try {
    block.clone();
    FAIL() << "cloning a block with a branch that has no clone() must throw";
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find("Plain"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("clone()"), std::string::npos) << e.what();
  }
}
