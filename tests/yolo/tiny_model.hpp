#pragma once
// The small YOLO network the training tests share (tests/yolo/test_train.cpp,
// tests/mpi/test_dist_yolo.cpp): three detection levels (strides 8, 16, 32) on OREPA convs
// (BNs inside the blocks too), a C3 and an SPPF.
#include <cstdint>

#include "orepa/yolo/yolo.hpp"

namespace orepa::test {

inline const char* const kTinyYoloYaml = R"(nc: 3
depth_multiple: 1.0
width_multiple: 1.0
anchors:
  - [10, 13, 16, 30, 33, 23]
  - [30, 61, 62, 45, 59, 119]
  - [116, 90, 156, 198, 373, 326]
backbone:
  [
    [-1, 1, Conv, [8, 3, 2]],
    [-1, 1, OREPA, [8, 3, 2]],
    [-1, 1, OREPA, [16, 3, 2]],
    [-1, 1, C3, [16]],
    [-1, 1, OREPA, [16, 3, 2]],
    [-1, 1, OREPA, [16, 3, 2]],
    [-1, 1, SPPF, [16, 5]],
  ]
head:
  [
    [[3, 4, 6], 1, Detect, [nc, anchors]],
  ]
)";

/// kTinyYoloYaml built with OREPA blocks from `seed`.
inline yolo::Model<float> tiny_yolo_model(std::uint64_t seed = 3) {
  return yolo::Model<float>(yolo::parse_model_config(kTinyYoloYaml, "tiny.yaml"),
                            yolo::ModelOptions<float>().blocks("orepa").seed(seed));
}

}  // namespace orepa::test
