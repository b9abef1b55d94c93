#pragma once
/// @file train.hpp (yolo)
/// Training and validating a YOLOv5 detector the way YOLOv5 v7.0's train.py and val.py do:
///   - `yolo::Trainer`: one epoch is a DataLoader over the training set (augmented, seeded),
///     and per batch: warm-up of the learning rates and the momentum (YoloSchedule),
///     forward_train, DetectionLoss, backward; every `accumulate` batches the gradient is
///     clipped to norm 10 and SGD (Nesterov, three parameter groups) steps, and the EMA is
///     updated. After every epoch `last.safetensors` in the output folder holds model, EMA,
///     optimizer, schedule and counters, so that resume() continues bit-identically.
///   - `yolo::evaluate`: val.py's numbers (NMS at conf 0.001, IoU 0.6, then precision,
///     recall, mAP@0.5 and mAP@0.5:0.95) of a Model in eval form or a DeployedModel.
///
///   auto data = yolo::read_data_config("shapes/data.yaml");
///   yolo::Trainer trainer(yolo::Model<float>(yolo::read_model_config("yolov5n-orepa.yaml"),
///                                            yolo::ModelOptions<float>().blocks("orepa").classes(data.nc)),
///                         yolo::YoloDataset::from_config(data, "train"),
///                         yolo::TrainOptions().epochs(30).image_size(256).output("runs/shapes").log(&std::cout));
///   auto val = yolo::YoloDataset::from_config(data, "val");
///   while (!trainer.done()) {
///     yolo::EpochStats s = trainer.train_epoch();   // prints its progress line
///     yolo::MetricsResult m = trainer.validate(val); // the EMA model
///   }
///   auto deployed = trainer.ema().module().deploy();
///
/// Bad input fails before anything is trained or written: a training set whose nc is not
/// the model's (config_error), an output folder that is a file, cannot be created or is
/// not writable, or already holds a checkpoint without overwrite(true) (config_error). An
/// empty data set cannot be built (YoloDataset throws naming its source). A non-finite
/// value in the raw maps or the loss stops training with a state_error naming the epoch,
/// batch and iteration and where the first non-finite value is (a parameter or buffer by
/// name, else the first layer whose eval output holds one); the optimizer has not stepped
/// and the last checkpoint on disk is the last good epoch's.
///
/// Data-parallel training (YOLOv5's DDP mode) is Trainer::data_parallel(): one Trainer per
/// process, each on its share of every batch, gradients averaged by the caller's hook
/// (examples/train_detector_ddp.cpp does it on MPI with DistributedDataParallel). This
/// layer knows nothing of MPI.

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <system_error>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/options.hpp"
#include "orepa/io/state_dict.hpp"
#include "orepa/io/training_checkpoint.hpp"
#include "orepa/nn/optim.hpp"
#include "orepa/nn/yolo_train.hpp"
#include "orepa/yolo/dataset.hpp"
#include "orepa/yolo/loss.hpp"
#include "orepa/yolo/metrics.hpp"
#include "orepa/yolo/model.hpp"
#include "orepa/yolo/nms.hpp"

