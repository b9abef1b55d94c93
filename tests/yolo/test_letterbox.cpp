// YOLOv5's letterbox, the bilinear resize and the box mappings (yolo/letterbox.hpp), on
// cases worked out by hand.
#include <gtest/gtest.h>

#include <vector>

#include "orepa/yolo/letterbox.hpp"

using namespace orepa;
using yolo::LetterboxOptions;

namespace {

Tensor<float> ramp(const Shape& shape) {
  Tensor<float> t(shape);
  for (std::int64_t i = 0; i < t.numel(); ++i) t[i] = float(i % 251) / 250.0f;
  return t;
}

}  // namespace

// 310 x 500 to 640: r = min(640 / 310, 640 / 500) = 1.28, resized to round(500 * 1.28) =
// 640 by round(310 * 1.28 = 396.8) = 397; vertical padding 640 - 397 = 243, with auto
// 243 mod 32 = 19: dh = 9.5, top round(9.4) = 9, bottom round(9.6) = 10, height 416.
// Without auto: 243 / 2 = 121.5: top 121, bottom 122, height 640.
TEST(YoloLetterbox, GeometryByHand) {
  const auto g = yolo::letterbox_geometry(310, 500, LetterboxOptions(640));
  EXPECT_DOUBLE_EQ(g.ratio_w, 1.28);
  EXPECT_EQ(g.resized_width, 640);
  EXPECT_EQ(g.resized_height, 397);
  EXPECT_EQ(g.pad_h, 9.5);
  EXPECT_EQ(g.pad_w, 0.0);
  EXPECT_EQ(g.top, 9);
  EXPECT_EQ(g.bottom, 10);
  EXPECT_EQ(g.left, 0);
  EXPECT_EQ(g.right, 0);
  EXPECT_EQ(g.height, 416);
  EXPECT_EQ(g.width, 640);
  const auto full = yolo::letterbox_geometry(310, 500, LetterboxOptions(640).minimal_pad(false));
  EXPECT_EQ(full.top, 121);
  EXPECT_EQ(full.bottom, 122);
  EXPECT_EQ(full.height, 640);
  // scale_up off: 100 x 200 stays (r = 1); dw = 440 mod 32 = 24 (12 + 12), dh = 540 mod 32 = 28.
  const auto small = yolo::letterbox_geometry(100, 200, LetterboxOptions(640).scale_up(false));
  EXPECT_EQ(small.ratio_w, 1.0);
  EXPECT_EQ(small.left, 12);
  EXPECT_EQ(small.right, 12);
  EXPECT_EQ(small.top, 14);
  EXPECT_EQ(small.bottom, 14);
  EXPECT_EQ(small.width, 224);
  EXPECT_EQ(small.height, 128);
  // Python's round is half to even: 20 x 5 to 10 x 10 gives r = 0.5 and width round(2.5) = 2.
  const auto even = yolo::letterbox_geometry(20, 5, LetterboxOptions(10).minimal_pad(false));
  EXPECT_EQ(even.resized_width, 2);
  EXPECT_EQ(even.left, 4);
  EXPECT_EQ(even.right, 4);
  // A rectangular target, scale_fill: stretched, no padding, per-axis ratios.
  const auto fill = yolo::letterbox_geometry(300, 400, LetterboxOptions(320, 640).minimal_pad(false).scale_fill(true));
  EXPECT_EQ(fill.height, 320);
  EXPECT_EQ(fill.width, 640);
  EXPECT_DOUBLE_EQ(fill.ratio_w, 1.6);
  EXPECT_DOUBLE_EQ(fill.ratio_h, 320.0 / 300);
}

// [[0, 1], [2, 3]] to 4 x 4: source coordinates (o + 0.5) / 2 - 0.5 = -0.25 (clamped to
// 0), 0.25, 0.75, 1.25 (clamped to 1): weights 0, 0.25, 0.75, 1 along each axis, so
// out(y, x) = 2 w_y + w_x. Shrinking 4 -> 2 averages pixel pairs (0, 1) and (2, 3).
TEST(YoloLetterbox, BilinearByHand) {
  const Tensor<double> img({1, 2, 2}, std::vector<double>{0, 1, 2, 3});
  const auto up = yolo::resize_bilinear<double>(img, 4, 4);
  const double w[4] = {0, 0.25, 0.75, 1};
  for (int y = 0; y < 4; ++y)
    for (int x = 0; x < 4; ++x) EXPECT_DOUBLE_EQ(up[y * 4 + x], 2 * w[y] + w[x]) << y << ", " << x;
  const Tensor<double> row({1, 1, 4}, std::vector<double>{0, 1, 2, 3});
  const auto down = yolo::resize_bilinear<double>(row, 1, 2);
  EXPECT_DOUBLE_EQ(down[0], 0.5);
  EXPECT_DOUBLE_EQ(down[1], 2.5);
}

