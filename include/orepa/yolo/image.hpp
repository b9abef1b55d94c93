#pragma once
/// @file image.hpp
/// Images for the detector: reading PNG / JPEG / BMP / TGA / binary PPM and PGM (P6 / P5)
/// through stb into a float tensor [C, H, W] in [0, 1] (C order, planar RGB), writing PNG,
/// JPEG or BMP, a bilinear / area resize, RGB <-> HSV, and drawing helpers for detection
/// pictures: rectangles, a built-in 5x7 bitmap font, and labelled boxes.
///
///   auto img = orepa::yolo::read_image("bus.jpg");              // [3, H, W], 0..1
///   auto size = orepa::yolo::read_image_size("bus.jpg");        // header only
///   orepa::yolo::draw_labeled_box(img, 10, 20, 110, 90, "circle 0.93", orepa::yolo::palette_color(0));
///   orepa::yolo::write_image("out.png", img);                   // by extension: png, jpg, bmp
///
/// Pixel coordinates are continuous: pixel (x, y) covers [x, x + 1) x [y, y + 1), so a box
/// (x1, y1, x2, y2) covers the pixels x1 <= x < x2. EXIF orientation is not applied (stb
/// ignores it; OpenCV, which YOLOv5 uses, rotates such JPEGs). Images are 8-bit on disk:
/// 16-bit PNGs are read as 8-bit. Errors throw format_error naming the file (there is no
/// separate I/O error type: an unreadable file and a corrupt one are both "cannot be read as
/// an image"), and shape_error / config_error for bad tensors and arguments.

#include <stb/stb_image.h>
#include <stb/stb_image_write.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/tensor.hpp"

namespace orepa::yolo {

/// The size of an image file as its header gives it (no pixel is decoded).
struct ImageSize {
  int width = 0;     ///< pixels per row
  int height = 0;    ///< rows
  int channels = 0;  ///< channels stored in the file (1 grey, 2 grey + alpha, 3 RGB, 4 RGBA)
};

/// An RGB colour, each component in [0, 1].
struct Rgb {
  float r = 0;  ///< red
  float g = 0;  ///< green
  float b = 0;  ///< blue
};

namespace detail {

/// A FILE* closed at scope exit.
struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

/// Opens `path` for binary reading; format_error with the system's reason if it cannot.
inline FilePtr open_for_reading(const std::string& path) {
  FilePtr f(std::fopen(path.c_str(), "rb"));
  if (!f) throw format_error(orepa::detail::cat(path, ": cannot open: ", std::strerror(errno)));
  return f;
}

/// Feeds a file to stb through its callbacks and notes whether the decoder asked for
/// bytes past the end of the file. stb 2.27 does not report that itself: a truncated PPM
/// or JPEG decodes "successfully", its missing pixels zeros or uninitialised memory.
/// stb refills its internal buffer (the pointer of the first read) in chunks and a
/// chunk may come up short at the end of a complete file; a refill that gets nothing, a
/// direct read (into the image) that comes up short, or a skip past the end are the
/// decoder needing data the file lacks.
struct StbFileReader {
  std::FILE* file;                    ///< the open file
  long size = 0;                      ///< the file's bytes
  const char* refill_buffer = nullptr;  ///< stb's own buffer (the first read's target)
  bool past_end = false;              ///< the decoder wanted bytes the file does not have

