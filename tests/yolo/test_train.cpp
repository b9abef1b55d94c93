// Tests of the YOLOv5 training loop (yolo/train.hpp) on a tiny three-level network and a
// tiny synthetic shapes set: training lowers the loss; one Trainer step equals the same
// step driven by hand (forward, compute_loss, backward, gradient clipping, SGD, EMA) bit
// for bit; a run saved and resumed (mid-epoch and at an epoch's end) ends bit-identical
// to an uninterrupted one; every bad input is a clear error with nothing written over.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "orepa/yolo/yolo.hpp"
#include "test_util.hpp"
#include "yolo/tiny_model.hpp"

using namespace orepa;

namespace train_test {

namespace fs = std::filesystem;

// 8 training images of 64 x 64 (two batches of 4), written once per test.
std::string write_shapes(const test::TempDir& dir, int images = 8) {
  yolo::ShapesOptions o;
  o.image_size(64).train_images(images).val_images(4).min_size(10).max_size(40).seed(5).threads(1);
  return yolo::write_shapes_dataset(dir / "shapes", o).yaml;
}

yolo::TrainOptions tiny_options() {
  return yolo::TrainOptions().epochs(2).image_size(64).batch_size(4).nominal_batch(4).seed(9);
}

std::string file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// Every tensor of two state dicts has the same bytes (and the counters and reals agree).
template <class A, class B>
void expect_same_state(const A& a, const B& b) {
  const auto sa = a.state_dict(), sb = b.state_dict();
  std::size_t n = 0;
  for (const auto& [name, e] : sa) {
    ++n;
    ASSERT_TRUE(sb.contains(name)) << name;
    const auto& f = sb.entry(name);
    if (e.is_tensor()) {
      ASSERT_EQ(e.tensor().sizes(), f.tensor().sizes()) << name;
      EXPECT_EQ(0, std::memcmp(e.tensor().data(), f.tensor().data(), sizeof(float) * std::size_t(e.tensor().numel())))
          << name;
    } else if (e.is_count()) {
      EXPECT_EQ(e.count(), f.count()) << name;
    } else {
      EXPECT_EQ(e.real(), f.real()) << name;
    }
  }
  EXPECT_EQ(n, sb.size());
}

}  // namespace train_test

using namespace train_test;

TEST(YoloTrain, StepsOnOneBatchLowerTheLoss) {
  test::TempDir dir;
  const auto data = yolo::read_data_config(write_shapes(dir));
  // A larger lr0 than YOLOv5's: the warm-up starts the weights' learning rate at 0.
  yolo::Trainer t(test::tiny_yolo_model(), yolo::YoloDataset::from_config(data, "train"),
                  tiny_options().epochs(100).augment(false).lr0(0.1));
  const yolo::Batch b = yolo::make_batch(t.train_set(), t.loader_options(), 0, 0);
  const double first = t.train_batch(b).total();
  ASSERT_TRUE(std::isfinite(first));
  double last = first;
  int steps = 1;
  for (; steps < 60 && last > 0.9 * first; ++steps) last = t.train_batch(b).total();
  EXPECT_LE(last, 0.9 * first) << "first " << first << ", after " << steps << " steps " << last;
  EXPECT_EQ(t.optimizer().steps(), steps);  // accumulate 1: a step per batch
}

TEST(YoloTrain, OneStepEqualsTheStepDrivenByHand) {
  test::TempDir dir;
  const auto data = yolo::read_data_config(write_shapes(dir));
  // A small max_grad_norm so that the clipping acts.
  const auto opts = tiny_options().max_grad_norm(0.02);
  yolo::Trainer t(test::tiny_yolo_model(), yolo::YoloDataset::from_config(data, "train"), opts);
  const yolo::Batch b = yolo::make_batch(t.train_set(), t.loader_options(), 0, 0);
  ASSERT_GT(b.targets.size(0), 0);
  const yolo::LossItems items = t.train_batch(b);

  // The same step by hand: YOLOv5's schedule at iteration 0, forward, loss, backward,
  // clip_grad_norm_, Nesterov SGD over the three groups, EMA update.
  yolo::Model<float> m = test::tiny_yolo_model();
  ModelEMA<yolo::Model<float>> ema(m.clone(), m);
  YoloSchedule sched(YoloScheduleOptions(2, 4, 2).nominal_batch(4));
  SGD<float> opt(yolo_param_groups(m, sched.weight_decay()), SGDOptions(0.01).momentum(0.937).nesterov(true));
  sched.apply(opt, 0, 0);
  const auto maps = m.forward_train(b.images);
  const auto r = yolo::compute_loss<float>({maps[0], maps[1], maps[2]}, b.targets, m.detect().anchors(), {8, 16, 32});
  m.backward(r.grad);
  double sq = 0;
  for (auto* p : m.parameters())
    for (float g : p->grad) sq += double(g) * g;
  const double norm = std::sqrt(sq);
  ASSERT_GT(norm, 0.02);  // the clip acts
  for (auto* p : m.parameters())
    for (float& g : p->grad) g *= float(0.02 / (norm + 1e-6));
  opt.step();
  ema.update(m);

  EXPECT_EQ(items.box, double(r.items[0]));
  EXPECT_EQ(items.obj, double(r.items[1]));
  EXPECT_EQ(items.cls, double(r.items[2]));
  expect_same_state(t.model(), m);
  expect_same_state(t.ema(), ema);
  expect_same_state(t.optimizer(), opt);
  EXPECT_EQ(t.iteration(), 1);
  EXPECT_EQ(t.batch_in_epoch(), 1);
}

