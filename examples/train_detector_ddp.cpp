// train_detector_ddp: a YOLOv5n-OREPA detector (models/yolov5n-orepa.yaml) trained
// data-parallel on MPI, as YOLOv5 v7.0 trains in its DDP mode: one yolo::Trainer per
// rank, each on its share of every batch (Trainer::data_parallel), BatchNorm statistics
// and gradients combined across ranks by DistributedDataParallel (synchronised BN), each
// rank's loss multiplied by the number of ranks before the gradients are averaged, so
// every rank steps with the gradient of the whole batch's loss. Rank 0 writes the
// synthetic shapes set (or every rank reads --data), prints the loss terms of its share
// every epoch, writes the checkpoint (OUT/run/last.safetensors) and at the end the mAP
// of the EMA model on the held-out images. The replicas are checked to be identical.
//
//   mpirun -np 2 train_detector_ddp [--data DATA.yaml] [--model MODEL.yaml] [--out DIR]
//        [--images N] [--val N] [--size S] [--batch B] [--epochs E] [--width W] [--lr0 LR]
//        [--timeout S] [--help]
//   (as root in a container: see README.md for mpirun's flags)
//
// The training settings are the detector demo's for short runs (one optimizer step per
// batch, lr0 0.08, no mosaic, scale +-25%; detector_demo.cpp says why). The defaults (256
// images of 128x128, 10 epochs of 16 batches of 16) reached mAP@0.5 0.551, mAP@0.5:0.95
// 0.257 in 154 s on 2 ranks of a 2-core machine that was compiling meanwhile.
//
// No rank is left waiting: the ranks first check that they were given the same
// arguments, an error on one rank ends the whole job (dist::abort_on_exception), and
// every collective waits at most --timeout seconds for the other ranks (raise it when
// writing a large data set).
//
// Exit status 0 on success (on every rank); 1 when the replicas differ or on any error,
// which ends every rank with a message naming the rank.
#include <orepa/dist/dist.hpp>
#include <orepa/yolo/yolo.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>

#include "tool_args.hpp"  // tools::parse_int, tools::parse_real

using namespace orepa;

namespace {

using Clock = std::chrono::steady_clock;

struct Args {
  std::string data;                             // a YOLO data yaml; empty: the shapes set is written
  std::string model = "models/yolov5n-orepa.yaml";
  std::string out = "orepa_detector_ddp";
  std::int64_t images = 256, val = 64;          // shapes set: training and held-out images
  std::int64_t size = 128, batch = 16, epochs = 10;
  double width = 0;                             // the yaml's width_multiple unless > 0
  double lr0 = 0.08;
  double timeout = dist::default_timeout;
};

const char* usage() {
  return R"(usage: mpirun -np R train_detector_ddp [--data DATA.yaml] [--model MODEL.yaml] [--out DIR]
         [--images N] [--val N] [--size S] [--batch B] [--epochs E] [--width W] [--lr0 LR] [--timeout S]
Trains a YOLOv5 detector data-parallel over R ranks (synchronised BN), then prints the
mAP of its EMA model on the held-out images (rank 0).
  --data DATA.yaml  a YOLO data set (train, val, nc; every rank reads it); default: rank 0
                    writes the synthetic shapes set into DIR/shapes
  --model YAML      the model yaml (default models/yolov5n-orepa.yaml)
  --out DIR         output folder: the shapes set, run/last.safetensors (default orepa_detector_ddp)
  --images N        shapes set: training images (default 256)
  --val N           shapes set: held-out images (default 64)
  --size S          image side in pixels, a multiple of 32 (default 128)
  --batch B         images per step over all ranks, a multiple of R (default 16)
  --epochs E        epochs (default 10)
  --width W         the yaml's width_multiple replaced by W (default: the yaml's)
  --lr0 LR          initial learning rate (default 0.08)
  --timeout S       seconds a rank waits in a collective for the others (default 300)
Every rank must be given the same arguments. An error on any rank ends every rank.
)";
}

bool parse_args(int argc, char** argv, Args& a) {
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") return false;
    if (i + 1 >= argc) throw config_error(detail::cat(flag, ": unknown flag or missing value (see --help)"));
    const std::string v = argv[++i];
    if (flag == "--data") a.data = v;
    else if (flag == "--model") a.model = v;
    else if (flag == "--out") a.out = v;
    else if (flag == "--images") a.images = tools::parse_int(flag, v, 1, 1'000'000);
    else if (flag == "--val") a.val = tools::parse_int(flag, v, 1, 1'000'000);
    else if (flag == "--size") a.size = tools::parse_int(flag, v, 32, 4096);
    else if (flag == "--batch") a.batch = tools::parse_int(flag, v, 1, 4096);
    else if (flag == "--epochs") a.epochs = tools::parse_int(flag, v, 1, 100'000);
    else if (flag == "--width") a.width = tools::parse_real(flag, v, 0.01, 4);
    else if (flag == "--lr0") a.lr0 = tools::parse_real(flag, v, 1e-6, 10);
    else if (flag == "--timeout") a.timeout = tools::parse_real(flag, v, 1e-3, HUGE_VAL);
    else throw config_error(detail::cat("unknown flag '", flag, "' (see --help)"));
  }
  if (a.size % 32 != 0) throw config_error(detail::cat("--size: expected a multiple of 32, got ", a.size));
  return true;
}

