#pragma once
/// @file yolo.hpp (yolo)
/// Umbrella header of orepa's optional YOLOv5 component (CMake target orepa::yolo, which
/// links yaml-cpp and stb): the network built from a model yaml (model.hpp), its modules
/// (modules.hpp), the loss (loss.hpp), NMS and box utilities (nms.hpp), validation
/// metrics (metrics.hpp), letterbox (letterbox.hpp), images (image.hpp), YOLO-format
/// data sets with augmentation and a threaded loader (dataset.hpp, augment.hpp) and the
/// synthetic shapes data set (synthetic_data.hpp), and the training loop and evaluation
/// (train.hpp). Not included by orepa/orepa.hpp: the
/// block library never needs yaml-cpp.

#include "orepa/orepa.hpp"
#include "orepa/yolo/augment.hpp"
#include "orepa/yolo/config.hpp"
#include "orepa/yolo/dataset.hpp"
#include "orepa/yolo/image.hpp"
#include "orepa/yolo/letterbox.hpp"
#include "orepa/yolo/loss.hpp"
#include "orepa/yolo/metrics.hpp"
#include "orepa/yolo/model.hpp"
#include "orepa/yolo/modules.hpp"
#include "orepa/yolo/nms.hpp"
#include "orepa/yolo/synthetic_data.hpp"
#include "orepa/yolo/train.hpp"