namespace orepa::yolo {

/// Where a Trainer writes its progress lines (nullptr: nowhere).
using LogStream = std::ostream*;

/// How a Trainer trains (YOLOv5's train.py defaults with hyp.scratch-low.yaml).
struct TrainOptions {
  /// @fn epochs(const std::int64_t&)
  /// @brief Sets epochs(); returns `*this` for chaining.
  /// @fn image_size(const int&)
  /// @brief Sets image_size(); returns `*this` for chaining.
  /// @fn batch_size(const int&)
  /// @brief Sets batch_size(); returns `*this` for chaining.
  /// @fn nominal_batch(const std::int64_t&)
  /// @brief Sets nominal_batch(); returns `*this` for chaining.
  /// @fn lr0(const double&)
  /// @brief Sets lr0(); returns `*this` for chaining.
  /// @fn lrf(const double&)
  /// @brief Sets lrf(); returns `*this` for chaining.
  /// @fn warmup_epochs(const double&)
  /// @brief Sets warmup_epochs(); returns `*this` for chaining.
  /// @fn decay(const LrDecay&)
  /// @brief Sets decay(); returns `*this` for chaining.
  /// @fn max_grad_norm(const double&)
  /// @brief Sets max_grad_norm(); returns `*this` for chaining.
  /// @fn augment(const bool&)
  /// @brief Sets augment(); returns `*this` for chaining.
  /// @fn augmentation(const AugmentOptions&)
  /// @brief Sets augmentation(); returns `*this` for chaining.
  /// @fn loss(const LossOptions&)
  /// @brief Sets loss(); returns `*this` for chaining.
  /// @fn ema(const ModelEMAOptions&)
  /// @brief Sets ema(); returns `*this` for chaining.
  /// @fn seed(const std::uint64_t&)
  /// @brief Sets seed(); returns `*this` for chaining.
  /// @fn workers(const int&)
  /// @brief Sets workers(); returns `*this` for chaining.
  /// @fn output(const std::string&)
  /// @brief Sets output(); returns `*this` for chaining.
  /// @fn overwrite(const bool&)
  /// @brief Sets overwrite(); returns `*this` for chaining.
  /// @fn log(const LogStream&)
  /// @brief Sets log(); returns `*this` for chaining.

  /// Epochs to train (default 10, >= 1).
  OREPA_OPTION(std::int64_t, epochs) = 10;
  /// Side of the square training images in pixels (default 640), a multiple of the model's largest stride.
  OREPA_OPTION(int, image_size) = 640;
  /// Images per batch (default 16), over all ranks in data-parallel training.
  OREPA_OPTION(int, batch_size) = 16;
  /// Gradients are accumulated to this many images per optimizer step (default 64).
  OREPA_OPTION(std::int64_t, nominal_batch) = 64;
  /// Initial learning rate (default 0.01).
  OREPA_OPTION(double, lr0) = 0.01;
  /// Final learning rate as a fraction of lr0 (default 0.01).
  OREPA_OPTION(double, lrf) = 0.01;
  /// Warm-up epochs (default 3; at least 100 iterations, as YOLOv5).
  OREPA_OPTION(double, warmup_epochs) = 3.0;
  /// Learning-rate decay over the epochs (default linear).
  OREPA_OPTION(LrDecay, decay) = LrDecay::linear;
  /// The gradient's global 2-norm is clipped to this before each step, as train.py's
  /// clip_grad_norm_ (default 10; 0: no clipping).
  OREPA_OPTION(double, max_grad_norm) = 10.0;
  /// Training augmentation (mosaic, affine, HSV, flips; default on).
  OREPA_OPTION(bool, augment) = true;
  /// The augmentation's settings (default hyp.scratch-low.yaml's).
  OREPA_OPTION(AugmentOptions, augmentation);
  /// The loss's hyperparameters (default hyp.scratch-low.yaml's).
  OREPA_OPTION(LossOptions, loss);
  /// The EMA's settings (default decay 0.9999, tau 2000).
  OREPA_OPTION(ModelEMAOptions, ema);
  /// Seed of the data order and the augmentation (default 0).
  OREPA_OPTION(std::uint64_t, seed) = 0;
  /// Loader threads (default 1; the batches do not depend on it).
  OREPA_OPTION(int, workers) = 1;
  /// Folder of the checkpoint `last.safetensors`, written after every epoch by rank 0
  /// (default "": no checkpoints). Checked, and created, when the Trainer is built.
  OREPA_OPTION(std::string, output);
  /// Replace a checkpoint already in the output folder (default false: config_error).
  OREPA_OPTION(bool, overwrite) = false;
  /// Where each epoch's progress line goes on rank 0 (default nullptr: nowhere).
  OREPA_OPTION(LogStream, log) = nullptr;

