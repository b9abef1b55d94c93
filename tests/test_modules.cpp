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
