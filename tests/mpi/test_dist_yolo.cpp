// Data-parallel training of a YOLO detector: yolo::Trainer::data_parallel with
// DistributedDataParallel (synchronised BN), run by ctest as `mpiexec -np 2` and alone.
// Every rank also computes the single-process reference itself (the data and the
// initialisation are deterministic): ONE process runs forward_train on the WHOLE batch (so
// BN statistics span it, as SyncBN's do), computes YOLOv5's loss separately on each rank's
// part of the maps and targets, joins the parts' map gradients along the batch and runs
// backward once. YOLOv5 v7.0's DDP mode (each rank's loss times WORLD_SIZE, gradients
// averaged) must give exactly that gradient, and the same steps.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "orepa/dist/dist.hpp"
#include "orepa/yolo/yolo.hpp"
#include "../test_util.hpp"
#include "../yolo/tiny_model.hpp"
#include "mpi_util.hpp"

// Named, not anonymous: test_dist.cpp shares this program (one unity unit) and has helpers
// of the same names.
namespace ddp_yolo_tests {

using namespace orepa;

constexpr int kBatch = 4;  // images per step over all ranks
constexpr int kSteps = 2;

// lr0 100: the warm-up gives the weights lr0 * ni / 100 (0 at the first step), so that two
// steps move them well beyond float rounding. Augmentation stays on (mosaic, affine, HSV,
// flips).
constexpr double kLr0 = 100;
yolo::TrainOptions options() {
  return yolo::TrainOptions().epochs(1).image_size(64).batch_size(kBatch).nominal_batch(kBatch).lr0(kLr0).seed(9);
}

// max |a - b| over max |b|, or over `scale` when larger (floored so that all-but-zero
// tensors do not blow up).
double rel_diff(const std::vector<float>& a, const std::vector<float>& b, double scale = 1e-6) {
  double diff = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return diff / scale;
}

std::vector<std::vector<float>> gradients(yolo::Model<float>& m) {
  std::vector<std::vector<float>> g;
  for (auto* p : m.parameters()) g.emplace_back(p->grad.begin(), p->grad.end());
  return g;
}

// Every tensor of a state dict (parameters, running statistics, EMA), by name.
std::map<std::string, std::vector<float>> tensors(const StateDict<float>& sd) {
  std::map<std::string, std::vector<float>> t;
  for (const auto& [name, e] : sd)
    if (e.is_tensor()) t[name].assign(e.tensor().begin(), e.tensor().end());
  return t;
}

// The rel_diff of every tensor of two states, in ascending order. A running mean is
// measured against its channels' running standard deviation too: its rounding error
// scales with the spread of the values, not with the mean.
using State = std::map<std::string, std::vector<float>>;
std::vector<double> state_diffs(const State& got, const State& want) {
  const std::string mean = "running_mean";
  std::vector<double> diffs;
  for (const auto& [name, w] : want) {
    double scale = 1e-6;
    if (name.size() > mean.size() && name.compare(name.size() - mean.size(), mean.size(), mean) == 0)
      for (float v : want.at(name.substr(0, name.size() - mean.size()) + "running_var"))
        scale = std::max(scale, std::sqrt(double(v)));
    diffs.push_back(rel_diff(got.at(name), w, scale));
  }
  std::sort(diffs.begin(), diffs.end());
  return diffs;
}

// Part p of `parts` equal parts of a tensor along its first dimension.
Tensor<float> part_of(const Tensor<float>& t, std::int64_t p, std::int64_t parts) {
  Shape s = t.sizes();
  s[0] /= parts;
  Tensor<float> out(s);
  std::copy_n(t.data() + p * out.numel(), out.numel(), out.data());
  return out;
}

// The targets of images [p * share, (p + 1) * share) of a batch, renumbered from 0.
Tensor<float> targets_of_part(const Tensor<float>& targets, std::int64_t p, std::int64_t share) {
  std::vector<float> rows;
  for (std::int64_t t = 0; targets.numel() != 0 && t < targets.size(0); ++t) {
    const std::int64_t image = std::int64_t(targets(t, 0));
    if (image / share != p) continue;
    rows.push_back(float(image - p * share));
    for (std::int64_t c = 1; c < 6; ++c) rows.push_back(targets(t, c));
  }
  const auto n = std::int64_t(rows.size() / 6);
  return Tensor<float>({n, 6}, std::move(rows));
}

// One process, `parts` parts: YOLOv5's schedule, forward_train on the whole batch, the
// loss of each part's maps and targets, the parts' map gradients joined, ONE backward,
// clip_grad_norm_(10), Nesterov SGD, EMA update.
struct Reference {
  yolo::Model<float> model = test::tiny_yolo_model();
  ModelEMA<yolo::Model<float>> ema{model.clone(), model};
  YoloSchedule sched;
  SGD<float> opt;
  std::vector<std::vector<float>> first_gradients;  // of step 0, before clipping
  std::vector<std::array<float, 3>> first_items;    // of step 0, per part

