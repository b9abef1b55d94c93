#pragma once
// The demo's classifier, shared by examples/demo.cpp, examples/train_ddp.cpp and
// benchmarks/bench_ddp.cpp so that all three train and time the same network.
#include <orepa/nn/yolo.hpp>
#include <orepa/orepa.hpp>

namespace orepa::examples {

// YOLOv5's backbone pattern at toy scale, every block from `maker`:
//   Conv(1, w, 3, 2) -> Conv(w, 2w, 3, 2) -> C3(2w, 2w) -> Conv(2w, 4w, 3, 2) -> C3(4w, 4w)
//   -> GlobalAvgPool -> Linear(4w, classes)
// A 3x3 stride-2 stem rather than a 7x7 OREPA_LargeConv keeps the demo fast on 2 cores.
inline Sequential<float> build_classifier(std::int64_t w, int classes, std::uint64_t seed,
                                          const BlockMaker<float>& maker) {
  Sequential<float> net;
  net.add(maker(ConvOptions(1, w, 3).stride(2).seed(seed + 1)));
  net.add(maker(ConvOptions(w, 2 * w, 3).stride(2).seed(seed + 2)));
  net.add(C3<float>(2 * w, 2 * w, 1, true, 0.5, seed + 3, maker));
  net.add(maker(ConvOptions(2 * w, 4 * w, 3).stride(2).seed(seed + 4)));
  net.add(C3<float>(4 * w, 4 * w, 1, true, 0.5, seed + 5, maker));
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(4 * w, classes, seed + 6));
  return net;
}

}  // namespace orepa::examples
