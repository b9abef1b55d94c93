#pragma once
/// @file synthetic.hpp
/// A procedurally generated image-classification task for tests and examples, needing
/// no files: single-channel square images with one bar each, classified by the bar's
/// orientation (0 horizontal "-", 1 vertical "|", 2 diagonal "\", 3 anti-diagonal "/").
/// Bars have random position, length, thickness (1 or 2) and brightness, over Gaussian
/// pixel noise and a random background level; the same seed gives the same images on
/// every platform (orepa::Rng).
///
///   auto train = make_bars_dataset<float>(2048, /*seed=*/1);
///   auto [x, y] = train.batch(indices);   // x [B, 1, 16, 16], y B labels

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/random.hpp"
#include "orepa/core/tensor.hpp"

namespace orepa {

/// Images [N, C, H, W] with one integer label each.
template <class S>
struct ImageDataset {
  Tensor<S> images;         ///< [N, C, H, W]
  std::vector<int> labels;  ///< N labels in [0, num_classes)
  int num_classes = 0;      ///< number of classes (labels lie in [0, num_classes))

  /// Number of samples N.
  std::int64_t size() const { return std::int64_t(labels.size()); }
  /// The images and labels of samples `indices`, in that order (a minibatch).
  /// Throws config_error on an index outside [0, size()).
  std::pair<Tensor<S>, std::vector<int>> batch(const std::vector<std::int64_t>& indices) const {
    Shape s = images.sizes();
    const std::int64_t per = s[1] * s[2] * s[3];
    s[0] = std::int64_t(indices.size());
    std::pair<Tensor<S>, std::vector<int>> out{Tensor<S>(s), {}};
    out.second.reserve(indices.size());
    for (std::size_t b = 0; b < indices.size(); ++b) {
      const std::int64_t i = indices[b];
      if (i < 0 || i >= size())
        throw config_error(detail::cat("ImageDataset::batch: index ", i, " outside [0, ", size(), ")"));
      std::copy_n(images.data() + i * per, per, out.first.data() + std::int64_t(b) * per);
      out.second.push_back(labels[std::size_t(i)]);
    }
    return out;
  }
  /// Samples [begin, begin + count) (clipped to the end) as a batch.
  std::pair<Tensor<S>, std::vector<int>> slice(std::int64_t begin, std::int64_t count) const {
    std::vector<std::int64_t> idx;
    for (std::int64_t i = begin; i < std::min(size(), begin + count); ++i) idx.push_back(i);
    return batch(idx);
  }
};

/// `n` bar images of `size` x `size` pixels (classes balanced: label i % 4), pixel noise
/// N(0, noise^2). Bars are 0.6-1.0 bright over a background level in [-0.1, 0.1], half
/// to most of the side long, anywhere in the image. Throws config_error for size < 8 or n < 0.
template <class S>
ImageDataset<S> make_bars_dataset(std::int64_t n, std::uint64_t seed, std::int64_t size = 16, double noise = 0.2) {
  if (size < 8) throw config_error(detail::cat("make_bars_dataset: size must be >= 8, got ", size));
  if (n < 0) throw config_error(detail::cat("make_bars_dataset: n must be >= 0, got ", n));
  ImageDataset<S> d;
  d.num_classes = 4;
  d.images = Tensor<S>({n, 1, size, size});
  d.labels.resize(std::size_t(n));
  Rng rng(seed);
  auto pick = [&](std::int64_t lo, std::int64_t hi) {  // uniform integer in [lo, hi]
    return lo + std::int64_t(rng.below(std::uint64_t(hi - lo + 1)));
  };
  for (std::int64_t i = 0; i < n; ++i) {
    const int label = int(i % 4);
    d.labels[std::size_t(i)] = label;
    const double background = rng.uniform(-0.1, 0.1);
    for (std::int64_t r = 0; r < size; ++r)
      for (std::int64_t c = 0; c < size; ++c) d.images(i, 0, r, c) = S(background + noise * rng.normal());
    const double bright = rng.uniform(0.6, 1.0);
    const std::int64_t thick = pick(1, 2);
    // Straight bars span half to most of the side; diagonals a bit less (they are longer).
    const std::int64_t len = label < 2 ? pick(size / 2, size - 2) : pick(size / 2 - 1, size - 4);
    // Random start such that the whole bar, thickness included, lies inside the image.
    const std::int64_t r0 = pick(0, size - len), c0 = pick(0, size - len - thick + 1);
    const std::int64_t across = pick(0, size - thick), cs = pick(len - 1, size - thick);
    for (std::int64_t t = 0; t < len; ++t)
      for (std::int64_t w = 0; w < thick; ++w) {
        std::int64_t r = 0, c = 0;
        switch (label) {
          case 0: r = across + w, c = r0 + t; break;  // horizontal
          case 1: r = r0 + t, c = across + w; break;  // vertical
          case 2: r = r0 + t, c = c0 + t + w; break;  // "\"
          default: r = r0 + t, c = cs - t + w; break;  // "/"
        }
        d.images(i, 0, r, c) += S(bright);
      }
  }
  return d;
}

}  // namespace orepa
