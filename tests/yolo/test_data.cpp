// Tests of the YOLO data path: image I/O and drawing, label files, data yamls, the data
// set, augmentation, the threaded loader and the synthetic shapes generator. Expected
// values come from hand computations, from pixels (a box must be where its object's pixels
// are), or from a second route to the same result (sequential make_batch for the loader).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include "orepa/yolo/augment.hpp"
#include "orepa/yolo/dataset.hpp"
#include "orepa/yolo/image.hpp"
#include "orepa/yolo/synthetic_data.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;
using namespace orepa;
using namespace orepa::yolo;
using test::TempDir;

namespace {

void write_text(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

/// The message of the format_error `f` throws ("" and a test failure if it throws none).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const format_error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a format_error";
  return "";
}

/// A black RGB image with a white rectangle [x1, x2) x [y1, y2).
Tensor<float> white_rect(int w, int h, int x1, int y1, int x2, int y2) {
  Tensor<float> img({3, h, w});
  for (int c = 0; c < 3; ++c)
    for (int y = y1; y < y2; ++y)
      for (int x = x1; x < x2; ++x) img.data()[(std::int64_t(c) * h + y) * w + x] = 1.0f;
  return img;
}

/// Bounding box [x1, x2) x [y1, y2) of the pixels whose three channels all exceed `thr`
/// inside the region [rx1, rx2) x [ry1, ry2) (the whole image by default); x1 = -1 if none.
std::array<int, 4> bright_bbox(const Tensor<float>& img, float thr, int rx1 = 0, int ry1 = 0, int rx2 = 1 << 30,
                               int ry2 = 1 << 30) {
  const int h = int(img.size(1)), w = int(img.size(2));
  std::array<int, 4> b = {1 << 30, 1 << 30, -1, -1};
  for (int y = std::max(ry1, 0); y < std::min(ry2, h); ++y)
    for (int x = std::max(rx1, 0); x < std::min(rx2, w); ++x) {
      bool on = true;
      for (int c = 0; c < 3; ++c) on = on && img.data()[(std::int64_t(c) * h + y) * w + x] > thr;
      if (!on) continue;
      b[0] = std::min(b[0], x), b[1] = std::min(b[1], y), b[2] = std::max(b[2], x + 1), b[3] = std::max(b[3], y + 1);
    }
  if (b[2] < 0) b = {-1, -1, -1, -1};
  return b;
}

float px(const Tensor<float>& img, int c, int y, int x) {
  return img.data()[(std::int64_t(c) * img.size(1) + y) * img.size(2) + x];
}

/// A small shapes set for the data-set tests.
ShapesOptions small_shapes() {
  return ShapesOptions().image_size(64).train_images(6).val_images(3).min_size(10).max_size(30).max_objects(3).seed(5);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Images

TEST(YoloImage, PngRoundTripIsExactIn8Bits) {
  TempDir dir;
  Tensor<float> img({3, 5, 7});
  for (std::int64_t i = 0; i < img.numel(); ++i) img[i] = float((i * 37) % 256) / 255.0f;
  img[3] = -0.5f, img[4] = 1.5f, img[5] = std::nanf("");  // clamped: 0, 255, 0
  write_image(dir / "a.png", img);
  const auto back = read_image(dir / "a.png");
  ASSERT_EQ(back.sizes(), img.sizes());
  for (std::int64_t i = 0; i < img.numel(); ++i) {
    const float want = i == 3 || i == 5 ? 0.0f : i == 4 ? 1.0f : img[i];
    EXPECT_NEAR(back[i], want, 1e-6) << i;
  }
  const auto size = read_image_size(dir / "a.png");
  EXPECT_EQ(size.width, 7);
  EXPECT_EQ(size.height, 5);
  EXPECT_EQ(size.channels, 3);
  // BMP is lossless too; JPEG is not, but close on a smooth image.
  write_image(dir / "a.BMP", img);
  EXPECT_EQ(read_image(dir / "a.BMP").sizes(), img.sizes());
  EXPECT_NEAR(read_image(dir / "a.BMP")[17], img[17], 1e-6);
  Tensor<float> smooth({3, 16, 16}, 0.5f);
  write_image(dir / "s.jpg", smooth, 90);
  for (float v : read_image(dir / "s.jpg")) EXPECT_NEAR(v, 0.5f, 3.0 / 255);
}

TEST(YoloImage, ReadsPortablePixmapsWrittenByHand) {
  TempDir dir;
  // P6: 2x1 RGB, P5: 2x2 grey, bytes written here, not by the library.
  write_text(dir / "c.ppm", std::string("P6\n2 1\n255\n") + std::string("\x0a\x14\x1e\xff\x00\x80", 6));
  write_text(dir / "g.pgm", std::string("P5\n2 2\n255\n") + std::string("\x00\x40\x80\xff", 4));
  const auto c = read_image(dir / "c.ppm");
  ASSERT_EQ(c.sizes(), (Shape{3, 1, 2}));
  const float want_c[6] = {10, 255, 20, 0, 30, 128};  // planar: R of both pixels, then G, then B
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(c[i], want_c[i] / 255.0f, 1e-6) << i;
  const auto g = read_image(dir / "g.pgm");  // grey replicated to RGB
  ASSERT_EQ(g.sizes(), (Shape{3, 2, 2}));
  for (int ch = 0; ch < 3; ++ch) {
    EXPECT_NEAR(px(g, ch, 0, 1), 64 / 255.0f, 1e-6);
    EXPECT_NEAR(px(g, ch, 1, 1), 1.0f, 1e-6);
  }
  EXPECT_EQ(read_image(dir / "g.pgm", 1).sizes(), (Shape{1, 2, 2}));
}

TEST(YoloImage, UnreadableImagesNameTheFile) {
  TempDir dir;
  write_text(dir / "text.png", "this is not a png");
  EXPECT_NE(error_of([&] { read_image_size(dir / "text.png"); }).find(dir / "text.png"), std::string::npos);
  EXPECT_NE(error_of([&] { read_image(dir / "missing.png"); }).find("cannot open"), std::string::npos);
  // A truncated PNG: the header (and so the size) is readable, the pixels are not.
  Tensor<float> img({3, 32, 32});
  for (std::int64_t i = 0; i < img.numel(); ++i) img[i] = float(i % 97) / 97.0f;
  write_image(dir / "full.png", img);
  const std::string bytes = read_bytes(dir / "full.png");
  write_text(dir / "cut.png", bytes.substr(0, bytes.size() / 2));
  EXPECT_EQ(read_image_size(dir / "cut.png").width, 32);
  const std::string msg = error_of([&] { read_image(dir / "cut.png"); });
  EXPECT_NE(msg.find(dir / "cut.png"), std::string::npos) << msg;
  EXPECT_THROW(write_image(dir / "a.tiff", img), config_error);
  EXPECT_THROW(write_image(dir / "no/such/folder/a.png", img), format_error);
  EXPECT_THROW(write_image(dir / "a.png", Tensor<float>({2, 4, 4})), shape_error);
  // A header of zero width and height (stb accepts it, and has no failure reason to give
  // on a fresh thread): the message says so.
  write_text(dir / "zero.ppm", "P6\n0 0\n255\n");
  for (const auto& m : {error_of([&] { read_image_size(dir / "zero.ppm"); }), error_of([&] { read_image(dir / "zero.ppm"); })}) {
    EXPECT_NE(m.find(dir / "zero.ppm"), std::string::npos) << m;
    EXPECT_TRUE(m.find("zero size (0x0 pixels)") != std::string::npos || m.find("cannot decode image") != std::string::npos) << m;
  }
  EXPECT_NE(error_of([&] { read_image_size(dir / "zero.ppm"); }).find("zero size (0x0 pixels)"), std::string::npos);
  // Truncated pixel data that stb 2.27 decodes without complaint (zeros or uninitialised
  // memory for the missing part): a PPM, a JPEG and a BMP cut short, and a PNG cut just
  // before its end chunk. The complete files read.
  for (const char* ext : {"ppm", "jpg", "bmp", "png"}) {
    const std::string full = dir / (std::string("whole.") + ext), cut = dir / (std::string("part.") + ext);
    if (std::string(ext) == "ppm") {
      std::string ppm = "P6\n32 32\n255\n";
      for (std::int64_t i = 0; i < 32 * 32 * 3; ++i) ppm += char(i % 251);
      write_text(full, ppm);
    } else {
      write_image(full, img);
    }
    EXPECT_EQ(read_image(full).sizes(), (Shape{3, 32, 32})) << ext;
    const std::string whole = read_bytes(full);
    for (std::size_t keep : {whole.size() * 3 / 4, whole.size() - 13}) {
      write_text(cut, whole.substr(0, keep));
      const std::string m = error_of([&] { read_image(cut); });
      EXPECT_NE(m.find(cut), std::string::npos) << ext << " " << keep << ": " << m;
      EXPECT_TRUE(m.find("truncated image") != std::string::npos || m.find("cannot decode") != std::string::npos)
          << ext << " " << keep << ": " << m;
    }
  }
}

TEST(YoloImage, ResizeBilinearUpAreaDown) {
  Tensor<float> row({1, 1, 2}, std::vector<float>{0.0f, 1.0f});
  // Up 2 -> 4, half-pixel centres: sources -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
  const auto up = resize_image(row, 4, 1);
  const float want_up[4] = {0.0f, 0.25f, 0.75f, 1.0f};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(up[i], want_up[i], 1e-6) << i;
  // Down 3 -> 2: each output the mean of 1.5 input pixels.
  Tensor<float> three({1, 1, 3}, std::vector<float>{0.3f, 0.6f, 0.9f});
  const auto down = resize_image(three, 2, 1);
  EXPECT_NEAR(down[0], (0.3f + 0.5f * 0.6f) / 1.5f, 1e-6);
  EXPECT_NEAR(down[1], (0.5f * 0.6f + 0.9f) / 1.5f, 1e-6);
  // Both axes: 4x4 -> 2x2 area means of 2x2 blocks.
  Tensor<float> sq({1, 4, 4});
  for (int i = 0; i < 16; ++i) sq[i] = float(i);
  const auto half = resize_image(sq, 2, 2);
  EXPECT_NEAR(half[0], (0 + 1 + 4 + 5) / 4.0f, 1e-5);
  EXPECT_NEAR(half[3], (10 + 11 + 14 + 15) / 4.0f, 1e-5);
  EXPECT_THROW(resize_image(sq, 0, 2), config_error);
}

TEST(YoloImage, HsvConversionsOfKnownColours) {
  float h, s, v;
  rgb_to_hsv(1, 0, 0, h, s, v);
  EXPECT_NEAR(h, 0, 1e-6); EXPECT_NEAR(s, 1, 1e-6); EXPECT_NEAR(v, 1, 1e-6);
  rgb_to_hsv(0, 1, 0, h, s, v);
  EXPECT_NEAR(h, 1.0 / 3, 1e-6);
  rgb_to_hsv(0.25f, 0.25f, 0.5f, h, s, v);  // blue-ish: h 2/3, s 0.5, v 0.5
  EXPECT_NEAR(h, 2.0 / 3, 1e-6); EXPECT_NEAR(s, 0.5, 1e-6); EXPECT_NEAR(v, 0.5, 1e-6);
  // h 0.6 = sector 3, f 0.6: (p, q, v) = (0, 1 - 0.6, 1).
  const Rgb c = hsv_to_rgb(0.6f, 1, 1);
  EXPECT_NEAR(c.r, 0, 1e-6); EXPECT_NEAR(c.g, 0.4, 1e-6); EXPECT_NEAR(c.b, 1, 1e-6);
  Rng rng(3);
  for (int i = 0; i < 200; ++i) {
    const float r = float(rng.uniform()), g = float(rng.uniform()), b = float(rng.uniform());
    rgb_to_hsv(r, g, b, h, s, v);
    const Rgb back = hsv_to_rgb(h, s, v);
    EXPECT_NEAR(back.r, r, 1e-5); EXPECT_NEAR(back.g, g, 1e-5); EXPECT_NEAR(back.b, b, 1e-5);
  }
}

TEST(YoloImage, TextAndBoxesDrawTheExpectedPixels) {
  // 'T' and 'L' of the 5x7 font, written out here.
  const char* t_rows[7] = {"#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."};
  const char* l_rows[7] = {"#....", "#....", "#....", "#....", "#....", "#....", "#####"};
  for (int scale : {1, 2}) {
    Tensor<float> img({3, 20, 30});
    draw_text(img, 2, 3, "TL", {1, 1, 1}, scale);
    for (int y = 0; y < 20; ++y)
      for (int x = 0; x < 30; ++x) {
        const int gy = (y - 3) / scale, gx = (x - 2) / scale;  // font pixel, glyph cell of 6 columns
        bool want = false;
        if (y >= 3 && x >= 2 && gy < 7 && gx < 12) {
          const int col = gx % 6;
          if (col < 5) want = (gx < 6 ? t_rows : l_rows)[gy][col] == '#';
        }
        EXPECT_EQ(px(img, 1, y, x), want ? 1.0f : 0.0f) << "scale " << scale << " at " << x << "," << y;
      }
  }
  EXPECT_EQ(text_width("TL"), 11);
  EXPECT_EQ(text_width("TL", 2), 22);
  EXPECT_EQ(text_height("a\nb"), 16);
  // A box outline two pixels wide, and a label bar above it in the box's colour.
  Tensor<float> img({3, 40, 40});
  draw_labeled_box(img, 10, 20, 30, 35, "ab", {1, 1, 0});
  EXPECT_EQ(px(img, 0, 20, 15), 1.0f);  // top edge
  EXPECT_EQ(px(img, 0, 21, 15), 1.0f);
  EXPECT_EQ(px(img, 0, 22, 15), 0.0f);  // inside: untouched
  EXPECT_EQ(px(img, 0, 25, 29), 1.0f);  // right edge (x2 = 30 exclusive)
  EXPECT_EQ(px(img, 0, 25, 30), 0.0f);
  const int bar_h = text_height("ab") + 2;     // bar of the text height plus 1 px padding each side
  EXPECT_EQ(px(img, 0, 20 - bar_h, 10), 1.0f);  // bar corner, yellow
  EXPECT_EQ(px(img, 2, 20 - bar_h, 10), 0.0f);
  EXPECT_EQ(px(img, 0, 20 - bar_h - 1, 10), 0.0f);
  // Yellow is light: the text is black inside the bar ('a' row 2 col 1 is set).
  EXPECT_EQ(px(img, 0, 20 - bar_h + 1 + 2, 10 + 1 + 1), 0.0f);
  EXPECT_THROW(draw_text(img, 0, 0, "x", {1, 1, 1}, 0), config_error);
}

// ---------------------------------------------------------------------------------------
// Label files and data yamls

TEST(YoloLabels, ParsesHandWrittenLines) {
  const std::string text =
      "0 0.5 0.5 0.25 0.125\r\n"
      "\n"
      "  2\t0.1 +0.2 1e-1 1\n"
      "1.0 0 1 0.5 0.5\n"
      "0 0.5 0.5 0.25 0.125\n"  // duplicate of line 1: dropped, as YOLOv5 does
      "   \n";
  const auto b = parse_labels(text, "x.txt", 3);
  ASSERT_EQ(b.size(), 3u);
  EXPECT_EQ(b[0].cls, 0); EXPECT_EQ(b[0].cx, 0.5f); EXPECT_EQ(b[0].w, 0.25f); EXPECT_EQ(b[0].h, 0.125f);
  EXPECT_EQ(b[1].cls, 2); EXPECT_EQ(b[1].cx, 0.1f); EXPECT_EQ(b[1].cy, 0.2f); EXPECT_EQ(b[1].w, 0.1f); EXPECT_EQ(b[1].h, 1.0f);
  EXPECT_EQ(b[2].cls, 1); EXPECT_EQ(b[2].cx, 0.0f); EXPECT_EQ(b[2].cy, 1.0f);
  EXPECT_TRUE(parse_labels("", "e.txt", 1).empty());
  // Within float rounding of 1 is 1 (YOLOv5 checks float32 values the same way).
  EXPECT_EQ(parse_labels("0 1.00000001 0.5 0.5 0.5", "r.txt", 1)[0].cx, 1.0f);
}

TEST(YoloLabels, EveryBadLineNamesFileAndLine) {
  const struct {
    const char* line;
    const char* says;
  } cases[] = {
      {"0 0.5 0.5 0.5", "expected 5 fields"},
      {"0 0.5 0.5 0.5 0.5 0.5", "expected 5 fields"},
      {"0 0.5 abc 0.5 0.5", "cy 'abc' is not a number"},
      {"0 0.5 0.5x 0.5 0.5", "is not a number"},
      {"0 0.5 0.5 +-1 0.5", "is not a number"},
      {"zero 0.5 0.5 0.5 0.5", "class 'zero' is not a number"},
      {"3 0.5 0.5 0.5 0.5", "class 3 >= nc 3"},
      {"-1 0.5 0.5 0.5 0.5", "not a non-negative integer"},
      {"1.5 0.5 0.5 0.5 0.5", "not a non-negative integer"},
      {"0 1.0001 0.5 0.5 0.5", "cx 1.0001 outside [0, 1]"},
      {"0 0.5 -0.01 0.5 0.5", "cy -0.01 outside [0, 1]"},
      {"0 0.5 0.5 nan 0.5", "w nan outside [0, 1]"},
      {"0 0.5 0.5 0.5 inf", "h inf outside [0, 1]"},
  };
  for (const auto& c : cases) {
    const std::string text = std::string("1 0.5 0.5 0.5 0.5\n\n") + c.line + "\n";
    const std::string msg = error_of([&] { parse_labels(text, "dir/img7.txt", 3); });
    EXPECT_NE(msg.find("dir/img7.txt:3: "), std::string::npos) << c.line << " -> " << msg;
    EXPECT_NE(msg.find(c.says), std::string::npos) << c.line << " -> " << msg;
  }
  EXPECT_THROW(parse_labels("0 0.5 0.5 0.5 0.5", "a.txt", 0), config_error);
}

TEST(YoloLabels, LabelPathsAndRoundTripOfWrittenLabels) {
  EXPECT_EQ(label_path_for("/d/images/train/a.jpg"), "/d/labels/train/a.txt");
  EXPECT_EQ(label_path_for("/d/images/x/images/b.png"), "/d/images/x/labels/b.txt");  // the last /images/
  EXPECT_EQ(label_path_for("/d/pics/c.PNG"), "/d/pics/c.txt");                      // none: next to it
  EXPECT_EQ(label_path_for("/d/images/v1.2/e.f.png"), "/d/labels/v1.2/e.f.txt");
  Rng rng(7);
  std::vector<LabelBox> boxes;
  for (int i = 0; i < 50; ++i)
    boxes.push_back({int(rng.below(80)), float(rng.uniform()), float(rng.uniform()), float(rng.uniform()),
                     float(rng.uniform())});
  boxes.push_back({1, 1.0f, 0.0f, 1e-7f, 0.999999f});
  const auto back = parse_labels(format_labels(boxes), "rt.txt", 80);
  ASSERT_EQ(back.size(), boxes.size());
  for (std::size_t i = 0; i < boxes.size(); ++i) EXPECT_TRUE(back[i] == boxes[i]) << i;
}

TEST(YoloDataConfig, ResolvesPathsAndReadsNamesAsListOrMap) {
  TempDir dir;
  write_text(dir / "cfg/a.yaml",
             "path: ../sets/one\ntrain: [images/train, extra.txt]\nval: /abs/val\n"
             "names:\n  0: cat\n  2: bird\n  1: dog\n");
  const auto a = read_data_config(dir / "cfg/a.yaml");
  const fs::path root = fs::path(dir / "sets/one").lexically_normal();
  EXPECT_EQ(a.root, root.string());
  ASSERT_EQ(a.train.size(), 2u);
  EXPECT_EQ(a.train[0], (root / "images/train").string());
  EXPECT_EQ(a.train[1], (root / "extra.txt").string());
  EXPECT_EQ(a.val, std::vector<std::string>{"/abs/val"});
  EXPECT_TRUE(a.test.empty());
  EXPECT_EQ(a.nc, 3);
  EXPECT_EQ(a.names, (std::vector<std::string>{"cat", "dog", "bird"}));
  // No path: the yaml's folder; nc alone gives generated names.
  write_text(dir / "b.yaml", "train: t\nval: v\ntest: s\nnc: 2\n");
  const auto b = read_data_config(dir / "b.yaml");
  EXPECT_EQ(b.train[0], (fs::path(dir.path) / "t").lexically_normal().string());
  EXPECT_EQ(b.test[0], (fs::path(dir.path) / "s").lexically_normal().string());
  EXPECT_EQ(b.names, (std::vector<std::string>{"class0", "class1"}));
}

TEST(YoloDataConfig, BadYamlsNameTheFile) {
  TempDir dir;
  const struct {
    const char* text;
    const char* says;
  } cases[] = {
      {"val: v\nnames: [a]\n", "'train' is missing"},
      {"train: t\nnames: [a]\n", "'val' is missing"},
      {"train: t\nval: v\n", "neither 'names' nor 'nc'"},
      {"train: t\nval: v\nnc: 3\nnames: [a, b]\n", ":3: 'nc' is 3 but 'names' has 2 entries"},
      {"train: t\nval: v\nnames: {0: a, 2: c}\n", "key 1 is missing"},
      {"train: t\nval: v\nnc: three\n", "a.yaml:3:"},
      {"train: t\nval: [v\nnc: 1\n", "invalid yaml"},
      {"- just\n- a list\n", "expected a map"},
  };
  for (const auto& c : cases) {
    write_text(dir / "a.yaml", c.text);
    const std::string msg = error_of([&] { read_data_config(dir / "a.yaml"); });
    EXPECT_NE(msg.find(dir / "a.yaml"), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.says), std::string::npos) << c.text << " -> " << msg;
  }
  EXPECT_NE(error_of([&] { read_data_config(dir / "none.yaml"); }).find("cannot open"), std::string::npos);
}

// ---------------------------------------------------------------------------------------
// The generator read back by the reader

TEST(YoloShapes, ReaderGetsExactlyTheBoxesAndPixelsTheGeneratorDrew) {
  TempDir dir;
  const auto o = small_shapes();
  const auto info = write_shapes_dataset(dir / "set", o);
  EXPECT_EQ(info.train_images, 6);
  EXPECT_EQ(info.val_images, 3);
  const auto cfg = read_data_config(info.yaml);
  EXPECT_EQ(cfg.nc, 3);
  EXPECT_EQ(cfg.names, shape_class_names());
  std::int64_t boxes = 0;
  for (int split = 0; split < 2; ++split) {
    const auto ds = YoloDataset::from_config(cfg, split == 0 ? "train" : "val");
    ASSERT_EQ(ds.size(), split == 0 ? 6 : 3);
    boxes += ds.num_boxes();
    for (std::int64_t i = 0; i < ds.size(); ++i) {
      const auto drawn = render_shapes_image(o, shapes_image_seed(o.seed(), split, i));
      const auto want = drawn.labels();
      ASSERT_EQ(ds.labels(i).size(), want.size()) << ds.image_path(i);
      for (std::size_t k = 0; k < want.size(); ++k) EXPECT_TRUE(ds.labels(i)[k] == want[k]) << ds.image_path(i) << " " << k;
      const auto img = ds.load(i).image;  // PNG is lossless: the rendered pixels to 8 bits
      for (std::int64_t j = 0; j < img.numel(); ++j) ASSERT_NEAR(img[j], drawn.image[j], 0.5 / 255 + 1e-6);
      for (const auto& ob : drawn.objects) {
        // The object's centre pixel has its colour, up to the noise (and 8-bit rounding).
        const float col[3] = {ob.color.r, ob.color.g, ob.color.b};
        for (int c = 0; c < 3; ++c)
          EXPECT_NEAR(px(img, c, ob.center_y, ob.center_x), col[c], o.noise() + 1.0 / 255);
        EXPECT_GE(ob.box.x2 - ob.box.x1, 1.0f);
      }
    }
  }
  EXPECT_EQ(boxes, info.boxes);
  EXPECT_GT(boxes, 9);  // at least one object per image
}

TEST(YoloShapes, BoxesAreTheBoundsOfTheShapesPixels) {
  // Without noise every shape pixel has exactly its colour and no background pixel does
  // (backgrounds are far less saturated): the box must be the bounds of those pixels.
  const auto o = small_shapes().noise(0.0).image_size(96).max_size(60).max_objects(4);
  std::set<int> classes;
  for (std::uint64_t seed = 0; seed < 12; ++seed) {
    const auto img = render_shapes_image(o, seed);
    for (const auto& ob : img.objects) {
      classes.insert(ob.cls);
      const int s = 96;
      int b[4] = {s, s, -1, -1};
      for (int y = 0; y < s; ++y)
        for (int x = 0; x < s; ++x)
          if (std::abs(px(img.image, 0, y, x) - ob.color.r) < 1e-6f && std::abs(px(img.image, 1, y, x) - ob.color.g) < 1e-6f &&
              std::abs(px(img.image, 2, y, x) - ob.color.b) < 1e-6f)
            b[0] = std::min(b[0], x), b[1] = std::min(b[1], y), b[2] = std::max(b[2], x + 1), b[3] = std::max(b[3], y + 1);
      EXPECT_EQ(float(b[0]), ob.box.x1) << "seed " << seed;
      EXPECT_EQ(float(b[1]), ob.box.y1) << "seed " << seed;
      EXPECT_EQ(float(b[2]), ob.box.x2) << "seed " << seed;
      EXPECT_EQ(float(b[3]), ob.box.y2) << "seed " << seed;
      const float side = std::max(ob.box.x2 - ob.box.x1, ob.box.y2 - ob.box.y1);
      EXPECT_GE(side, 10.0f * 0.8f - 1);
      EXPECT_LE(side, 60.0f);
      // A square fills its box; a circle about pi/4 of it; a triangle about half.
      int count = 0;
      for (int y = int(ob.box.y1); y < int(ob.box.y2); ++y)
        for (int x = int(ob.box.x1); x < int(ob.box.x2); ++x) count += std::abs(px(img.image, 0, y, x) - ob.color.r) < 1e-6f;
      const double fill = count / double((ob.box.x2 - ob.box.x1) * (ob.box.y2 - ob.box.y1));
      const double want_fill = ob.cls == 1 ? 1.0 : ob.cls == 0 ? 0.785 : 0.5;
      EXPECT_NEAR(fill, want_fill, ob.cls == 1 ? 0.0 : 0.08) << "class " << ob.cls;
      // Class colour bands: the hue is within 0.06 of class / 3.
      float h, sat, v;
      rgb_to_hsv(ob.color.r, ob.color.g, ob.color.b, h, sat, v);
      const float dh = std::abs(h - ob.cls / 3.0f);
      EXPECT_LE(std::min(dh, 1 - dh), 0.06f + 1e-4f);
      EXPECT_GE(sat, 0.65f - 1e-4f);
    }
  }
  EXPECT_EQ(classes.size(), 3u);
}

TEST(YoloShapes, DeterministicWhateverTheThreadsAndRefusesToMixSets) {
  TempDir dir;
  const auto o = small_shapes().train_images(5).val_images(2);
  write_shapes_dataset(dir / "one", ShapesOptions(o).threads(1));
  write_shapes_dataset(dir / "three", ShapesOptions(o).threads(3));
  for (const char* f : {"images/train/000000.png", "images/train/000004.png", "images/val/000001.png",
                        "labels/train/000003.txt", "labels/val/000000.txt"})
    EXPECT_EQ(read_bytes(dir / ("one/" + std::string(f))), read_bytes(dir / ("three/" + std::string(f)))) << f;
  EXPECT_NE(read_bytes(dir / "one/images/train/000000.png"), read_bytes(dir / "one/images/train/000001.png"));
  const auto a = render_shapes_image(o, 11), b = render_shapes_image(o, 12);
  EXPECT_NE(std::vector<float>(a.image.begin(), a.image.end()), std::vector<float>(b.image.begin(), b.image.end()));
  EXPECT_THROW(write_shapes_dataset(dir / "one", o), config_error);  // would mix two sets
  write_shapes_dataset(dir / "one", ShapesOptions(o).train_images(2).overwrite(true));
  EXPECT_FALSE(fs::exists(dir / "one/images/train/000004.png"));
  EXPECT_THROW(ShapesOptions().min_size(50).max_size(40).validate(), config_error);
  EXPECT_THROW(ShapesOptions().format("gif").validate(), config_error);
  // JPEG files: the same boxes, the pixels close.
  const auto info = write_shapes_dataset(dir / "jpg", ShapesOptions(o).format("jpg"));
  const auto ds = YoloDataset::from_config(read_data_config(info.yaml), "train");
  EXPECT_EQ(ds.image_path(0).substr(ds.image_path(0).size() - 4), ".jpg");
  const auto drawn = render_shapes_image(o, shapes_image_seed(o.seed(), 0, 0));
  for (std::size_t k = 0; k < drawn.objects.size(); ++k) EXPECT_TRUE(ds.labels(0)[k] == drawn.labels()[k]);
}

// ---------------------------------------------------------------------------------------
// The data set

TEST(YoloDataset, BackgroundImagesListsAndEmptySets) {
  TempDir dir;
  Tensor<float> img({3, 20, 40}, 0.5f);
  fs::create_directories(dir.path / "d/images/sub");
  write_image(dir / "d/images/a.png", img);
  write_image(dir / "d/images/sub/b.png", img);
  write_image(dir / "d/images/c.bmp", img);
  write_text(dir / "d/labels/sub/b.txt", "1 0.5 0.5 0.5 0.5\n0 0.25 0.25 0.2 0.2\n");
  write_text(dir / "d/labels/c.txt", "");  // an empty file: background too
  write_text(dir / "d/images/notes.txt", "not an image, not listed");
  const auto ds = YoloDataset::from_sources({dir / "d/images"}, 2);
  ASSERT_EQ(ds.size(), 3);  // sorted: a.png, c.bmp, sub/b.png
  EXPECT_EQ(ds.image_path(0), dir / "d/images/a.png");
  EXPECT_EQ(ds.image_path(2), dir / "d/images/sub/b.png");
  EXPECT_EQ(ds.num_backgrounds(), 2);
  EXPECT_EQ(ds.num_boxes(), 2);
  EXPECT_TRUE(ds.load(0).boxes.empty());
  EXPECT_EQ(ds.image_size(2).width, 40);
  const auto b = ds.load(2).boxes;  // pixels: cx 0.5 * 40 = 20, w 0.5 * 40 = 20, h 0.5 * 20 = 10
  ASSERT_EQ(b.size(), 2u);
  EXPECT_EQ(b[0].cls, 1);
  EXPECT_FLOAT_EQ(b[0].x1, 10); EXPECT_FLOAT_EQ(b[0].x2, 30); EXPECT_FLOAT_EQ(b[0].y1, 5); EXPECT_FLOAT_EQ(b[0].y2, 15);
  EXPECT_FLOAT_EQ(b[1].x1, 6); EXPECT_FLOAT_EQ(b[1].y1, 3); EXPECT_FLOAT_EQ(b[1].x2, 14); EXPECT_FLOAT_EQ(b[1].y2, 7);
  // A list file with a relative and an absolute line.
  write_text(dir / "d/list.txt", "images/sub/b.png\n\n" + (dir / "d/images/a.png") + "\n");
  const auto listed = YoloDataset::from_sources({dir / "d/list.txt"}, 2);
  ASSERT_EQ(listed.size(), 2);
  EXPECT_EQ(listed.labels(0).size(), 2u);
  write_text(dir / "d/bad_list.txt", "images/a.png\nimages/notes.txt\n");
  EXPECT_NE(error_of([&] { YoloDataset::from_sources({dir / "d/bad_list.txt"}, 2); }).find("bad_list.txt:2:"),
            std::string::npos);
  // Empty sets name their folder.
  fs::create_directories(dir.path / "empty/images");
  EXPECT_NE(error_of([&] { YoloDataset::from_sources({dir / "empty/images"}, 2); }).find(dir / "empty/images"),
            std::string::npos);
  EXPECT_NE(error_of([&] { YoloDataset::from_sources({dir / "nowhere"}, 2); }).find(dir / "nowhere"), std::string::npos);
  write_text(dir / "webp/images/x.webp", "RIFF");
  EXPECT_NE(error_of([&] { YoloDataset::from_sources({dir / "webp/images"}, 2); }).find("not supported"),
            std::string::npos);
}

TEST(YoloDataset, BadLabelsAndImagesFailAtConstructionNamingTheFile) {
  TempDir dir;
  Tensor<float> img({3, 8, 8}, 0.5f);
  fs::create_directories(dir.path / "images");
  for (const char* n : {"a", "b"}) write_image(dir / ("images/" + std::string(n) + ".png"), img);
  write_text(dir / "labels/a.txt", "0 0.5 0.5 0.5 0.5\n");
  write_text(dir / "labels/b.txt", "0 0.5 0.5 0.5 0.5\n1 0.5 0.5 0.5\n");
  std::string msg = error_of([&] { YoloDataset::from_sources({dir / "images"}, 2); });
  EXPECT_NE(msg.find(dir / "labels/b.txt:2:"), std::string::npos) << msg;
  write_text(dir / "labels/b.txt", "2 0.5 0.5 0.5 0.5\n");
  msg = error_of([&] { YoloDataset::from_sources({dir / "images"}, 2); });
  EXPECT_NE(msg.find("class 2 >= nc 2"), std::string::npos) << msg;
  write_text(dir / "labels/b.txt", "");
  write_text(dir / "images/b.png", "garbage");
  msg = error_of([&] { YoloDataset::from_sources({dir / "images"}, 2); });
  EXPECT_NE(msg.find(dir / "images/b.png"), std::string::npos) << msg;
  EXPECT_THROW(YoloDataset({dir / "images/a.png"}, 2, {"one"}), config_error);  // 1 name for nc 2
  fs::create_directories(dir.path / "labels/a.txt.d");
  fs::remove(dir.path / "labels/a.txt");
  fs::create_directory_symlink(dir.path / "labels/a.txt.d", dir.path / "labels/a.txt");  // a folder, not a file
  msg = error_of([&] { YoloDataset({dir / "images/a.png"}, 2); });
  EXPECT_NE(msg.find("not a regular file"), std::string::npos) << msg;
}

// ---------------------------------------------------------------------------------------
// Augmentation: boxes must follow the pixels

TEST(YoloAugment, FlipsMoveBoxesWithThePixels) {
  LabeledImage s{white_rect(50, 30, 7, 4, 19, 13), {{0, 7, 4, 19, 13}}};
  flip_horizontal(s);
  auto bb = bright_bbox(s.image, 0.5f);
  EXPECT_EQ(bb, (std::array<int, 4>{50 - 19, 4, 50 - 7, 13}));
  EXPECT_FLOAT_EQ(s.boxes[0].x1, 31); EXPECT_FLOAT_EQ(s.boxes[0].x2, 43); EXPECT_FLOAT_EQ(s.boxes[0].y1, 4);
  flip_vertical(s);
  bb = bright_bbox(s.image, 0.5f);
  EXPECT_EQ(bb, (std::array<int, 4>{31, 30 - 13, 43, 30 - 4}));
  EXPECT_FLOAT_EQ(s.boxes[0].y1, 17); EXPECT_FLOAT_EQ(s.boxes[0].y2, 26);
}

TEST(YoloAugment, LetterboxPadsCentredWithGrey) {
  // 40x20 -> 64: scale 1.6 to 64x32, 16 grey rows above and below.
  LabeledImage s{white_rect(40, 20, 10, 5, 20, 15), {{2, 10, 5, 20, 15}}};
  const auto l = letterbox_square(s, 64);
  ASSERT_EQ(l.image.sizes(), (Shape{3, 64, 64}));
  EXPECT_FLOAT_EQ(px(l.image, 0, 0, 0), 114 / 255.0f);
  EXPECT_FLOAT_EQ(px(l.image, 2, 15, 63), 114 / 255.0f);
  EXPECT_FLOAT_EQ(px(l.image, 0, 16, 0), 0.0f);
  EXPECT_FLOAT_EQ(px(l.image, 1, 48, 5), 114 / 255.0f);
  EXPECT_EQ(l.boxes[0].cls, 2);
  EXPECT_FLOAT_EQ(l.boxes[0].x1, 16); EXPECT_FLOAT_EQ(l.boxes[0].y1, 24);
  EXPECT_FLOAT_EQ(l.boxes[0].x2, 32); EXPECT_FLOAT_EQ(l.boxes[0].y2, 40);
  const auto bb = bright_bbox(l.image, 0.5f);
  EXPECT_EQ(bb, (std::array<int, 4>{16, 24, 32, 40}));
  // 30x20 -> 64: 64x43 (42.67 rounded), 10 rows above, 11 below.
  const auto odd = letterbox_square(LabeledImage{Tensor<float>({3, 20, 30}), {}}, 64);
  EXPECT_FLOAT_EQ(px(odd.image, 0, 9, 0), 114 / 255.0f);
  EXPECT_FLOAT_EQ(px(odd.image, 0, 10, 0), 0.0f);
  EXPECT_FLOAT_EQ(px(odd.image, 0, 52, 0), 0.0f);
  EXPECT_FLOAT_EQ(px(odd.image, 0, 53, 0), 114 / 255.0f);
}

TEST(YoloAugment, AffineMovesBoxesWithThePixels) {
  const LabeledImage s{white_rect(64, 48, 20, 10, 36, 30), {{1, 20, 10, 36, 30}}};
  // A known map: scale 1.37 about the origin, then shift by (-5.3, 7.9).
  const yolo::Affine m = yolo::Affine::scaling(1.37).then(yolo::Affine::translation(-5.3, 7.9));
  const auto w = warp_affine(s, m, 80, 70);
  ASSERT_EQ(w.boxes.size(), 1u);
  EXPECT_NEAR(w.boxes[0].x1, 20 * 1.37 - 5.3, 1e-4);  // by hand
  EXPECT_NEAR(w.boxes[0].y2, 30 * 1.37 + 7.9, 1e-4);
  auto bb = bright_bbox(w.image, 0.5f);
  EXPECT_NEAR(bb[0], w.boxes[0].x1, 1.0); EXPECT_NEAR(bb[1], w.boxes[0].y1, 1.0);
  EXPECT_NEAR(bb[2], w.boxes[0].x2, 1.0); EXPECT_NEAR(bb[3], w.boxes[0].y2, 1.0);
  EXPECT_FLOAT_EQ(px(w.image, 0, 2, 40), pad_value);  // above the input's image: grey
  // Random affine at many seeds: every kept box still frames its white pixels.
  AugmentOptions o;
  int kept = 0;
  for (std::uint64_t seed = 0; seed < 30; ++seed) {
    Rng rng(seed);
    const auto r = random_affine(s, 56, o, rng);
    bb = bright_bbox(r.image, 0.5f);
    if (r.boxes.empty()) continue;
    ++kept;
    EXPECT_NEAR(bb[0], r.boxes[0].x1, 1.0) << seed;
    EXPECT_NEAR(bb[1], r.boxes[0].y1, 1.0) << seed;
    EXPECT_NEAR(bb[2], r.boxes[0].x2, 1.0) << seed;
    EXPECT_NEAR(bb[3], r.boxes[0].y2, 1.0) << seed;
    EXPECT_GE(r.boxes[0].x1, 0.0f); EXPECT_LE(r.boxes[0].x2, 56.0f);
  }
  EXPECT_GT(kept, 20);
  // Scaled by 2 to 32x40 and pushed out to the left until 3 px are left: 3 / 32 < 10 % of
  // its area: dropped; 4 px left (12.5 %) kept; 1.5 px left: too thin.
  auto pushed = [&](double dx) { return warp_affine(s, yolo::Affine::scaling(2).then(yolo::Affine::translation(dx, 0)), 64, 96); };
  const auto w2 = pushed(-69);
  EXPECT_FLOAT_EQ(w2.boxes[0].x1, 0); EXPECT_FLOAT_EQ(w2.boxes[0].x2, 3); EXPECT_FLOAT_EQ(w2.boxes[0].y2, 60);
  EXPECT_FALSE(box_candidate(s.boxes[0], w2.boxes[0], 4.0, o));
  EXPECT_TRUE(box_candidate(s.boxes[0], pushed(-68).boxes[0], 4.0, o));
  EXPECT_FALSE(box_candidate(s.boxes[0], pushed(-70.5).boxes[0], 4.0, o));
  EXPECT_TRUE(box_candidate(s.boxes[0], pushed(-70.5).boxes[0], 4.0, AugmentOptions(o).min_box_side(1).min_area_kept(0)));
  EXPECT_THROW(warp_affine(s, yolo::Affine::scaling(0), 8, 8), config_error);
}

TEST(YoloAugment, MosaicPlacesFourTilesWithTheirBoxes) {
  // Each tile's rectangle near the corner that touches the centre, so that none is cut.
  const int rects[4][4] = {{25, 18, 37, 30}, {3, 18, 16, 30}, {25, 2, 38, 14}, {3, 2, 17, 14}};
  std::array<LabeledImage, 4> tiles;
  for (int k = 0; k < 4; ++k) {
    const auto& r = rects[k];
    tiles[std::size_t(k)] = {white_rect(40, 32, r[0], r[1], r[2], r[3]),
                             {{k, float(r[0]), float(r[1]), float(r[2]), float(r[3])}}};
  }
  for (std::uint64_t seed = 0; seed < 10; ++seed) {
    Rng rng(seed);
    const auto m = mosaic_canvas(tiles, 40, rng);
    ASSERT_EQ(m.image.sizes(), (Shape{3, 80, 80}));
    ASSERT_EQ(m.boxes.size(), 4u);
    for (const auto& b : m.boxes) {
      // The box frames white pixels exactly (tiles never overlap).
      const auto bb = bright_bbox(m.image, 0.5f, int(b.x1) - 1, int(b.y1) - 1, int(b.x2) + 1, int(b.y2) + 1);
      EXPECT_EQ(bb, (std::array<int, 4>{int(b.x1), int(b.y1), int(b.x2), int(b.y2)})) << "seed " << seed << " class " << b.cls;
    }
    // Tile 1's left edge and tile 2's top edge are at the centre; tile 0 ends there, tile 3 starts there.
    const float xc = m.boxes[1].x1 - 3, yc = m.boxes[2].y1 - 2;
    EXPECT_GE(xc, 20); EXPECT_LT(xc, 60); EXPECT_GE(yc, 20); EXPECT_LT(yc, 60);
    EXPECT_FLOAT_EQ(m.boxes[0].x2, xc - 40 + 37); EXPECT_FLOAT_EQ(m.boxes[0].y2, yc - 32 + 30);
    EXPECT_FLOAT_EQ(m.boxes[1].y2, yc - 32 + 30); EXPECT_FLOAT_EQ(m.boxes[2].x2, xc - 40 + 38);
    EXPECT_FLOAT_EQ(m.boxes[3].x1, xc + 3); EXPECT_FLOAT_EQ(m.boxes[3].y1, yc + 2);
  }
}

TEST(YoloAugment, HsvJitterKeepsBoxesAndRange) {
  // By hand: cyan (h 0.5) with hue gain 1.2 is h 0.6 = (0, 0.4, 1); grey only changes value.
  Tensor<float> img({3, 1, 2}, std::vector<float>{0.0f, 0.5f, 1.0f, 0.5f, 1.0f, 0.5f});
  hsv_gain(img, 1.2f, 1.5f, 1.4f);
  EXPECT_NEAR(img[0], 0.0f, 1e-6); EXPECT_NEAR(img[2], 0.4f, 1e-6); EXPECT_NEAR(img[4], 1.0f, 1e-6);  // v capped at 1
  EXPECT_NEAR(img[1], 0.7f, 1e-6); EXPECT_NEAR(img[3], 0.7f, 1e-6); EXPECT_NEAR(img[5], 0.7f, 1e-6);
  // Random gains on random pixels stay in [0, 1].
  Rng rng(9);
  Tensor<float> r({3, 16, 16});
  for (auto& v : r) v = float(rng.uniform());
  for (int i = 0; i < 20; ++i) {
    auto c = r;
    random_hsv(c, AugmentOptions().hsv_h(0.5).hsv_s(0.9).hsv_v(0.9), rng);
    for (float v : c) ASSERT_TRUE(v >= 0.0f && v <= 1.0f) << v;
  }
  // Through the training pipeline with only HSV on, the boxes are the letterboxed ones.
  TempDir dir;
  const auto info = write_shapes_dataset(dir / "set", small_shapes());
  const auto ds = YoloDataset::from_config(read_data_config(info.yaml), "train");
  const auto only_hsv = LoaderOptions().image_size(64).augment(true).augmentation(
      AugmentOptions().mosaic(0).scale(0).translate(0).fliplr(0));
  for (std::int64_t i = 0; i < ds.size(); ++i) {
    Rng sample_rng(i);
    const auto a = load_sample(ds, i, only_hsv, sample_rng);
    const auto plain = letterbox_square(ds.load(i), 64);
    ASSERT_EQ(a.boxes.size(), plain.boxes.size());
    for (std::size_t k = 0; k < a.boxes.size(); ++k) {
      EXPECT_NEAR(a.boxes[k].x1, plain.boxes[k].x1, 1e-4); EXPECT_NEAR(a.boxes[k].y2, plain.boxes[k].y2, 1e-4);
    }
    double diff = 0;
    for (std::int64_t j = 0; j < a.image.numel(); ++j) diff += std::abs(a.image[j] - plain.image[j]);
    EXPECT_GT(diff / double(a.image.numel()), 1e-3);
    for (float v : a.image) ASSERT_TRUE(v >= 0.0f && v <= 1.0f);
  }
}

// ---------------------------------------------------------------------------------------
// The loader

TEST(YoloLoader, ThreadedBatchesEqualSequentialOnesAndFollowTheSeed) {
  TempDir dir;
  const auto info = write_shapes_dataset(dir / "set", small_shapes().train_images(11));
  const auto ds = YoloDataset::from_config(read_data_config(info.yaml), "train");
  const auto o = LoaderOptions().image_size(64).batch_size(4).augment(true).seed(21).workers(2).prefetch(2)
                     .augmentation(AugmentOptions().mosaic(0.5).flipud(0.5));
  DataLoader loader(ds, o);
  ASSERT_EQ(loader.batches_per_epoch(), 3);  // 4 + 4 + 3
  std::vector<std::int64_t> first_epoch_indices;
  for (std::int64_t epoch = 0; epoch < 2; ++epoch)
    for (std::int64_t b = 0; b < 3; ++b) {
      const Batch got = loader.next();
      const Batch want = make_batch(ds, o, epoch, b);
      EXPECT_EQ(got.epoch, epoch); EXPECT_EQ(got.batch, b);
      ASSERT_EQ(got.images.sizes(), (Shape{b == 2 ? 3 : 4, 3, 64, 64}));
      EXPECT_EQ(got.indices, want.indices);
      ASSERT_EQ(got.targets.sizes(), want.targets.sizes());
      EXPECT_TRUE(std::equal(got.images.begin(), got.images.end(), want.images.begin()));
      EXPECT_TRUE(std::equal(got.targets.begin(), got.targets.end(), want.targets.begin()));
      for (std::int64_t t = 0; t < got.targets.size(0); ++t) {
        EXPECT_TRUE(got.targets(t, 0) >= 0 && got.targets(t, 0) < float(got.indices.size()));
        EXPECT_TRUE(got.targets(t, 1) == 0 || got.targets(t, 1) == 1 || got.targets(t, 1) == 2);
        for (int c = 2; c < 6; ++c) EXPECT_TRUE(got.targets(t, c) >= 0 && got.targets(t, c) <= 1);
      }
      if (epoch == 0) first_epoch_indices.insert(first_epoch_indices.end(), got.indices.begin(), got.indices.end());
    }
  // An epoch visits every image once, in a seeded order that changes between epochs.
  auto sorted = first_epoch_indices;
  std::sort(sorted.begin(), sorted.end());
  for (std::int64_t i = 0; i < 11; ++i) EXPECT_EQ(sorted[std::size_t(i)], i);
  EXPECT_NE(epoch_order(11, o, 0), epoch_order(11, o, 1));
  EXPECT_NE(epoch_order(11, o, 0), epoch_order(11, LoaderOptions(o).seed(22), 0));
  const Batch other_seed = make_batch(ds, LoaderOptions(o).seed(22), 0, 0);
  const Batch same = make_batch(ds, o, 0, 0);
  EXPECT_FALSE(std::equal(same.images.begin(), same.images.end(), other_seed.images.begin()));
  // Resuming at epoch 1 gives epoch 1's batches.
  DataLoader resumed(ds, LoaderOptions(o).workers(1), 1);
  const Batch r = resumed.next();
  const Batch w = make_batch(ds, o, 1, 0);
  EXPECT_EQ(r.epoch, 1);
  EXPECT_TRUE(std::equal(r.images.begin(), r.images.end(), w.images.begin()));
}

TEST(YoloLoader, WithoutAugmentationBatchesAreLetterboxedImagesAndTheirLabels) {
  TempDir dir;
  const auto info = write_shapes_dataset(dir / "set", small_shapes());
  auto ds = YoloDataset::from_config(read_data_config(info.yaml), "train");
  ds.cache_images();
  const auto o = LoaderOptions().image_size(64).batch_size(4).shuffle(false).drop_last(true);
  DataLoader loader(ds, o);
  ASSERT_EQ(loader.batches_per_epoch(), 1);  // 6 images, the last 2 dropped
  const Batch b = loader.next();
  EXPECT_EQ(b.indices, (std::vector<std::int64_t>{0, 1, 2, 3}));
  std::int64_t row = 0;
  for (std::int64_t j = 0; j < 4; ++j) {
    const auto img = read_image(ds.image_path(j));  // 64x64 already: no resize, no padding
    EXPECT_TRUE(std::equal(img.begin(), img.end(), b.images.data() + j * 3 * 64 * 64));
    for (const auto& l : ds.labels(j)) {
      ASSERT_LT(row, b.targets.size(0));
      EXPECT_EQ(b.targets(row, 0), float(j));
      EXPECT_EQ(b.targets(row, 1), float(l.cls));
      EXPECT_NEAR(b.targets(row, 2), l.cx, 1e-6); EXPECT_NEAR(b.targets(row, 3), l.cy, 1e-6);
      EXPECT_NEAR(b.targets(row, 4), l.w, 1e-6); EXPECT_NEAR(b.targets(row, 5), l.h, 1e-6);
      ++row;
    }
  }
  EXPECT_EQ(row, b.targets.size(0));
  EXPECT_EQ(b.targets.dim(), 2);
  EXPECT_EQ(ds.cached_bytes(), 4 * 64 * 64 * 3);  // the loader's copy shares the cache
  const Batch again = loader.next();               // next epoch, same order, from the cache
  EXPECT_TRUE(std::equal(again.images.begin(), again.images.end(), b.images.begin()));
}

namespace {
// The rows of `targets` of images [first, first + count), renumbered from 0.
std::vector<float> target_rows(const Tensor<float>& targets, std::int64_t first, std::int64_t count) {
  std::vector<float> rows;
  for (std::int64_t t = 0; targets.numel() != 0 && t < targets.size(0); ++t) {
    const auto image = std::int64_t(targets(t, 0));
    if (image < first || image >= first + count) continue;
    rows.push_back(float(image - first));
    for (int c = 1; c < 6; ++c) rows.push_back(targets(t, c));
  }
  return rows;
}
}  // namespace

TEST(YoloLoader, RanksTakeEqualSharesOfEveryBatch) {
  TempDir dir;
  const auto info = write_shapes_dataset(dir / "set", small_shapes().train_images(11));
  const auto ds = YoloDataset::from_config(read_data_config(info.yaml), "train");
  const auto o = LoaderOptions().image_size(64).batch_size(4).augment(true).seed(21)
                     .augmentation(AugmentOptions().mosaic(0.5).flipud(0.5));
  const auto order = epoch_order(11, o, 0);
  const std::int64_t per = 3 * 64 * 64;
  // Batches of 4, 4 and 3 images; 2 ranks take 2 images each of every one.
  for (std::int64_t b = 0; b < 3; ++b) {
    const Batch whole = make_batch(ds, o, 0, b);
    for (int r = 0; r < 2; ++r) {
      const Batch share = make_batch(ds, LoaderOptions(o).ranks(2).rank(r), 0, b);
      ASSERT_EQ(share.images.sizes(), (Shape{2, 3, 64, 64})) << "batch " << b << " rank " << r;
      // Positions 4b + 2r and 4b + 2r + 1 of the epoch's order; the last batch's 12th
      // position is past the 11 images: the epoch's first image again.
      const std::int64_t p = 4 * b + 2 * r;
      EXPECT_EQ(share.indices, (std::vector<std::int64_t>{order[std::size_t(p)], order[std::size_t((p + 1) % 11)]}));
      // The images and targets the whole batch has at those positions.
      const std::int64_t real = std::min<std::int64_t>(2, whole.images.size(0) - 2 * r);
      EXPECT_TRUE(std::equal(share.images.data(), share.images.data() + real * per, whole.images.data() + 2 * r * per));
      EXPECT_EQ(target_rows(share.targets, 0, real), target_rows(whole.targets, 2 * r, real));
    }
  }
  // The threaded loader gives each rank the same shares.
  DataLoader loader(ds, LoaderOptions(o).ranks(2).rank(1).workers(2));
  const Batch got = loader.next(), want = make_batch(ds, LoaderOptions(o).ranks(2).rank(1), 0, 0);
  EXPECT_EQ(got.indices, want.indices);
  EXPECT_TRUE(std::equal(got.images.begin(), got.images.end(), want.images.begin()));
  // Shares must be equal and the rank one of them.
  try {
    LoaderOptions().batch_size(6).ranks(4).validate();
    ADD_FAILURE() << "no error for a batch of 6 over 4 ranks";
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find("batch_size 6 is not a multiple of ranks 4"), std::string::npos) << e.what();
  }
  EXPECT_THROW(LoaderOptions().batch_size(4).ranks(2).rank(2).validate(), config_error);
  EXPECT_THROW(LoaderOptions().ranks(0).validate(), config_error);
}