int run(int argc, char** argv) {
  const auto t0 = Clock::now();
  namespace fs = std::filesystem;
  Args a;
  const bool go = parse_args(argc, argv, a);
  dist::Communicator world(MPI_COMM_WORLD, a.timeout);
  if (!go) {
    if (world.rank() == 0) std::fputs(usage(), stdout);
    return 0;
  }
  // Arguments that change what the ranks compute or how long they train must agree
  // before anything else; a difference ends the job here with every rank's value.
  world.check_same({{"--data", a.data},
                    {"--model", a.model},
                    {"--out", a.out},
                    {"--images", std::to_string(a.images)},
                    {"--val", std::to_string(a.val)},
                    {"--size", std::to_string(a.size)},
                    {"--batch", std::to_string(a.batch)},
                    {"--epochs", std::to_string(a.epochs)},
                    {"--width", detail::cat(a.width)},
                    {"--lr0", detail::cat(a.lr0)}},
                   "train_detector_ddp: the ranks were given different arguments");
  if (a.batch % world.size() != 0)
    throw config_error(detail::cat("--batch ", a.batch, " must be a multiple of the ", world.size(), " ranks"));

  // One writer: rank 0 writes the shapes set, the others wait for it (a shared file system,
  // as on one machine), and a failure to write ends every rank.
  std::string data_yaml = a.data;
  if (data_yaml.empty()) {
    std::string error;
    if (world.rank() == 0) try {
        yolo::ShapesOptions so;
        so.image_size(int(a.size)).train_images(int(a.images)).val_images(int(a.val)).seed(1).overwrite(true);
        so.min_size(std::max(6, int(a.size) / 16)).max_size(int(a.size) / 2);
        const auto info = yolo::write_shapes_dataset((fs::path(a.out) / "shapes").string(), so);
        std::printf("data: %lld training and %lld held-out %lldx%lld images, %lld boxes, in %s\n",
                    static_cast<long long>(info.train_images), static_cast<long long>(info.val_images),
                    static_cast<long long>(a.size), static_cast<long long>(a.size), static_cast<long long>(info.boxes),
                    info.root.c_str());
      } catch (const std::exception& e) {
        error = e.what();
      }
    world.agree(error, "train_detector_ddp: writing the shapes set");
    data_yaml = (fs::path(a.out) / "shapes" / "data.yaml").string();
  }
  const auto data = yolo::read_data_config(data_yaml);
  auto train_set = yolo::YoloDataset::from_config(data, "train");
  train_set.cache_images();

  yolo::ModelConfig cfg = yolo::read_model_config(a.model);
  if (a.width > 0) cfg.width_multiple = a.width;
  yolo::Trainer trainer(yolo::Model<float>(cfg, yolo::ModelOptions<float>().classes(data.nc).seed(1)), train_set,
                        yolo::TrainOptions()
                            .epochs(a.epochs)
                            .image_size(int(a.size))
                            .batch_size(int(a.batch))
                            .nominal_batch(a.batch)
                            .lr0(a.lr0)
                            .augmentation(yolo::AugmentOptions().mosaic(0).scale(0.25))
                            .seed(1)
                            .output((fs::path(a.out) / "run").string())
                            .overwrite(true)
                            .log(&std::cout));
  // DDP on the Trainer's model: checks that every rank built the same network, copies
  // rank 0's weights to all, synchronises every BatchNorm; the Trainer then trains its
  // share and averages the gradients through it after every backward.
  DistributedDataParallel ddp(trainer.model(), DdpOptions().timeout(a.timeout));
  trainer.data_parallel({ddp.rank(), ddp.size(), [&ddp] { ddp.average_gradients(); }});
  if (ddp.rank() == 0) {
    std::int64_t params = 0;
    for (auto* p : trainer.model().parameters()) params += p->value.numel();
    std::printf("train_detector_ddp: %s (width_multiple %.3g), %lld parameters; %d ranks, %lld images per step "
                "(%lld per rank), synchronised BN, %lld batches per epoch\n",
                a.model.c_str(), cfg.width_multiple, static_cast<long long>(params), ddp.size(),
                static_cast<long long>(a.batch), static_cast<long long>(a.batch / ddp.size()),
                static_cast<long long>(trainer.batches_per_epoch()));
    std::fflush(stdout);
  }
  while (!trainer.done()) trainer.train_epoch();  // rank 0 prints its share's loss terms

  // Every replica must hold the same weights: compare a checksum with rank 0's.
  double checksum = 0;
  for (auto* p : trainer.model().parameters())
    for (float v : p->value) checksum += double(v);
  double root = checksum;
  ddp.communicator().broadcast(&root, 1, 0, "train_detector_ddp replica checksum");
  ddp.agree(checksum == root ? "" : detail::cat("replica checksum ", checksum, " differs from rank 0's ", root));

  if (ddp.rank() == 0) {  // the others are done: they wait in MPI_Finalize
    const auto val = yolo::YoloDataset::from_config(data, "val");
    const yolo::MetricsResult m = trainer.validate(val);
    std::printf("replicas identical; EMA model on %lld held-out images: P %.3f R %.3f mAP@0.5 %.3f mAP@0.5:0.95 %.3f\n",
                static_cast<long long>(val.size()), m.mp, m.mr, m.map50, m.map);
    std::printf("train_detector_ddp: %d ranks mAP@0.5 %.3f mAP@0.5:0.95 %.3f seconds %.0f\n", ddp.size(), m.map50,
                m.map, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return 0;
}

}  // namespace

// An exception on one rank would leave the others waiting in their next collective:
// mpi_main prints it with the rank and ends every rank (MPI_Abort).
int main(int argc, char** argv) { return dist::mpi_main(argc, argv, run, "train_detector_ddp"); }