 public:
  /// This object (what the setters return).
  TrainOptions& self() { return *this; }
};

/// How a Trainer takes part in data-parallel training, as YOLOv5 v7.0's DDP mode: every
/// rank runs its own Trainer, built the same way (model, data set, options), and trains
/// on its share of every batch (LoaderOptions::ranks: TrainOptions::batch_size / ranks
/// images); all ranks take the same steps with the same schedule. Each rank's loss (box +
/// obj + cls times its share's size) is multiplied by `ranks` before backward, then
/// `average_gradients` replaces every gradient by its mean over the ranks, so every rank
/// clips and steps with the gradient of the sum of the ranks' losses. Only rank 0 writes
/// checkpoints and progress lines.
struct DataParallel {
  int rank = 0;   ///< this process's share, in [0, ranks)
  int ranks = 1;  ///< number of processes sharing every batch, a divisor of TrainOptions::batch_size
  /// Replaces every gradient of the Trainer's model by its mean over the ranks (e.g.
  /// `[&ddp] { ddp.average_gradients(); }` with a DistributedDataParallel wrapping
  /// trainer.model(), which also synchronises its BatchNorms). Called after every
  /// backward, before clipping and the optimizer step, collectively: every rank calls it
  /// the same number of times. A rank that throws (a non-finite loss) leaves the others
  /// waiting in it: run the ranks under dist::abort_on_exception, which ends them all.
  std::function<void()> average_gradients;
};

/// The loss terms of one batch (YOLOv5's loss items: after the gains, before the batch size).
struct LossItems {
  double box = 0;  ///< box (1 - CIoU) term
  double obj = 0;  ///< objectness term
  double cls = 0;  ///< class term
  /// box + obj + cls.
  double total() const { return box + obj + cls; }
};

/// What one epoch did.
struct EpochStats {
  std::int64_t epoch = 0;       ///< the epoch (0-based)
  LossItems mean;               ///< the loss terms averaged over the epoch's batches
  std::int64_t batches = 0;     ///< batches trained
  std::int64_t steps = 0;       ///< optimizer steps taken
  double seconds = 0;           ///< wall time
  double lr = 0;                ///< learning rate of the weights group at the end
};

/// How evaluate() runs a validation set (val.py's settings).
struct EvalOptions {
  /// @fn image_size(const int&)
  /// @brief Sets image_size(); returns `*this` for chaining.
  /// @fn batch_size(const int&)
  /// @brief Sets batch_size(); returns `*this` for chaining.
  /// @fn nms(const NmsOptions&)
  /// @brief Sets nms(); returns `*this` for chaining.

  /// Side of the square letterboxed images (default 640).
  OREPA_OPTION(int, image_size) = 640;
  /// Images per forward (default 16).
  OREPA_OPTION(int, batch_size) = 16;
  /// NMS settings (default val.py's: conf 0.001, IoU 0.6, multi-label).
  OREPA_OPTION(NmsOptions, nms) = NmsOptions::validation();

 public:
  /// This object (what the setters return).
  EvalOptions& self() { return *this; }
};

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
inline Tensor<float> eval_rows(const Model<float>& m, ConstTensorView<float> x) { return m.forward_eval(x).pred; }
inline Tensor<float> eval_rows(const DeployedModel<float>& m, ConstTensorView<float> x) { return m.predict(x); }

// The labels of image `i` of a batch as [m, 5] (class, x1, y1, x2, y2) in pixels of the
// batch's images (targets are normalised cx, cy, w, h).
inline Tensor<float> batch_labels(const Batch& b, std::int64_t i) {
  const float s = float(b.images.size(3));
  std::vector<float> rows;
  for (std::int64_t t = 0; b.targets.numel() != 0 && t < b.targets.size(0); ++t) {
    if (std::int64_t(b.targets(t, 0)) != i) continue;
    const float cx = b.targets(t, 2) * s, cy = b.targets(t, 3) * s, w = b.targets(t, 4) * s, h = b.targets(t, 5) * s;
    rows.insert(rows.end(), {b.targets(t, 1), cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2});
  }
  Tensor<float> l({std::int64_t(rows.size() / 5), 5});
  std::copy(rows.begin(), rows.end(), l.data());
  return l;
}

inline bool all_finite(const Tensor<float>& t) { return orepa::detail::all_finite(t.data(), t.numel()); }
}  // namespace detail
/// \endcond

