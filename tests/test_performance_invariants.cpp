// Steady-state invariants behind the performance work (no timing assertions here, ever):
// after a warm-up step, training steps and deployed forwards create no oneDNN primitive,
// allocate no oneDNN memory and allocate no tensor-sized heap buffer.
//
// Heap buffers are counted by replacing the global operator new in this test binary:
// every allocation of at least kBufferBytes counts. Smaller ones (shape vectors, argument
// bookkeeping) are not buffers and are not counted.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>

#include "orepa/blocks/conv_bn.hpp"
#include "orepa/blocks/dbb.hpp"
#include "orepa/blocks/orepa.hpp"
#include "orepa/blocks/repvgg.hpp"
#include "orepa/deploy/onednn_interop.hpp"
#include "test_util.hpp"

namespace {
constexpr std::size_t kBufferBytes = 4096;
std::atomic<std::int64_t> g_buffer_allocations{0};

void* counted_alloc(std::size_t n) {
  if (n >= kBufferBytes) g_buffer_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
}  // namespace

void* operator new(std::size_t n) { return counted_alloc(n); }
void* operator new[](std::size_t n) { return counted_alloc(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace orepa {
namespace {

/// Everything that must stay constant in a steady state.
struct Counters {
  std::int64_t primitives, onednn_buffers, gemms, heap_buffers;
  bool operator==(const Counters& o) const {
    return primitives == o.primitives && onednn_buffers == o.onednn_buffers && gemms == o.gemms &&
           heap_buffers == o.heap_buffers;
  }
};
std::ostream& operator<<(std::ostream& os, const Counters& c) {
  return os << "{primitives " << c.primitives << ", oneDNN buffers " << c.onednn_buffers << ", matmuls " << c.gemms
            << ", heap buffers >= " << kBufferBytes << " B: " << c.heap_buffers << "}";
}
template <class F>
Counters counters(F&& primitive_count) {
  return {primitive_count(), engine::memory_allocations(), engine::gemm_creations(), g_buffer_allocations.load()};
}


/// Two warm-up steps, then five steps that must leave every counter unchanged (with
/// `heap` false, every counter but the heap buffers).
template <class Block>
void expect_steady_training(Block& block, const Shape& x_shape, bool heap = true) {
  Rng rng(3);
  const auto x = test::random_tensor<float>(x_shape, rng);
  const auto dy = test::random_tensor<float>(block.geometry().output_shape(x_shape, "test"), rng);
  auto step = [&] {
    block.forward_train(x);
    block.backward(dy);
  };
  step();
  step();
  const auto count = [&] { return block.primitive_creations(); };
  Counters before = counters(count);
  for (int i = 0; i < 5; ++i) step();
  Counters after = counters(count);
  if (!heap) before.heap_buffers = after.heap_buffers = 0;
  EXPECT_EQ(after, before);
}

TEST(PerformanceInvariants, OrepaTrainingStepAllocatesNothingAfterWarmUp) {
  OREPA<float, SiLU> block(OrepaOptions(16, 16, 3).seed(1));
  expect_steady_training(block, {2, 16, 24, 24});
  EXPECT_EQ(block.primitive_creations(), 1);  // one fused pipeline for the one shape
}

TEST(PerformanceInvariants, OrepaGroupedStridedReluStepAllocatesNothingAfterWarmUp) {
  OREPA<float, ReLU> block(OrepaOptions(16, 32, 3).stride(2).groups(2).seed(2));
  expect_steady_training(block, {2, 16, 24, 24});
}

TEST(PerformanceInvariants, ConvBNTrainingStepAllocatesNothingAfterWarmUp) {
  ConvBN<float, SiLU> block(ConvOptions(16, 16, 3).seed(1));
  expect_steady_training(block, {2, 16, 24, 24});
}

TEST(PerformanceInvariants, RepVGGTrainingStepCreatesNoPrimitiveOrOneDnnBufferAfterWarmUp) {
  RepVGGBlock_OREPA<float, SiLU> block(RepVGGOptions(16, 16, 3).seed(1));
  expect_steady_training(block, {2, 16, 24, 24}, false);
}

TEST(PerformanceInvariants, RepVGGTrainingStepAllocatesNoHeapBufferAfterWarmUp) {
  RepVGGBlock_OREPA<float, SiLU> block(RepVGGOptions(16, 16, 3).seed(1));
  expect_steady_training(block, {2, 16, 24, 24});
}

TEST(PerformanceInvariants, DBBTrainingStepAllocatesNothingAfterWarmUp) {
  DBB<float, SiLU> block(DbbOptions(16, 16, 3).seed(1));
  expect_steady_training(block, {2, 16, 24, 24});
}

TEST(PerformanceInvariants, SqueezeAndAdjointAllocateNothingAfterWarmUp) {
  OREPA<float, SiLU> block(OrepaOptions(16, 16, 3).groups(2).seed(4));
  Rng rng(5);
  Tensor<float> w;
  const auto dw = test::random_tensor<float>(block.geometry().weight_shape(), rng);
  auto& source = block.source();
  source.squeeze_into(w);
  source.squeeze_backward(dw);
  const auto count = [&] { return std::int64_t(0); };
  const Counters before = counters(count);
  for (int i = 0; i < 5; ++i) {
    source.squeeze_into(w);
    source.squeeze_backward(dw);
  }
  EXPECT_EQ(counters(count), before);
}

// The fast squeeze (oneDNN matmuls in float, Eigen in double) agrees between the two
// scalar types, including grouped blocks with the PW row permutation and T = 2I.
TEST(PerformanceInvariants, FloatSqueezeAndAdjointMatchDouble) {
  for (auto opts : {OrepaOptions(8, 12, 3).groups(2), OrepaOptions(8, 8, 3).groups(8), OrepaOptions(6, 12, 5)}) {
    OREPA<float> f(opts.seed(21));
    OREPA<double> d(opts.seed(21));
    Rng rng(22);
    test::randomise(d, rng);
    test::copy_tensors(d, f);
    test::expect_close(f.squeeze(), d.squeeze(), 1e-5, "squeeze");
    const auto dw = test::random_tensor<double>(d.geometry().weight_shape(), rng);
    f.zero_grad();
    d.zero_grad();
    f.source().squeeze_backward(dw.cast<float>());
    d.source().squeeze_backward(dw);
    const auto fp = f.named_parameters();
    const auto dp = d.named_parameters();
    for (std::size_t j = 0; j < fp.size(); ++j)
      test::expect_close(fp[j].second->grad, dp[j].second->grad, 1e-4, dp[j].first + " grad");
  }
}

TEST(PerformanceInvariants, DeployedForwardAllocatesNothingAfterWarmUp) {
  OREPA<float, SiLU> block(OrepaOptions(16, 16, 3).seed(6));
  const auto deployed = block.deploy();
  Rng rng(7);
  const Shape xs{2, 16, 24, 24};
  const auto x = test::random_tensor<float>(xs, rng);
  Tensor<float> y;
  deployed.forward(x, y);
  // The blocked-layout API on memory already in the primitive's layouts.
  dnnl::memory src = engine::allocate(src_desc(deployed, xs)), dst = engine::allocate(dst_desc(deployed, xs));
  engine::to_layout(x, src);
  forward(deployed, src, dst);
  Tensor<float> y_blocked;
  engine::from_layout(dst, y_blocked);
  test::expect_close(y_blocked, y, 1e-6, "blocked API vs NCHW API");

  const auto count = [&] { return deployed.primitive_creations(); };
  const Counters before = counters(count);
  for (int i = 0; i < 5; ++i) {
    deployed.forward(x, y);
    forward(deployed, src, dst);
  }
  EXPECT_EQ(counters(count), before);
  EXPECT_EQ(deployed.primitive_creations(), 1);  // both APIs share the primitive of the shape
}

// Channels-last (NHWC) tensors in and out give the NCHW numbers, in every pairing of
// layouts and under both layout policies, and allocate nothing after warm-up.
TEST(PerformanceInvariants, DeployedForwardOnChannelsLastMatchesNchwAndAllocatesNothing) {
  OREPA<float, SiLU> block(OrepaOptions(16, 24, 3).stride(2).seed(16));
  Rng rng(17);
  test::randomise(block, rng);
  const Shape xs{2, 16, 23, 21};
  const auto x = test::random_tensor<float>(xs, rng);
  const auto x_cl = x.to(MemoryFormat::channels_last);
  const Tensor<float> want = block.forward_eval(x);
  test::expect_close(block.forward_eval(x_cl), want, 1e-6, "eval forward of a channels-last input");

  for (auto policy : {DeployLayout::automatic, DeployLayout::plain}) {
    auto deployed = block.deploy();
    deployed.layout(policy);
    const std::string what = policy == DeployLayout::plain ? "plain policy: " : "automatic policy: ";
    Tensor<float> y_cl;
    deployed.forward(x_cl, y_cl);
    EXPECT_EQ(y_cl.memory_format(), MemoryFormat::channels_last);
    test::expect_close(y_cl, want, 1e-5, what + "NHWC in, NHWC out");
    Tensor<float> y_nchw(want.sizes());
    deployed.forward(x_cl, TensorView<float>(y_nchw));
    test::expect_close(y_nchw, want, 1e-5, what + "NHWC in, NCHW out");
    Tensor<float> y_mixed(want.sizes(), MemoryFormat::channels_last);
    deployed.forward(x, TensorView<float>(y_mixed));
    test::expect_close(y_mixed, want, 1e-5, what + "NCHW in, NHWC out");
    test::expect_close(deployed.forward(x), want, 1e-5, what + "NCHW in, NCHW out");
    // The automatic policy runs one primitive for every layout; the plain one runs one
    // on each caller layout.
    EXPECT_EQ(deployed.primitive_creations(), policy == DeployLayout::plain ? 2 : 1) << what;

    const auto count = [&] { return deployed.primitive_creations(); };
    const Counters before = counters(count);
    for (int i = 0; i < 5; ++i) deployed.forward(x_cl, y_cl);
    EXPECT_EQ(counters(count), before) << what;
  }
}

TEST(PerformanceInvariants, DeployedChainKeepsBlockedActivationsAndAllocatesNothingAfterWarmUp) {
  Rng rng(8);
  std::vector<DeployedConv<float>> convs;
  std::vector<DeployedConv<float>> reference;
  for (auto opts : {OrepaOptions(3, 16, 3).stride(2), OrepaOptions(16, 16, 3), OrepaOptions(16, 24, 1)}) {
    OREPA<float, SiLU> b(opts.seed(9));
    test::randomise(b, rng);
    convs.push_back(b.deploy());
    reference.push_back(b.deploy());
  }
  const DeployedChain chain(std::move(convs));
  const auto x = test::random_tensor<float>({2, 3, 33, 31}, rng);
  Tensor<float> y;
  chain.forward(x, y);
  Tensor<float> want = x;
  for (const auto& c : reference) want = c.forward(want);
  test::expect_close(y, want, 1e-5, "chain vs one conv at a time");

  const auto count = [&] { return chain.primitive_creations(); };
  const Counters before = counters(count);
  for (int i = 0; i < 5; ++i) chain.forward(x, y);
  EXPECT_EQ(counters(count), before);
}

}  // namespace
}  // namespace orepa