  Reference(std::int64_t batches_per_epoch)
      : sched(YoloScheduleOptions(1, kBatch, batches_per_epoch).lr0(kLr0).nominal_batch(kBatch)),
        opt(yolo_param_groups(model, sched.weight_decay()), SGDOptions(kLr0).momentum(0.937).nesterov(true)) {}

  void step(const yolo::Batch& whole, std::int64_t ni, std::int64_t parts) {
    sched.apply(opt, ni, 0);
    const std::vector<Tensor<float>> maps = model.forward_train(whole.images);
    std::vector<Tensor<float>> grad;
    for (const auto& m : maps) grad.emplace_back(m.sizes());
    const std::int64_t share = whole.images.size(0) / parts;
    for (std::int64_t p = 0; p < parts; ++p) {
      std::vector<Tensor<float>> part;
      for (const auto& m : maps) part.push_back(part_of(m, p, parts));
      const auto r = yolo::compute_loss<float>({part[0], part[1], part[2]}, targets_of_part(whole.targets, p, share),
                                               model.detect().anchors(), model.strides());
      for (std::size_t l = 0; l < grad.size(); ++l)
        std::copy_n(r.grad[l].data(), r.grad[l].numel(), grad[l].data() + p * r.grad[l].numel());
      if (ni == 0) first_items.push_back(r.items);
    }
    model.backward(grad);
    if (ni == 0) first_gradients = gradients(model);
    double sq = 0;
    for (auto* p : model.parameters())
      for (float g : p->grad) sq += double(g) * g;
    const double coef = 10 / (std::sqrt(sq) + 1e-6);
    if (coef < 1)
      for (auto* p : model.parameters())
        for (float& g : p->grad) g *= float(coef);
    opt.step();
    opt.zero_grad();
    ema.update(model);
  }
};

TEST(DdpYolo, GradientsAndStepsEqualOneProcessOnTheWholeBatch) {
  const int ranks = test::world_size(), rank = test::world_rank();
  if (kBatch % ranks != 0) GTEST_SKIP() << "the batch of " << kBatch << " needs a rank count dividing it";
  const test::TempDir dir("orepa-ddp-yolo-" + std::to_string(test::world_rank()));
  yolo::ShapesOptions so;
  so.image_size(64).train_images(8).val_images(1).min_size(10).max_size(40).seed(5).threads(1);
  const auto data = yolo::read_data_config(yolo::write_shapes_dataset(dir / "shapes", so).yaml);
  const auto train = yolo::YoloDataset::from_config(data, "train");

  // The job: this rank's Trainer on its share, gradients averaged by DDP (SyncBN on).
  yolo::Trainer trainer(test::tiny_yolo_model(), train, options());
  const State start = tensors(trainer.model().state_dict());
  DistributedDataParallel ddp(trainer.model());
  std::vector<std::vector<float>> averaged;  // the gradients clip and SGD get at step 0
  trainer.data_parallel({rank, ranks, [&] {
                           ddp.average_gradients();
                           if (averaged.empty()) averaged = gradients(trainer.model());
                         }});
  std::vector<yolo::LossItems> items;
  for (std::int64_t i = 0; i < kSteps; ++i)
    items.push_back(trainer.train_batch(yolo::make_batch(trainer.train_set(), trainer.loader_options(), 0, i)));
  ASSERT_EQ(trainer.optimizer().steps(), kSteps);

  // The reference: one process on the whole batches.
  const auto whole_batches = yolo::LoaderOptions(trainer.loader_options()).ranks(1).rank(0);
  Reference ref(trainer.batches_per_epoch());
  for (std::int64_t i = 0; i < kSteps; ++i) {
    const yolo::Batch whole = yolo::make_batch(train, whole_batches, 0, i);
    ASSERT_EQ(whole.images.size(0), kBatch);
    ref.step(whole, i, ranks);
  }

  // Gradients after averaging vs the one backward over the joined parts. The bound is
  // float rounding on this network: the reference alone, run on the same batch with its
  // two halves swapped, changed its gradients by up to 3.0e-5 (measured), the deepest
  // layers' most (their BN normalises 2 x 2 maps).
  constexpr double kBound = 1e-4;
  ASSERT_EQ(averaged.size(), ref.first_gradients.size());
  double grad_diff = 0, grad_norm = 0;
  for (std::size_t i = 0; i < averaged.size(); ++i) {
    grad_diff = std::max(grad_diff, rel_diff(averaged[i], ref.first_gradients[i]));
    for (float g : ref.first_gradients[i]) grad_norm += double(g) * g;
  }
  EXPECT_GT(std::sqrt(grad_norm), 1e-3);
  EXPECT_LT(grad_diff, kBound);
  // This rank's loss items are those of its part of the whole batch.
  const auto& want = ref.first_items[std::size_t(rank)];
  EXPECT_NEAR(items[0].box, want[0], 1e-5 * std::abs(want[0]));
  EXPECT_NEAR(items[0].obj, want[1], 1e-5 * std::abs(want[1]));
  EXPECT_NEAR(items[0].cls, want[2], 1e-5 * std::abs(want[2]));

  // After the steps: parameters, BN running statistics and the EMA. The steps moved the
  // median tensor by far more than the bound.
  const State model = tensors(trainer.model().state_dict()), want_model = tensors(ref.model.state_dict());
  const double model_diff = state_diffs(model, want_model).back();
  const double ema_diff =
      state_diffs(tensors(trainer.ema().module().state_dict()), tensors(ref.ema.module().state_dict())).back();
  const auto moves = state_diffs(start, want_model);
  const double moved = moves[moves.size() / 2];
  EXPECT_GT(moved, 20 * kBound);
  EXPECT_LT(model_diff, kBound);
  EXPECT_LT(ema_diff, kBound);
  const auto counters = trainer.model().state_dict();
  for (const auto& [name, e] : ref.model.state_dict()) {
    if (e.is_count()) {
      EXPECT_EQ(counters.count(name), e.count()) << name;
    }
  }

  // The replicas are identical bit for bit: every rank stepped with the same gradient.
  std::vector<float> mine;
  for (const auto& [name, t] : model) mine.insert(mine.end(), t.begin(), t.end());
  std::vector<float> root = mine;
  ddp.communicator().broadcast(root.data(), std::int64_t(root.size()), 0, "test replica state");
  EXPECT_TRUE(std::equal(mine.begin(), mine.end(), root.begin())) << "rank " << rank << " differs from rank 0";

  if (rank == 0)
    std::printf("[ measured ] %d rank(s): gradients %.3g (norm %.3g); after %d steps (median tensor moved %.3g): model %.3g, EMA %.3g\n",
                ranks, grad_diff, std::sqrt(grad_norm), kSteps, moved, model_diff, ema_diff);
}

}  // namespace ddp_yolo_tests