/// val.py's metrics of `net` (a Model, run in eval form, or a DeployedModel) on `data`:
/// each image letterboxed to o.image_size(), NMS with o.nms(), detections matched to the
/// labels in the letterboxed pixels (IoU does not change under letterboxing's uniform
/// scale and shift). config_error when the data set's nc differs from the network's
/// classes; state_error when the network's output is not finite.
template <class Net>
MetricsResult evaluate(const Net& net, const YoloDataset& data, const EvalOptions& o = EvalOptions()) {
  const LoaderOptions lo = LoaderOptions().image_size(o.image_size()).batch_size(o.batch_size()).shuffle(false);
  DetectionMetrics metrics(data.num_classes());
  for (std::int64_t b = 0, nb = batches_per_epoch(data.size(), lo); b < nb; ++b) {
    const Batch batch = make_batch(data, lo, 0, b);
    const Tensor<float> pred = detail::eval_rows(net, batch.images);
    const std::int64_t nc = pred.size(2) - 5;
    if (nc != data.num_classes())
      throw config_error(orepa::detail::cat("yolo::evaluate: the network has ", nc, " classes but the data set ",
                                            data.source(), " has nc ", data.num_classes()));
    const auto dets = non_max_suppression<float>(pred, o.nms());
    for (std::int64_t i = 0; i < batch.images.size(0); ++i) metrics.add(dets[std::size_t(i)], detail::batch_labels(batch, i));
  }
  return metrics.compute();
}

/// Checks that `folder` can hold the files `files` before anything is trained: config_error
/// when it is not a folder, cannot be created (a parent is a file, no permission) or
/// written (a probe file cannot be made), or, without `overwrite`, already holds one of
/// `files`. Creates the folder when missing; writes nothing else.
inline void check_output_folder(const std::string& folder, const std::vector<std::string>& files, bool overwrite) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path dir(folder);
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    throw config_error("output folder '" + folder + "' exists and is not a folder");
  if (!fs::exists(dir, ec)) {
    for (fs::path p = fs::absolute(dir, ec).parent_path(); !p.empty(); p = p.parent_path()) {
      if (fs::exists(p, ec)) {
        if (!fs::is_directory(p, ec))
          throw config_error("output folder '" + folder + "' cannot be created: '" + p.string() + "' is not a folder");
        break;
      }
      if (p == p.root_path()) break;
    }
    if (!fs::create_directories(dir, ec) && ec)
      throw config_error("output folder '" + folder + "' cannot be created: " + ec.message());
  }
  for (const auto& f : files)
    if (!overwrite && fs::exists(dir / f, ec))
      throw config_error("output folder '" + folder + "' already holds " + f +
                         ": resume from it, choose another folder or set overwrite");
  const std::string probe = (dir / (".orepa-write-probe-" + std::to_string(::getpid()))).string();
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (fd < 0) throw config_error("output folder '" + folder + "' is not writable: " + std::strerror(errno));
  ::close(fd);
  ::unlink(probe.c_str());
}

/// YOLOv5's training loop for a float Model (see the file comment). Not copyable or movable
/// (the optimizer points into the model).
class Trainer {
 public:
  /// The checkpoint's file name inside TrainOptions::output.
  static constexpr const char* checkpoint_name = "last.safetensors";