TEST(YoloLoader, AnErrorInTheLoaderThreadReachesTheCaller) {
  TempDir dir;
  const auto info = write_shapes_dataset(dir / "set", small_shapes());
  const auto ds = YoloDataset::from_config(read_data_config(info.yaml), "train");
  // Image 3 is truncated after the data set was built: its header still reads, its pixels not.
  const std::string bytes = read_bytes(ds.image_path(3));
  write_text(ds.image_path(3), bytes.substr(0, bytes.size() / 3));
  const auto o = LoaderOptions().image_size(64).batch_size(2).shuffle(false).workers(2).prefetch(3);
  DataLoader loader(ds, o);
  EXPECT_EQ(loader.next().indices, (std::vector<std::int64_t>{0, 1}));
  const std::string msg = error_of([&] { loader.next(); });  // batch 1 holds image 3
  EXPECT_NE(msg.find(ds.image_path(3)), std::string::npos) << msg;
  EXPECT_NE(error_of([&] { loader.next(); }).find(ds.image_path(3)), std::string::npos);  // stays failed
  // Shutting down a loader that is still preparing batches is clean.
  { DataLoader busy(ds, LoaderOptions(o).augment(true).batch_size(6).prefetch(4)); }
  EXPECT_THROW(DataLoader(ds, LoaderOptions(o).batch_size(7).drop_last(true)), config_error);
  EXPECT_THROW(DataLoader(ds, LoaderOptions(o).workers(0)), config_error);
  EXPECT_THROW(make_batch(ds, o, 0, 3), config_error);  // 6 images: batches 0..2
  EXPECT_THROW(LoaderOptions().augmentation(AugmentOptions().scale(1.5)).validate(), config_error);
}