// The letterboxed image: grey rows above and below, the resized image in between; an
// image already of the right shape is copied unchanged; [1, C, H, W] keeps its rank.
TEST(YoloLetterbox, Image) {
  const auto img = ramp({3, 31, 50});
  const auto lb = yolo::letterbox<float>(img, LetterboxOptions(64));
  // r = min(64 / 31, 64 / 50) = 1.28: 64 x round(39.68) = 40; dh = 24 mod 32 = 24: 12 + 12.
  ASSERT_EQ(lb.image.sizes(), (Shape{3, 64, 64}));
  EXPECT_EQ(lb.geometry.top, 12);
  const auto body = yolo::resize_bilinear<float>(img, 40, 64);
  for (std::int64_t c = 0; c < 3; ++c)
    for (std::int64_t y = 0; y < 64; ++y)
      for (std::int64_t x = 0; x < 64; ++x) {
        const float v = lb.image[(c * 64 + y) * 64 + x];
        if (y < 12 || y >= 52)
          EXPECT_EQ(v, float(114.0 / 255.0));
        else
          EXPECT_EQ(v, body[(c * 40 + y - 12) * 64 + x]);
      }
  const auto same = ramp({1, 3, 64, 96});
  const auto kept = yolo::letterbox<float>(same, LetterboxOptions(96));
  ASSERT_EQ(kept.image.sizes(), (Shape{1, 3, 64, 96}));  // 96 - 64 = 32: a multiple, no padding
  EXPECT_EQ(max_abs_diff(kept.image, same), 0.0);
  const auto grey0 = yolo::letterbox<float>(same, LetterboxOptions(96).minimal_pad(false).fill(0));
  EXPECT_EQ(grey0.image.sizes(), (Shape{1, 3, 96, 96}));
  EXPECT_EQ(grey0.image[0], 0.0f);
}

// A box of the 310 x 500 image there and back: x * 1.28 + 0, y * 1.28 + 9.5, then back.
// Out of the image, it is clipped. detect.py's form (from the shapes) uses the exact pad
// (416 - 396.8) / 2 = 9.6 instead: y1 = (73.5 - 9.6) / 1.28 = 49.921875.
TEST(YoloLetterbox, BoxesThereAndBack) {
  const auto g = yolo::letterbox_geometry(310, 500, LetterboxOptions(640));
  Tensor<double> box({2, 6}, std::vector<double>{100, 50, 200, 150, 0.9, 2, 400, 250, 499, 309, 0.5, 1});
  const Tensor<double> original = box;
  yolo::letterbox_boxes<double>(box, g);
  EXPECT_EQ(std::vector<double>(box.begin(), box.begin() + 6), (std::vector<double>{128, 73.5, 256, 201.5, 0.9, 2}));
  Tensor<double> from_shapes = box;
  yolo::scale_boxes<double>(box, g);
  EXPECT_LE(max_abs_diff(box, original), 1e-12);
  yolo::scale_boxes<double>(from_shapes, 416, 640, 310, 500);
  EXPECT_NEAR(from_shapes(0, 1), 49.921875, 1e-12);
  EXPECT_DOUBLE_EQ(from_shapes(0, 0), 100.0);
  Tensor<double> outside({1, 4}, std::vector<double>{-20, 0, 700, 420});
  yolo::scale_boxes<double>(outside, g);
  EXPECT_EQ(std::vector<double>(outside.begin(), outside.end()), (std::vector<double>{0, 0, 500, 310}));
}

TEST(YoloLetterbox, BadInputs) {
  EXPECT_THROW(yolo::letterbox<float>(Tensor<float>({3, 0, 5}), LetterboxOptions(64)), shape_error);
  EXPECT_THROW(yolo::letterbox<float>(Tensor<float>({8, 8}), LetterboxOptions(64)), shape_error);
  EXPECT_THROW(yolo::letterbox<float>(Tensor<float>({3, 8, 8}), LetterboxOptions(0)), config_error);
  EXPECT_THROW(yolo::letterbox<float>(Tensor<float>({3, 8, 8}), LetterboxOptions(64).stride(0)), config_error);
  EXPECT_THROW(yolo::resize_bilinear<float>(Tensor<float>({3, 8, 8}), 0, 4), config_error);
  Tensor<float> bad({2, 3});
  EXPECT_THROW(yolo::scale_boxes<float>(bad, yolo::letterbox_geometry(8, 8, LetterboxOptions(64))), shape_error);
  Tensor<float> one({1, 4});
  EXPECT_THROW(yolo::scale_boxes<float>(one, 0, 8, 8, 8), config_error);
}