  /// Takes `model` and the training set over. Throws config_error for a data set whose nc
  /// is not the model's, an image size that is not a multiple of the model's largest
  /// stride, invalid options, or an output folder that fails check_output_folder (all
  /// before anything is written).
  Trainer(Model<float> model, YoloDataset train, const TrainOptions& o)
      : o_(o),
        model_(std::move(model)),
        train_(std::move(train)),
        loader_(validated(LoaderOptions()
                              .image_size(o.image_size())
                              .batch_size(o.batch_size())
                              .augment(o.augment())
                              .augmentation(o.augmentation())
                              .seed(o.seed())
                              .workers(o.workers()))),
        sched_(YoloScheduleOptions(o.epochs(), o.batch_size(), yolo::batches_per_epoch(train_.size(), loader_))
                   .lr0(o.lr0())
                   .lrf(o.lrf())
                   .warmup_epochs(o.warmup_epochs())
                   .decay(o.decay())
                   .nominal_batch(o.nominal_batch())),
        opt_(yolo_param_groups(model_, sched_.weight_decay()),
             SGDOptions(o.lr0()).momentum(sched_.options().momentum()).nesterov(true)),
        ema_(model_.clone(), model_, o.ema()),
        loss_(model_.detect().anchors(), model_.strides(), o.loss()) {
    if (train_.num_classes() != model_.classes())
      throw config_error(orepa::detail::cat("yolo::Trainer: the training set ", train_.source(), " has nc ",
                                            train_.num_classes(), " but the model has ", model_.classes(), " classes"));
    const auto stride = std::int64_t(*std::max_element(model_.strides().begin(), model_.strides().end()));
    if (o.image_size() % stride != 0)
      throw config_error(orepa::detail::cat("yolo::Trainer: image_size ", o.image_size(),
                                            " is not a multiple of the model's largest stride ", stride));
    if (!(o.max_grad_norm() >= 0))
      throw config_error(orepa::detail::cat("yolo::Trainer: max_grad_norm must be >= 0, got ", o.max_grad_norm()));
    if (!o.output().empty()) check_output_folder(o.output(), {checkpoint_name}, o.overwrite());
    model_.set_input_grad(false);  // the images need no gradient
    opt_.zero_grad();
  }
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// The model being trained.
  Model<float>& model() { return model_; }
  /// The EMA of the model (validate, deploy and export this one, as YOLOv5 does).
  ModelEMA<Model<float>>& ema() { return ema_; }
  /// The optimizer.
  SGD<float>& optimizer() { return opt_; }
  /// The schedule.
  const YoloSchedule& schedule() const { return sched_; }
  /// The settings.
  const TrainOptions& options() const { return o_; }
  /// The loader settings the training batches come from (make_batch(train_set(), ...)).
  const LoaderOptions& loader_options() const { return loader_; }
  /// The training set.
  const YoloDataset& train_set() const { return train_; }
  /// Batches per epoch.
  std::int64_t batches_per_epoch() const { return sched_.options().batches_per_epoch(); }
  /// The epoch the next batch belongs to.
  std::int64_t epoch() const { return epoch_; }
  /// Index of the next batch within its epoch.
  std::int64_t batch_in_epoch() const { return batch_; }
  /// Batches trained since the start (YOLOv5's ni of the next batch).
  std::int64_t iteration() const { return iteration_; }
  /// True when every epoch has been trained.
  bool done() const { return epoch_ >= o_.epochs(); }
  /// The checkpoint's path ("" without an output folder).
  std::string checkpoint_path() const {
    return o_.output().empty() ? std::string() : (std::filesystem::path(o_.output()) / checkpoint_name).string();
  }

  /// Makes this Trainer rank `dp.rank` of `dp.ranks` in data-parallel training (see
  /// DataParallel): from now on it trains on its share of every batch, scales the loss and
  /// calls dp.average_gradients after every backward; the EMA restarts from the model's
  /// weights (which a DistributedDataParallel built on model() has just set to rank 0's).
  /// Call it before training and before resume(). config_error when rank is outside
  /// [0, ranks) or batch_size is not a multiple of ranks; state_error after training began.
  void data_parallel(DataParallel dp) {
    if (iteration_ != 0)
      throw state_error(orepa::detail::cat("yolo::Trainer::data_parallel: training began (iteration ", iteration_,
                                           "); call it before the first batch and before resume()"));
    if (dp.ranks < 1 || dp.rank < 0 || dp.rank >= dp.ranks)
      throw config_error(orepa::detail::cat("yolo::Trainer::data_parallel: rank ", dp.rank, " is outside [0, ", dp.ranks,
                                            ") of ", dp.ranks, " ranks"));
    if (o_.batch_size() % dp.ranks != 0)
      throw config_error(orepa::detail::cat("yolo::Trainer::data_parallel: batch_size ", o_.batch_size(),
                                            " is not a multiple of the ", dp.ranks,
                                            " ranks (every rank trains an equal share of a batch)"));
    loader_ = validated(LoaderOptions(loader_).ranks(dp.ranks).rank(dp.rank));
    ema_.module().load_state_dict(model_.state_dict());
    dp_ = std::move(dp);
  }
  /// The data-parallel settings (default: rank 0 of 1, no hook).
  const DataParallel& data_parallel() const { return dp_; }