TEST(YoloTrain, ResumedRunsEndBitIdenticalToAnUninterruptedOne) {
  test::TempDir dir;
  const auto data = yolo::read_data_config(write_shapes(dir));
  const auto train = yolo::YoloDataset::from_config(data, "train");
  // Accumulation over 2 batches (nominal 8 at batch 4) after the first, augmentation on.
  const auto opts = tiny_options().nominal_batch(8);

  yolo::Trainer whole(test::tiny_yolo_model(), train, opts);
  whole.train_epoch();
  whole.train_epoch();
  ASSERT_TRUE(whole.done());

  // Stopped after one batch (mid-epoch), saved, resumed by a new trainer.
  {
    yolo::Trainer first(test::tiny_yolo_model(), train, opts);
    first.train_batch(yolo::make_batch(train, first.loader_options(), 0, 0));
    first.save(dir / "mid.safetensors");
  }
  yolo::Trainer mid(test::tiny_yolo_model(/*seed=*/77), train, opts);  // other weights: the checkpoint sets them
  mid.resume(dir / "mid.safetensors");
  EXPECT_EQ(mid.iteration(), 1);
  mid.train_epoch();  // the rest of epoch 0
  mid.train_epoch();
  expect_same_state(mid.model(), whole.model());
  expect_same_state(mid.ema(), whole.ema());
  expect_same_state(mid.optimizer(), whole.optimizer());
  expect_same_state(mid.schedule(), whole.schedule());

  // Stopped at the end of epoch 0: the checkpoint train_epoch writes.
  {
    yolo::Trainer first(test::tiny_yolo_model(), train, yolo::TrainOptions(opts).output(dir / "run"));
    first.train_epoch();
  }
  yolo::Trainer end(test::tiny_yolo_model(77), train, opts);
  end.resume(dir / "run/last.safetensors");
  EXPECT_EQ(end.epoch(), 1);
  end.train_epoch();
  expect_same_state(end.model(), whole.model());
  expect_same_state(end.ema(), whole.ema());
}

TEST(YoloTrain, BadInputIsAClearErrorWithNothingWritten) {
  test::TempDir dir;
  const auto data = yolo::read_data_config(write_shapes(dir));
  const auto train = yolo::YoloDataset::from_config(data, "train");
  auto expect_config_error = [](auto&& f, const std::string& part) {
    try {
      f();
      ADD_FAILURE() << "no error; expected one containing: " << part;
    } catch (const config_error& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };

  // nc of the data set differs from the model's: nothing created.
  const auto four = yolo::YoloDataset::from_sources(data.train, 4);
  expect_config_error([&] { yolo::Trainer(test::tiny_yolo_model(), four, tiny_options().output(dir / "nc")); },
                      "has nc 4 but the model has 3 classes");
  EXPECT_FALSE(fs::exists(dir / "nc"));
  yolo::Model<float> m = test::tiny_yolo_model();
  expect_config_error([&] { yolo::evaluate(m, four, yolo::EvalOptions().image_size(64)); }, "has 3 classes but the data set");

  // An empty data set cannot be built; its error names the folder.
  fs::create_directories(dir / "empty/images");
  try {
    yolo::YoloDataset::from_sources({dir / "empty/images"}, 3);
    ADD_FAILURE() << "no error for an empty data set";
  } catch (const format_error& e) {
    EXPECT_NE(std::string(e.what()).find("no images found in " + (dir / "empty/images")), std::string::npos) << e.what();
  }

  // Output folders that cannot be used: a file, below a file, one holding a checkpoint.
  { std::ofstream(dir / "file") << "keep"; }
  expect_config_error([&] { yolo::Trainer(test::tiny_yolo_model(), train, tiny_options().output(dir / "file")); },
                      "exists and is not a folder");
  expect_config_error([&] { yolo::Trainer(test::tiny_yolo_model(), train, tiny_options().output(dir / "file/sub")); },
                      "cannot be created: '" + (dir / "file") + "' is not a folder");
  EXPECT_EQ(file_bytes(dir / "file"), "keep");
  fs::create_directories(dir / "old");
  { std::ofstream(dir / "old/last.safetensors") << "previous run"; }
  expect_config_error([&] { yolo::Trainer(test::tiny_yolo_model(), train, tiny_options().output(dir / "old")); },
                      "already holds last.safetensors");
  EXPECT_EQ(file_bytes(dir / "old/last.safetensors"), "previous run");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir / "old"), fs::directory_iterator()), 1);

  // Bad settings.
  expect_config_error([&] { yolo::Trainer(test::tiny_yolo_model(), train, tiny_options().image_size(48)); },
                      "image_size 48 is not a multiple of the model's largest stride 32");
}