  /// The callbacks stb reads through.
  static stbi_io_callbacks callbacks() { return {&read, &skip, &eof}; }
  /// stb's read: up to `n` bytes into `data`, the count read.
  static int read(void* user, char* data, int n) {
    auto* r = static_cast<StbFileReader*>(user);
    if (!r->refill_buffer) r->refill_buffer = data;
    const std::size_t got = n > 0 ? std::fread(data, 1, std::size_t(n), r->file) : 0;
    if (n > 0 && (got == 0 || (data != r->refill_buffer && got < std::size_t(n)))) r->past_end = true;
    return int(got);
  }
  /// stb's skip: `n` bytes forward.
  static void skip(void* user, int n) {
    auto* r = static_cast<StbFileReader*>(user);
    if (std::fseek(r->file, n, SEEK_CUR) != 0 || std::ftell(r->file) > r->size) r->past_end = true;
  }
  /// stb's end-of-file test.
  static int eof(void* user) {
    auto* r = static_cast<StbFileReader*>(user);
    return std::ftell(r->file) >= r->size;
  }
};

/// A reader of the open file `f` (rewound), its size from the file system.
inline StbFileReader stb_reader(std::FILE* f) {
  StbFileReader r{f};
  if (std::fseek(f, 0, SEEK_END) == 0) r.size = std::ftell(f);
  std::rewind(f);
  return r;
}

/// stb's reason for its last failure ("unknown" when it recorded none: stb keeps one per
/// thread, unset until a first failure).
inline const char* stb_failure() {
  const char* r = stbi_failure_reason();
  return r ? r : "unknown";
}

/// Throws shape_error unless `img` is [C, H, W] with C in `allowed` (1, 3, or 4 too when
/// `allow_alpha`) and H, W >= 1.
inline void check_image(const Tensor<float>& img, const char* what, bool allow_alpha = false) {
  const bool ok = img.dim() == 3 && img.size(1) >= 1 && img.size(2) >= 1 &&
                  (img.size(0) == 1 || img.size(0) == 3 || (allow_alpha && img.size(0) == 4));
  if (!ok)
    throw shape_error(orepa::detail::cat(what, ": expected an image [C, H, W] with C 1 or 3", allow_alpha ? " (or 4)" : "",
                                         " and H, W >= 1, got ", shape_str(img.sizes())));
}

/// 8-bit code of a [0, 1] value (NaN and below 0 give 0, 1 and above 255).
inline unsigned char to_u8(float v) {
  if (!(v > 0.0f)) return 0;
  if (v >= 1.0f) return 255;
  return static_cast<unsigned char>(v * 255.0f + 0.5f);
}

/// Interleaved 8-bit pixels (HWC) of a planar float image [C, H, W].
inline std::vector<unsigned char> to_interleaved_u8(const Tensor<float>& img) {
  const std::int64_t c = img.size(0), hw = img.size(1) * img.size(2);
  std::vector<unsigned char> out(static_cast<std::size_t>(c * hw));
  for (std::int64_t ch = 0; ch < c; ++ch) {
    const float* src = img.data() + ch * hw;
    for (std::int64_t i = 0; i < hw; ++i) out[static_cast<std::size_t>(i * c + ch)] = to_u8(src[i]);
  }
  return out;
}

/// One tap of a separable resampling filter: source index and weight.
struct Tap {
  int index;
  float weight;
};

/// Taps of output positions 0..out-1 resampled from `in` positions: bilinear with
/// half-pixel centres when enlarging (or keeping) the size, the exact area average
/// (each output pixel the mean of the input it covers) when shrinking.
inline std::vector<std::vector<Tap>> resample_taps(int in, int out) {
  std::vector<std::vector<Tap>> taps(static_cast<std::size_t>(out));
  const double scale = double(in) / double(out);
  for (int o = 0; o < out; ++o) {
    auto& t = taps[static_cast<std::size_t>(o)];
    if (scale <= 1.0) {
      const double s = std::clamp((o + 0.5) * scale - 0.5, 0.0, double(in - 1));
      const int i0 = static_cast<int>(s);
      const float f = static_cast<float>(s - i0);
      t.push_back({i0, 1.0f - f});
      if (f > 0.0f) t.push_back({std::min(i0 + 1, in - 1), f});
    } else {
      const double lo = o * scale, hi = std::min((o + 1) * scale, double(in));
      for (int i = static_cast<int>(lo); i < in && i < hi; ++i) {
        const double w = std::min(hi, i + 1.0) - std::max(lo, double(i));
        if (w > 0) t.push_back({i, static_cast<float>(w / scale)});
      }
    }
  }
  return taps;
}

/// Glyphs of the built-in font for ASCII 32..126: 7 rows of 5 columns, '#' set.
inline const char* const* font_glyph(char ch) {
  static const char* const glyphs[95][7] = {
      {".....", ".....", ".....", ".....", ".....", ".....", "....."},  // space
      {"..#..", "..#..", "..#..", "..#..", "..#..", ".....", "..#.."},  // !
      {".#.#.", ".#.#.", ".....", ".....", ".....", ".....", "....."},  // "
      {".#.#.", ".#.#.", "#####", ".#.#.", "#####", ".#.#.", ".#.#."},  // #
      {"..#..", ".####", "#.#..", ".###.", "..#.#", "####.", "..#.."},  // $
      {"##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"},  // %
      {".##..", "#..#.", "#.#..", ".#...", "#.#.#", "#..#.", ".##.#"},  // &
      {"..#..", "..#..", ".....", ".....", ".....", ".....", "....."},  // '
      {"...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."},  // (
      {".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."},  // )
      {".....", "..#..", "#.#.#", ".###.", "#.#.#", "..#..", "....."},  // *
      {".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."},  // +
      {".....", ".....", ".....", ".....", "..##.", "..#..", ".#..."},  // ,
      {".....", ".....", ".....", "#####", ".....", ".....", "....."},  // -
      {".....", ".....", ".....", ".....", ".....", ".##..", ".##.."},  // .
      {".....", "....#", "...#.", "..#..", ".#...", "#....", "....."},  // /
      {".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."},  // 0
      {"..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."},  // 1
      {".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"},  // 2
      {"#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."},  // 3
      {"...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."},  // 4
      {"#####", "#....", "####.", "....#", "....#", "#...#", ".###."},  // 5
      {"..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."},  // 6
      {"#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."},  // 7
      {".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."},  // 8
      {".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."},  // 9
      {".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."},  // :
      {".....", ".##..", ".##..", ".....", ".##..", "..#..", ".#..."},  // ;
      {"...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#."},  // <
      {".....", ".....", "#####", ".....", "#####", ".....", "....."},  // =
      {".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#..."},  // >
      {".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."},  // ?
      {".###.", "#...#", "....#", ".##.#", "#.#.#", "#.#.#", ".###."},  // @
      {".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"},  // A
      {"####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."},  // B
      {".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."},  // C
      {"###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."},  // D
      {"#####", "#....", "#....", "####.", "#....", "#....", "#####"},  // E
      {"#####", "#....", "#....", "####.", "#....", "#....", "#...."},  // F
      {".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"},  // G
      {"#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"},  // H
      {".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."},  // I
      {"..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."},  // J
      {"#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"},  // K
      {"#....", "#....", "#....", "#....", "#....", "#....", "#####"},  // L
      {"#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"},  // M
      {"#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"},  // N
      {".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."},  // O
      {"####.", "#...#", "#...#", "####.", "#....", "#....", "#...."},  // P
      {".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"},  // Q
      {"####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"},  // R
      {".####", "#....", "#....", ".###.", "....#", "....#", "####."},  // S
      {"#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."},  // T
      {"#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."},  // U
      {"#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."},  // V
      {"#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."},  // W
      {"#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"},  // X
      {"#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."},  // Y
      {"#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"},  // Z
      {".###.", ".#...", ".#...", ".#...", ".#...", ".#...", ".###."},  // [
      {".....", "#....", ".#...", "..#..", "...#.", "....#", "....."},  // backslash
      {".###.", "...#.", "...#.", "...#.", "...#.", "...#.", ".###."},  // ]
      {"..#..", ".#.#.", "#...#", ".....", ".....", ".....", "....."},  // ^
      {".....", ".....", ".....", ".....", ".....", ".....", "#####"},  // _
      {".#...", "..#..", ".....", ".....", ".....", ".....", "....."},  // `
      {".....", ".....", ".###.", "....#", ".####", "#...#", ".####"},  // a
      {"#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####."},  // b
      {".....", ".....", ".###.", "#....", "#....", "#...#", ".###."},  // c
      {"....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####"},  // d
      {".....", ".....", ".###.", "#...#", "#####", "#....", ".###."},  // e
      {"..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#..."},  // f
      {".....", ".####", "#...#", "#...#", ".####", "....#", ".###."},  // g
      {"#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#"},  // h
      {"..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."},  // i
      {"...#.", ".....", "..##.", "...#.", "...#.", "#..#.", ".##.."},  // j
      {"#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#."},  // k
      {".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."},  // l
      {".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#"},  // m
      {".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"},  // n
      {".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."},  // o
      {".....", ".....", "####.", "#...#", "####.", "#....", "#...."},  // p
      {".....", ".....", ".##.#", "#..##", ".####", "....#", "....#"},  // q
      {".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."},  // r
      {".....", ".....", ".###.", "#....", ".###.", "....#", "####."},  // s
      {".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."},  // t
      {".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#"},  // u
      {".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."},  // v
      {".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#."},  // w
      {".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"},  // x
      {".....", ".....", "#...#", "#...#", ".####", "....#", ".###."},  // y
      {".....", ".....", "#####", "...#.", "..#..", ".#...", "#####"},  // z
      {"...#.", "..#..", "..#..", ".#...", "..#..", "..#..", "...#."},  // {
      {"..#..", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."},  // |
      {".#...", "..#..", "..#..", "...#.", "..#..", "..#..", ".#..."},  // }
      {".....", ".....", ".#...", "#.#.#", "...#.", ".....", "....."},  // ~
  };
  const int i = static_cast<unsigned char>(ch) - 32;
  return glyphs[(i >= 0 && i < 95) ? i : ('?' - 32)];
}

}  // namespace detail

/// Width of a glyph of the built-in font at scale 1, in pixels.
inline constexpr int font_glyph_width = 5;
/// Height of a glyph of the built-in font at scale 1, in pixels.
inline constexpr int font_glyph_height = 7;
/// Horizontal advance per character at scale 1 (the glyph and one blank column).
inline constexpr int font_advance = 6;
/// Vertical advance per line at scale 1.
inline constexpr int font_line_height = 9;

/// The size of the image in `path` from its header; format_error naming the file if it
/// cannot be opened or is not an image stb can read (a truncated header, another format).
inline ImageSize read_image_size(const std::string& path) {
  auto f = detail::open_for_reading(path);
  ImageSize s;
  auto reader = detail::stb_reader(f.get());
  const stbi_io_callbacks io = detail::StbFileReader::callbacks();
  if (!stbi_info_from_callbacks(&io, &reader, &s.width, &s.height, &s.channels))
    throw format_error(orepa::detail::cat(path, ": not a readable image (", detail::stb_failure(), ")"));
  if (s.width <= 0 || s.height <= 0)
    throw format_error(orepa::detail::cat(path, ": the image has zero size (", s.width, "x", s.height, " pixels)"));
  return s;
}

/// An 8-bit image with interleaved channels (HWC), as decoded from a file: what a data set
/// keeps in its memory cache (a quarter of the float image's size).
struct ImageU8 {
  int width = 0;                      ///< pixels per row
  int height = 0;                     ///< rows
  int channels = 0;                   ///< channels per pixel
  std::vector<unsigned char> pixels;  ///< height x width x channels bytes
};

/// The image in `path` decoded to 8 bits with `channels` (1 or 3) channels: grey is
/// replicated to RGB, alpha dropped, RGB averaged to grey with stb's weights. Throws
/// format_error naming the file when it cannot be opened or decoded (truncated data too),
/// config_error for other `channels`.
inline ImageU8 read_image_u8(const std::string& path, int channels = 3) {
  if (channels != 1 && channels != 3)
    throw config_error(orepa::detail::cat("read_image(", path, "): channels must be 1 or 3, got ", channels));
  auto f = detail::open_for_reading(path);
  int w = 0, h = 0, stored = 0;
  auto reader = detail::stb_reader(f.get());
  const stbi_io_callbacks io = detail::StbFileReader::callbacks();
  std::unique_ptr<unsigned char, void (*)(void*)> px(stbi_load_from_callbacks(&io, &reader, &w, &h, &stored, channels),
                                                      stbi_image_free);
  if (reader.past_end)
    throw format_error(orepa::detail::cat(path, ": truncated image: the decoder needs data past the file's end (",
                                          reader.size, " bytes", px ? "" : std::string("; ") + detail::stb_failure(), ")"));
  if (!px) throw format_error(orepa::detail::cat(path, ": cannot decode image (", detail::stb_failure(), ")"));
  if (w <= 0 || h <= 0) throw format_error(orepa::detail::cat(path, ": the image has zero size (", w, "x", h, " pixels)"));
  ImageU8 img{w, h, channels, {}};
  img.pixels.assign(px.get(), px.get() + std::size_t(w) * std::size_t(h) * std::size_t(channels));
  return img;
}

/// `img` as planar floats [C, H, W] in [0, 1] (byte / 255).
inline Tensor<float> to_float_image(const ImageU8& img) {
  const std::int64_t c = img.channels, hw = std::int64_t(img.height) * img.width;
  if (c < 1 || hw < 1 || std::int64_t(img.pixels.size()) != c * hw)
    throw shape_error(orepa::detail::cat("to_float_image: ", img.pixels.size(), " bytes for a ", img.width, "x",
                                         img.height, "x", img.channels, " image"));
  Tensor<float> out({c, img.height, img.width});
  const unsigned char* p = img.pixels.data();
  for (std::int64_t ch = 0; ch < c; ++ch) {
    float* dst = out.data() + ch * hw;
    for (std::int64_t i = 0; i < hw; ++i) dst[i] = float(p[i * c + ch]) * (1.0f / 255.0f);
  }
  return out;
}

/// The image in `path` as [channels, H, W] floats in [0, 1]: to_float_image(read_image_u8(path, channels)).
inline Tensor<float> read_image(const std::string& path, int channels = 3) {
  return to_float_image(read_image_u8(path, channels));
}

/// Writes `image` [C, H, W] (C 1, 3 or 4; values clamped to [0, 1], rounded to 8 bits) as
/// PNG, JPEG (.jpg / .jpeg, `jpeg_quality` 1..100) or BMP, chosen by the extension of
/// `path` (case-insensitive). Throws config_error for another extension or quality,
/// shape_error for a bad tensor, format_error naming the file if it cannot be written.
inline void write_image(const std::string& path, const Tensor<float>& image, int jpeg_quality = 95) {
  detail::check_image(image, ("write_image(" + path + ")").c_str(), /*allow_alpha=*/true);
  std::string ext = std::filesystem::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  if (ext != ".png" && ext != ".jpg" && ext != ".jpeg" && ext != ".bmp")
    throw config_error(orepa::detail::cat("write_image(", path, "): unknown extension '", ext,
                                          "' (expected .png, .jpg, .jpeg or .bmp)"));
  if (jpeg_quality < 1 || jpeg_quality > 100)
    throw config_error(orepa::detail::cat("write_image(", path, "): jpeg_quality must be in [1, 100], got ",
                                          jpeg_quality));
  const int c = int(image.size(0)), h = int(image.size(1)), w = int(image.size(2));
  const auto px = detail::to_interleaved_u8(image);
  int ok = 0;
  if (ext == ".png") ok = stbi_write_png(path.c_str(), w, h, c, px.data(), w * c);
  else if (ext == ".bmp") ok = stbi_write_bmp(path.c_str(), w, h, c, px.data());
  else ok = stbi_write_jpg(path.c_str(), w, h, c, px.data(), jpeg_quality);
  if (!ok) throw format_error(orepa::detail::cat(path, ": cannot write image: ", std::strerror(errno)));
}

/// `image` [C, H, W] resampled to `width` x `height`: bilinear with half-pixel centres
/// along an axis that grows or keeps its size, the exact area average along one that
/// shrinks (no aliasing when a large photo is reduced). Throws shape_error / config_error.
inline Tensor<float> resize_image(const Tensor<float>& image, int width, int height) {
  detail::check_image(image, "resize_image");
  if (width < 1 || height < 1)
    throw config_error(orepa::detail::cat("resize_image: target size must be positive, got ", width, "x", height));
  const int c = int(image.size(0)), ih = int(image.size(1)), iw = int(image.size(2));
  if (iw == width && ih == height) return image;
  const auto tx = detail::resample_taps(iw, width), ty = detail::resample_taps(ih, height);
  Tensor<float> rows({c, ih, width});  // horizontal pass first
  for (int ch = 0; ch < c; ++ch)
    for (int y = 0; y < ih; ++y) {
      const float* src = image.data() + (std::int64_t(ch) * ih + y) * iw;
      float* dst = rows.data() + (std::int64_t(ch) * ih + y) * width;
      for (int x = 0; x < width; ++x) {
        float v = 0;
        for (const auto& t : tx[std::size_t(x)]) v += t.weight * src[t.index];
        dst[x] = v;
      }
    }
  Tensor<float> out({c, height, width});
  for (int ch = 0; ch < c; ++ch)
    for (int y = 0; y < height; ++y) {
      float* dst = out.data() + (std::int64_t(ch) * height + y) * width;
      std::fill(dst, dst + width, 0.0f);
      for (const auto& t : ty[std::size_t(y)]) {
        const float* src = rows.data() + (std::int64_t(ch) * ih + t.index) * width;
        for (int x = 0; x < width; ++x) dst[x] += t.weight * src[x];
      }
    }
  return out;
}

/// Hue, saturation and value of an RGB colour, each in [0, 1] (hue 0 red, 1/3 green, 2/3 blue).
inline void rgb_to_hsv(float r, float g, float b, float& h, float& s, float& v) {
  const float mx = std::max({r, g, b}), mn = std::min({r, g, b}), d = mx - mn;
  v = mx;
  s = mx > 0 ? d / mx : 0.0f;
  if (d <= 0) {
    h = 0;
    return;
  }
  if (mx == r) h = (g - b) / d;
  else if (mx == g) h = 2.0f + (b - r) / d;
  else h = 4.0f + (r - g) / d;
  h /= 6.0f;
  if (h < 0) h += 1.0f;
}

/// The RGB colour of hue `h` (taken modulo 1), saturation `s` and value `v` (in [0, 1]).
inline Rgb hsv_to_rgb(float h, float s, float v) {
  h -= std::floor(h);
  const float hh = h * 6.0f;
  const int sector = std::min(5, static_cast<int>(hh));
  const float f = hh - float(sector);
  const float p = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
  switch (sector) {
    case 0: return {v, t, p};
    case 1: return {q, v, p};
    case 2: return {p, v, t};
    case 3: return {p, q, v};
    case 4: return {t, p, v};
    default: return {v, p, q};
  }
}

/// Colour number `i` of a palette of well separated saturated colours (hues stepped by the
/// golden ratio), for drawing the boxes of class `i`.
inline Rgb palette_color(int i) {
  const double h = std::fmod(0.08 + 0.6180339887498949 * (i < 0 ? -i : i), 1.0);
  return hsv_to_rgb(float(h), 0.85f, 0.95f);
}

/// Fills the pixels x1 <= x < x2, y1 <= y < y2 of `image` (clipped to it) with `color`
/// (its mean on a grey image). Throws shape_error for a tensor that is no image.
inline void fill_rect(Tensor<float>& image, int x1, int y1, int x2, int y2, Rgb color) {
  detail::check_image(image, "fill_rect");
  const int c = int(image.size(0)), h = int(image.size(1)), w = int(image.size(2));
  x1 = std::max(x1, 0), y1 = std::max(y1, 0), x2 = std::min(x2, w), y2 = std::min(y2, h);
  if (x1 >= x2 || y1 >= y2) return;
  const float rgb[3] = {color.r, color.g, color.b}, grey = (color.r + color.g + color.b) / 3.0f;
  for (int ch = 0; ch < c; ++ch)
    for (int y = y1; y < y2; ++y)
      std::fill_n(image.data() + (std::int64_t(ch) * h + y) * w + x1, x2 - x1, c == 1 ? grey : rgb[ch]);
}

/// Draws the outline of box (x1, y1, x2, y2) (pixel coordinates, rounded) `thickness`
/// pixels wide, inside the box, clipped to the image.
inline void draw_box(Tensor<float>& image, float x1, float y1, float x2, float y2, Rgb color, int thickness = 2) {
  const int l = int(std::lround(x1)), t = int(std::lround(y1)), r = int(std::lround(x2)), b = int(std::lround(y2));
  const int th = std::max(1, thickness);
  fill_rect(image, l, t, r, std::min(b, t + th), color);
  fill_rect(image, l, std::max(t, b - th), r, b, color);
  fill_rect(image, l, t, std::min(r, l + th), b, color);
  fill_rect(image, std::max(l, r - th), t, r, b, color);
}

/// Width in pixels of the longest line of `text` in the built-in font at `scale`.
inline int text_width(const std::string& text, int scale = 1) {
  std::size_t longest = 0, cur = 0;
  for (char ch : text) {
    cur = ch == '\n' ? 0 : cur + 1;
    longest = std::max(longest, cur);
  }
  return longest ? int(longest) * font_advance * scale - (font_advance - font_glyph_width) * scale : 0;
}

/// Height in pixels of `text` (its lines) in the built-in font at `scale`.
inline int text_height(const std::string& text, int scale = 1) {
  const int lines = 1 + int(std::count(text.begin(), text.end(), '\n'));
  return ((lines - 1) * font_line_height + font_glyph_height) * scale;
}

/// Draws `text` with the built-in 5x7 font, its top-left corner at (x, y), each font
/// pixel a `scale` x `scale` square, clipped to the image; '\n' starts a new line,
/// characters outside ASCII 32..126 are drawn as '?'. Throws config_error for scale < 1.
inline void draw_text(Tensor<float>& image, int x, int y, const std::string& text, Rgb color, int scale = 1) {
  if (scale < 1) throw config_error(orepa::detail::cat("draw_text: scale must be >= 1, got ", scale));
  detail::check_image(image, "draw_text");
  int cx = x, cy = y;
  for (char ch : text) {
    if (ch == '\n') {
      cx = x;
      cy += font_line_height * scale;
      continue;
    }
    const char* const* glyph = detail::font_glyph(ch);
    for (int row = 0; row < font_glyph_height; ++row)
      for (int col = 0; col < font_glyph_width; ++col)
        if (glyph[row][col] == '#')
          fill_rect(image, cx + col * scale, cy + row * scale, cx + (col + 1) * scale, cy + (row + 1) * scale, color);
    cx += font_advance * scale;
  }
}

/// Draws box (x1, y1, x2, y2) in `color` and `label` on a filled bar of that colour at its
/// top-left corner (above the box when there is room, inside it otherwise), the text in
/// black or white, whichever reads better on the colour.
inline void draw_labeled_box(Tensor<float>& image, float x1, float y1, float x2, float y2, const std::string& label,
                             Rgb color, int thickness = 2, int scale = 1) {
  draw_box(image, x1, y1, x2, y2, color, thickness);
  if (label.empty()) return;
  const int pad = scale, bw = text_width(label, scale) + 2 * pad, bh = text_height(label, scale) + 2 * pad;
  const int left = int(std::lround(x1));
  const int top = int(std::lround(y1)) - bh >= 0 ? int(std::lround(y1)) - bh : int(std::lround(y1));
  fill_rect(image, left, top, left + bw, top + bh, color);
  const float luma = 0.299f * color.r + 0.587f * color.g + 0.114f * color.b;
  draw_text(image, left + pad, top + pad, label, luma > 0.5f ? Rgb{0, 0, 0} : Rgb{1, 1, 1}, scale);
}

}  // namespace orepa::yolo