  /// Trains one batch (the next one: make_batch(train_set(), loader_options(), epoch(),
  /// batch_in_epoch()) gives it, this rank's share in data-parallel training) and steps
  /// the optimizer when the schedule says so. Returns its loss terms (of this rank's
  /// share). state_error (see the file comment) when a value is not finite: nothing has
  /// stepped and the counters stay.
  LossItems train_batch(const Batch& b) {
    if (done()) throw state_error(orepa::detail::cat("yolo::Trainer::train_batch: all ", o_.epochs(), " epochs are trained"));
    const std::int64_t ni = iteration_;
    sched_.apply(opt_, ni, epoch_);
    const std::vector<Tensor<float>> maps = model_.forward_train(b.images);
    for (std::size_t i = 0; i < maps.size(); ++i)
      if (!detail::all_finite(maps[i])) fail_not_finite(b, orepa::detail::cat("raw map of level ", i));
    const std::vector<ConstTensorView<float>> views(maps.begin(), maps.end());
    LossResult<float> r = loss_(views, b.targets);
    if (!r.finite()) fail_not_finite(b, orepa::detail::cat("loss (box ", r.items[0], " obj ", r.items[1], " cls ", r.items[2], ")"));
    // train.py's `loss *= WORLD_SIZE`: averaged over the ranks, the gradients are then
    // those of the sum of the ranks' losses.
    if (dp_.ranks > 1)
      for (auto& g : r.grad)
        for (float& v : g) v *= float(dp_.ranks);
    model_.backward(r.grad);
    if (dp_.average_gradients) dp_.average_gradients();
    if (sched_.should_step(ni)) {
      clip_gradients();
      opt_.step();
      opt_.zero_grad();
      ema_.update(model_);
    }
    ++iteration_;
    if (++batch_ == batches_per_epoch()) batch_ = 0, ++epoch_;
    return {double(r.items[0]), double(r.items[1]), double(r.items[2])};
  }

  /// Trains the rest of the current epoch (all of it unless resumed in its middle), writes
  /// the checkpoint when there is an output folder, prints the progress line to the log
  /// (both on rank 0 only in data-parallel training).
  EpochStats train_epoch() {
    if (done()) throw state_error(orepa::detail::cat("yolo::Trainer::train_epoch: all ", o_.epochs(), " epochs are trained"));
    const auto t0 = std::chrono::steady_clock::now();
    EpochStats s;
    s.epoch = epoch_;
    const std::int64_t steps0 = opt_.steps(), first = batch_, nb = batches_per_epoch();
    auto add = [&](const LossItems& l) {
      s.mean.box += l.box, s.mean.obj += l.obj, s.mean.cls += l.cls;
      ++s.batches;
    };
    if (first == 0) {  // a whole epoch: the threaded loader prepares the next batch meanwhile
      DataLoader loader(train_, loader_, epoch_);
      for (std::int64_t b = 0; b < nb; ++b) add(train_batch(loader.next()));
    } else {
      for (std::int64_t b = first; b < nb; ++b) add(train_batch(make_batch(train_, loader_, s.epoch, b)));
    }
    s.mean.box /= double(s.batches), s.mean.obj /= double(s.batches), s.mean.cls /= double(s.batches);
    s.steps = opt_.steps() - steps0;
    s.lr = double(opt_.groups().at(1).lr.value_or(0));
    if (!o_.output().empty() && dp_.rank == 0) save(checkpoint_path());
    s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (o_.log() && dp_.rank == 0) {
      char line[200];
      std::snprintf(line, sizeof line, "epoch %3lld/%lld  box %.4f  obj %.4f  cls %.4f  total %.4f  lr %.5f  %6.1f s\n",
                    static_cast<long long>(s.epoch + 1), static_cast<long long>(o_.epochs()), s.mean.box, s.mean.obj,
                    s.mean.cls, s.mean.total(), s.lr, s.seconds);
      *o_.log() << line << std::flush;
    }
    return s;
  }