// One process playing rank 1 of 2 (its gradient hook only counts): it trains on half of
// every batch, calls the hook after every backward, and writes neither checkpoint nor
// progress line. tests/mpi/test_dist_yolo.cpp checks the numbers on 2 ranks.
TEST(YoloTrain, DataParallelRankTrainsItsShareAndLeavesWritingToRankZero) {
  test::TempDir dir;
  const auto data = yolo::read_data_config(write_shapes(dir));
  std::ostringstream log;
  yolo::Trainer t(test::tiny_yolo_model(), yolo::YoloDataset::from_config(data, "train"),
                  tiny_options().epochs(1).output(dir / "run").log(&log));
  int averaged = 0;
  t.data_parallel({1, 2, [&] { ++averaged; }});
  EXPECT_EQ(t.loader_options().ranks(), 2);
  EXPECT_EQ(t.loader_options().rank(), 1);
  EXPECT_EQ(yolo::make_batch(t.train_set(), t.loader_options(), 0, 0).images.size(0), 2);
  t.train_epoch();
  EXPECT_EQ(averaged, 2);                  // 8 images in batches of 4: 2 backward passes
  EXPECT_EQ(t.optimizer().steps(), 2);
  EXPECT_EQ(log.str(), "");
  EXPECT_FALSE(fs::exists(dir / "run/last.safetensors"));

  // The same on rank 0 writes both.
  yolo::Trainer t0(test::tiny_yolo_model(), yolo::YoloDataset::from_config(data, "train"),
                   tiny_options().epochs(1).output(dir / "run").log(&log));
  t0.data_parallel({0, 2, [] {}});
  t0.train_epoch();
  EXPECT_NE(log.str().find("epoch   1/1"), std::string::npos) << log.str();
  EXPECT_TRUE(fs::exists(dir / "run/last.safetensors"));
}

TEST(YoloTrain, DataParallelSettingsThatCannotWorkAreClearErrors) {
  test::TempDir dir;
  const auto data = yolo::read_data_config(write_shapes(dir));
  yolo::Trainer t(test::tiny_yolo_model(), yolo::YoloDataset::from_config(data, "train"), tiny_options());
  try {
    t.data_parallel({0, 3, {}});
    ADD_FAILURE() << "no error for a batch of 4 over 3 ranks";
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find("batch_size 4 is not a multiple of the 3 ranks"), std::string::npos) << e.what();
  }
  EXPECT_THROW(t.data_parallel({2, 2, {}}), config_error);
  EXPECT_THROW(t.data_parallel({-1, 2, {}}), config_error);
  EXPECT_EQ(t.loader_options().ranks(), 1);  // nothing changed
  t.train_batch(yolo::make_batch(t.train_set(), t.loader_options(), 0, 0));
  EXPECT_THROW(t.data_parallel({0, 2, {}}), state_error);  // training began
}

TEST(YoloTrain, NonFiniteLossStopsNamingTheStepAndKeepsTheLastCheckpoint) {
  test::TempDir dir;
  const auto data = yolo::read_data_config(write_shapes(dir));
  yolo::Trainer t(test::tiny_yolo_model(), yolo::YoloDataset::from_config(data, "train"), tiny_options().output(dir / "run"));
  t.train_epoch();
  const std::string ckpt = dir / "run/last.safetensors";
  const std::string good = file_bytes(ckpt);
  ASSERT_FALSE(good.empty());
  const std::int64_t steps = t.optimizer().steps();

  // A NaN in one weight (as a diverging run gets): the next batch stops.
  std::string name;
  for (auto& [n, p] : t.model().named_parameters())
    if (n.find("model.4.") == 0 && p->value.numel() > 0) {
      name = n;
      p->value[0] = std::numeric_limits<float>::quiet_NaN();
      break;
    }
  ASSERT_FALSE(name.empty());
  try {
    t.train_epoch();
    ADD_FAILURE() << "no error for a NaN weight";
  } catch (const state_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("is not finite at epoch 1 batch 0 (iteration 2)"), std::string::npos) << msg;
    EXPECT_NE(msg.find(name), std::string::npos) << msg;
    EXPECT_NE(msg.find("the last good checkpoint is " + ckpt), std::string::npos) << msg;
  }
  EXPECT_EQ(t.optimizer().steps(), steps);
  EXPECT_EQ(t.iteration(), 2);
  EXPECT_EQ(file_bytes(ckpt), good);
}
