// Tensor, geometry and the convolution engine: oneDNN forward / backward-data /
// backward-weights against the naive reference convolution in double.
#include "test_util.hpp"

using namespace orepa;
using test::random_tensor;

TEST(Tensor, ShapeChecksAndErrors) {
  Tensor<float> t({2, 3, 4, 5});
  EXPECT_EQ(t.numel(), 120);
  t(1, 2, 3, 4) = 7;
  EXPECT_EQ(t[119], 7);
  EXPECT_THROW(Tensor<float>({2, -1}), shape_error);
  EXPECT_THROW(Tensor<float>(Shape{1 << 20, 1 << 20, 1 << 20}), config_error);  // 2^60 elements
  try {
    t.expect_shape({2, 3, 4, 6}, "input");
    FAIL();
  } catch (const shape_error& e) {
    EXPECT_NE(std::string(e.what()).find("input: expected shape [2, 3, 4, 6], got [2, 3, 4, 5]"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(t.reshaped({7}), shape_error);
  EXPECT_THROW(Tensor<float>({2, 2}, std::vector<float>(3)), shape_error);
}

TEST(ConvGeometry, RejectsInvalidConfigurations) {
  auto make = [](std::int64_t i, std::int64_t o, std::int64_t k, std::int64_t s, std::int64_t p, std::int64_t d,
                 std::int64_t g) {
    ConvGeometry c;
    c.in_channels = i, c.out_channels = o, c.kernel = k, c.stride = s, c.padding = p, c.dilation = d, c.groups = g;
    return c;
  };
  auto message = [](const ConvGeometry& g) {
    try {
      g.validate("OREPA");
    } catch (const config_error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(message(make(8, 16, 3, 1, 1, 1, 2)), "no error");
  EXPECT_EQ(message(make(8, 16, 4, 1, 1, 1, 1)), "OREPA: kernel_size must be odd, got 4");
  EXPECT_EQ(message(make(8, 16, 0, 1, 1, 1, 1)), "OREPA: kernel_size must be >= 1, got 0");
  EXPECT_EQ(message(make(8, 16, 3, 1, 1, 1, 3)), "OREPA: groups 3 must divide in_channels 8");
  EXPECT_EQ(message(make(8, 12, 3, 1, 1, 1, 8)), "OREPA: groups 8 must divide out_channels 12");
  EXPECT_EQ(message(make(8, 16, 3, 0, 1, 1, 1)), "OREPA: stride must be >= 1, got 0");
  EXPECT_EQ(message(make(8, 16, 3, 1, 1, 0, 1)), "OREPA: dilation must be >= 1, got 0");
  EXPECT_EQ(message(make(8, 16, 3, 1, -2, 1, 1)), "OREPA: padding must be >= 0, got -2");
  EXPECT_EQ(message(make(0, 16, 3, 1, 1, 1, 1)), "OREPA: in_channels must be >= 1, got 0");
  auto g = make(8, 16, 5, 1, 0, 1, 1);
  EXPECT_EQ(g.out_extent(10), 6);
  EXPECT_THROW(g.output_shape({1, 8, 4, 4}, "x"), shape_error);  // smaller than the kernel
  EXPECT_THROW(g.output_shape({1, 7, 9, 9}, "x"), shape_error);  // wrong channels
}

struct ConvCase {
  std::int64_t n, i, o, h, w, k, s, p, d, g;
};

class ConvEngineVsReference : public ::testing::TestWithParam<ConvCase> {};

TEST_P(ConvEngineVsReference, ForwardAndBothBackwardsMatchNaiveDouble) {
  const auto c = GetParam();
  ConvGeometry g;
  g.in_channels = c.i, g.out_channels = c.o, g.kernel = c.k, g.stride = c.s, g.padding = c.p, g.dilation = c.d,
  g.groups = c.g;
  Rng rng(42);
  auto x = random_tensor<double>({c.n, c.i, c.h, c.w}, rng);
  auto w = random_tensor<double>(g.weight_shape(), rng);
  auto y_ref = reference::conv2d(x, w, g);
  auto dy = random_tensor<double>(y_ref.sizes(), rng);
  auto dx_ref = reference::conv2d_backward_data(dy, w, g, x.sizes());
  auto dw_ref = reference::conv2d_backward_weights(x, dy, g);

  engine::ConvEngine<float> eng(g);
  Tensor<float> y, dx, dw;
  const auto xf = x.cast<float>(), wf = w.cast<float>(), dyf = dy.cast<float>();
  for (int rep = 0; rep < 2; ++rep) {  // the second pass reuses the cached primitives
    eng.forward(xf, wf, y);
    eng.backward_data(dyf, wf, x.sizes(), dx);
    eng.backward_weights(xf, dyf, dw);
  }
  EXPECT_EQ(eng.primitive_creations(), 1);
  test::expect_close(y, y_ref, 1e-5, "forward");
  test::expect_close(dx, dx_ref, 1e-5, "backward data");
  test::expect_close(dw, dw_ref, 1e-5, "backward weights");
}

INSTANTIATE_TEST_SUITE_P(Shapes, ConvEngineVsReference,
                         ::testing::Values(ConvCase{2, 8, 16, 10, 10, 3, 1, 1, 1, 1},
                                           ConvCase{2, 8, 12, 9, 11, 3, 2, 1, 1, 2},
                                           ConvCase{1, 16, 16, 12, 12, 5, 1, 4, 2, 8},
                                           ConvCase{3, 6, 6, 7, 7, 1, 1, 0, 1, 6},
                                           ConvCase{2, 4, 8, 13, 13, 7, 2, 3, 1, 1}));

// The naive reference itself against a hand-computed case (2x2 input, 2x2 all-ones kernel).
TEST(ReferenceConv, HandComputed) {
  ConvGeometry g;
  g.in_channels = 1, g.out_channels = 1, g.kernel = 2, g.padding = 1;
  Tensor<double> x({1, 1, 2, 2}, std::vector<double>{1, 2, 3, 4});
  Tensor<double> w({1, 1, 2, 2}, 1.0);
  auto y = reference::conv2d(x, w, g);
  EXPECT_EQ(y.sizes(), (Shape{1, 1, 3, 3}));
  const std::vector<double> want{1, 3, 2, 4, 10, 6, 3, 7, 4};
  for (int j = 0; j < 9; ++j) EXPECT_DOUBLE_EQ(y[j], want[j]);
}

TEST(ConvEngine, ShapeErrorsNameTheTensor) {
  ConvGeometry g;
  g.in_channels = 4, g.out_channels = 8, g.kernel = 3, g.padding = 1;
  engine::ConvEngine<float> eng(g);
  Tensor<float> y;
  try {
    eng.forward(Tensor<float>({1, 3, 8, 8}), Tensor<float>(g.weight_shape()), y);
    FAIL();
  } catch (const shape_error& e) {
    EXPECT_NE(std::string(e.what()).find("[N, 4, H, W], got [1, 3, 8, 8]"), std::string::npos) << e.what();
  }
  EXPECT_THROW(eng.forward(Tensor<float>({1, 4, 8, 8}), Tensor<float>({8, 4, 5, 5}), y), shape_error);
}

TEST(Tensor, ChannelsLastStorageIndexingAndRoundTrip) {
  Rng rng(3);
  const auto x = random_tensor<float>({2, 3, 4, 5}, rng);
  const Tensor<float> cl = x.to(MemoryFormat::channels_last);
  EXPECT_EQ(cl.memory_format(), MemoryFormat::channels_last);
  EXPECT_FALSE(cl.is_contiguous());
  EXPECT_EQ(cl.sizes(), x.sizes());
  for (std::int64_t n = 0; n < 2; ++n)
    for (std::int64_t c = 0; c < 3; ++c)
      for (std::int64_t h = 0; h < 4; ++h)
        for (std::int64_t w = 0; w < 5; ++w) {
          const float want = x[((n * 3 + c) * 4 + h) * 5 + w];
          ASSERT_EQ(cl[((n * 4 + h) * 5 + w) * 3 + c], want);  // NHWC storage
          ASSERT_EQ(cl(n, c, h, w), want);                      // NCHW indices
        }
  const auto back = cl.to(MemoryFormat::contiguous);
  EXPECT_TRUE(back.is_contiguous());
  EXPECT_TRUE(std::equal(back.begin(), back.end(), x.begin()));
  EXPECT_EQ(max_abs_diff(cl, x), 0.0);  // compared by logical index
  EXPECT_GT(max_abs_diff(Tensor<float>(x.sizes(), std::vector<float>(cl.begin(), cl.end())), x), 0.0);

  const auto v = view(cl.data(), x.sizes(), MemoryFormat::channels_last);
  EXPECT_EQ(v(1, 2, 3, 4), x(1, 2, 3, 4));
  Tensor<float> copy;
  copy.assign(v);
  EXPECT_EQ(copy.memory_format(), MemoryFormat::channels_last);
  const auto d = cl.cast<double>();
  EXPECT_EQ(d.memory_format(), MemoryFormat::channels_last);
  EXPECT_EQ(d(1, 0, 2, 3), double(x(1, 0, 2, 3)));

  EXPECT_THROW(cl.reshaped({120}), shape_error);
  EXPECT_THROW(v.reshaped({120}), shape_error);
  EXPECT_THROW(Tensor<float>(Shape{2, 3}, MemoryFormat::channels_last), shape_error);
  EXPECT_THROW(view(copy.data(), {6, 20}, MemoryFormat::channels_last), shape_error);
  copy.reset({2, 2});
  EXPECT_TRUE(copy.is_contiguous());
}

TEST(ReferenceConv, ChannelsLastInputGivesTheSameOutput) {
  Rng rng(4);
  ConvGeometry g;
  g.in_channels = 4, g.out_channels = 6, g.kernel = 3, g.stride = 2, g.padding = 1, g.groups = 2;
  const auto x = random_tensor<double>({2, 4, 7, 6}, rng);
  const auto w = random_tensor<double>(g.weight_shape(), rng);
  const auto b = random_tensor<double>({6}, rng);
  EXPECT_EQ(max_abs_diff(reference::conv2d(x.to(MemoryFormat::channels_last), w, g, b), reference::conv2d(x, w, g, b)),
            0.0);
}

TEST(ParallelRanges, CoverEveryItemOnceWithTheSameSplitEveryTime) {
  for (std::int64_t n : {1, 2, 3, 7, 128}) {
    std::vector<int> hits(static_cast<std::size_t>(n), 0), owner(hits.size(), -1), again(hits.size(), -1);
    parallel_ranges(n, [&](std::int64_t b, std::int64_t e, int t) {
      for (std::int64_t i = b; i < e; ++i) ++hits[std::size_t(i)], owner[std::size_t(i)] = t;
    });
    parallel_ranges(n, [&](std::int64_t b, std::int64_t e, int t) {
      for (std::int64_t i = b; i < e; ++i) again[std::size_t(i)] = t;
    });
    for (std::size_t i = 0; i < hits.size(); ++i) {
      EXPECT_EQ(hits[i], 1) << "n " << n << " item " << i;
      EXPECT_EQ(owner[i], again[i]) << "n " << n << " item " << i;
      EXPECT_LT(owner[i], range_threads(n));
      if (i > 0) {
        EXPECT_GE(owner[i], owner[i - 1]) << "ranges are contiguous, in thread order";
      }
    }
  }
  EXPECT_THROW(parallel_ranges(8, [](std::int64_t b, std::int64_t, int) {
                 if (b == 0) throw config_error("thrown by the first range");
               }),
               config_error);
}

TEST(ParallelSpans, CoverEveryElementOfEverySpanOnceInBounds) {
  const std::vector<std::int64_t> sizes{0, 3, 0, 1000, 1, 0};
  std::vector<std::vector<int>> hits;
  for (auto n : sizes) hits.emplace_back(std::size_t(n), 0);
  parallel_spans(sizes, [&](std::size_t k, std::int64_t j0, std::int64_t j1) {
    ASSERT_LT(k, sizes.size());
    ASSERT_LE(0, j0);
    ASSERT_LT(j0, j1) << "span " << k;
    ASSERT_LE(j1, sizes[k]) << "span " << k;
    for (std::int64_t j = j0; j < j1; ++j) ++hits[k][std::size_t(j)];  // spans' ranges are disjoint
  });
  for (std::size_t k = 0; k < sizes.size(); ++k)
    for (std::size_t j = 0; j < hits[k].size(); ++j) EXPECT_EQ(hits[k][j], 1) << "span " << k << " element " << j;
  bool called = false;
  parallel_spans({}, [&](std::size_t, std::int64_t, std::int64_t) { called = true; });
  EXPECT_FALSE(called);
}