  /// val.py's metrics of the EMA model on `val` at the training image size.
  MetricsResult validate(const YoloDataset& val, EvalOptions eo = EvalOptions()) {
    return evaluate(ema_.module(), val, eo.image_size(o_.image_size()).batch_size(o_.batch_size()));
  }

  /// Writes the whole state (model, ema, optimizer, schedule, epoch, batch, iteration) to
  /// `path` atomically.
  void save(const std::string& path) {
    auto c = checkpoint();
    io::save(c, path);
  }
  /// Continues the run saved in `path` by a Trainer built the same way (model, data set
  /// and options): every part or none (format_error naming what does not fit).
  void resume(const std::string& path) {
    auto c = checkpoint();
    io::load(c, path);
  }

 private:
  static LoaderOptions validated(LoaderOptions o) {
    o.validate();
    return o;
  }

  io::TrainingCheckpoint<float> checkpoint() {
    io::TrainingCheckpoint<float> c;
    c.add("model", model_).add("ema", ema_).add("optimizer", opt_).add("schedule", sched_);
    c.add("epoch", epoch_).add("batch", batch_).add("iteration", iteration_);
    return c;
  }

  // train.py's clip_grad_norm_(max_norm): every gradient times max_norm / (norm + 1e-6)
  // when that is below 1 (norm: the 2-norm of all gradients together).
  void clip_gradients() {
    if (o_.max_grad_norm() <= 0) return;
    double sq = 0;
    for (auto* p : model_.parameters())
      for (float g : p->grad) sq += double(g) * double(g);
    const double coef = o_.max_grad_norm() / (std::sqrt(sq) + 1e-6);
    if (coef >= 1) return;
    const float c = float(coef);
    for (auto* p : model_.parameters())
      for (float& g : p->grad) g *= c;
  }

  [[noreturn]] void fail_not_finite(const Batch& b, const std::string& what) {
    std::string where;
    for (const auto& group : {model_.named_parameters(), model_.named_buffers()}) {
      for (const auto& [name, p] : group)
        if (!detail::all_finite(p->value)) {
          where = "parameter or buffer " + name + " holds a non-finite value";
          break;
        }
      if (!where.empty()) break;
    }
    if (where.empty()) {
      const auto outs = model_.layer_outputs(b.images);
      for (std::size_t i = 0; i < outs.size() && where.empty(); ++i)
        if (!detail::all_finite(outs[i]))
          where = orepa::detail::cat("the first non-finite output is layer ", i, "'s (", model_.module_name(i), ")");
    }
    if (where.empty()) where = "the parameters and layer outputs are finite";
    throw state_error(orepa::detail::cat("yolo::Trainer: the ", what, " is not finite at epoch ", epoch_, " batch ",
                                         batch_, " (iteration ", iteration_, "); ", where,
                                         "; training stopped before the optimizer step",
                                         std::filesystem::exists(checkpoint_path())
                                             ? "; the last good checkpoint is " + checkpoint_path()
                                             : std::string()));
  }

  TrainOptions o_;
  Model<float> model_;
  YoloDataset train_;
  LoaderOptions loader_;
  YoloSchedule sched_;
  SGD<float> opt_;
  ModelEMA<Model<float>> ema_;
  DetectionLoss<float> loss_;
  DataParallel dp_;
  std::int64_t epoch_ = 0, batch_ = 0, iteration_ = 0;
};

}  // namespace orepa::yolo
