#pragma once
/// @file yolo_train.hpp
/// How YOLOv5 (v7.0, train.py with hyp.scratch-low.yaml) trains, for any module with the
/// layer members (blocks/block.hpp):
///   - yolo_param_groups(): its three SGD parameter groups (biases, weights with decay,
///     BN weights);
///   - YoloSchedule: warm-up of the learning rates and the momentum, the linear or cosine
///     decay per epoch, and gradient accumulation to a nominal batch of 64;
///   - ModelEMA: the exponential moving average of the weights and BN statistics.
/// Each has state_dict() / load_state_dict(), so a TrainingCheckpoint of model, EMA,
/// optimizer and schedule resumes bit-identically.
///
///   YoloSchedule sched(YoloScheduleOptions(epochs, batch, batches_per_epoch));
///   SGD<float> opt(yolo_param_groups(model, sched.weight_decay()),
///                  SGDOptions(sched.options().lr0()).momentum(sched.options().momentum()).nesterov(true));
///   ModelEMA<Net> ema(build(), model);                 // a second instance, set to model's weights
///   for (epoch...) for (i...) {
///     const std::int64_t ni = i + batches_per_epoch * epoch;   // iterations since the start
///     sched.apply(opt, ni, epoch);                     // lr of every group, momentum
///     ...forward, loss (times the batch size, as YOLOv5's), backward (gradients add up)...
///     if (sched.should_step(ni)) { opt.step(); opt.zero_grad(); ema.update(model); }
///   }

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "orepa/blocks/module.hpp"
#include "orepa/core/error.hpp"
#include "orepa/core/options.hpp"
#include "orepa/core/parallel.hpp"
#include "orepa/core/state_dict.hpp"
#include "orepa/nn/optim.hpp"

namespace orepa {

/// YOLOv5's parameter groups, in its order: [0] biases (every tensor named "...bias", and
/// ParamKind::bias) without decay, [1] weights (kernels, and OREPA's branch-scaling
/// `vector`, which YOLOv5's rule also puts here) with `weight_decay`, [2] BN weights
/// (ParamKind::norm) without decay. Learning rates are left to the optimizer. YoloSchedule
/// gives group 0 the warm-up bias learning rate.
template <class Module>
auto yolo_param_groups(Module& model, double weight_decay) {
  using S = typename decltype(model.state_dict())::Scalar;
  if (!(weight_decay >= 0))
    throw config_error(detail::cat("yolo_param_groups: weight_decay must be >= 0, got ", weight_decay));
  std::vector<ParamGroup<S>> g{ParamGroup<S>({}, std::nullopt, S(0)), ParamGroup<S>({}, std::nullopt, S(weight_decay)),
                               ParamGroup<S>({}, std::nullopt, S(0))};
  const std::string bias = "bias";
  for (auto& [name, p] : model.named_parameters()) {
    const bool named_bias = name.size() >= bias.size() && name.compare(name.size() - bias.size(), bias.size(), bias) == 0 &&
                            (name.size() == bias.size() || name[name.size() - bias.size() - 1] == '.');
    const std::size_t i = named_bias || p->kind == ParamKind::bias ? 0 : p->kind == ParamKind::norm ? 2 : 1;
    g[i].params.push_back(p);
  }
  return g;
}

/// The shape of the learning-rate decay over the epochs (YOLOv5's lf).
enum class LrDecay {
  linear,  ///< (1 - x / epochs) * (1 - lrf) + lrf
  cosine,  ///< ((1 - cos(x * pi / epochs)) / 2) * (lrf - 1) + 1 (YOLOv5's one_cycle, --cos-lr)
};

/// YOLOv5's schedule settings: the run's size (required) and hyp.scratch-low.yaml's values.
struct YoloScheduleOptions {
  /// A run of `epochs` epochs of `batches_per_epoch` batches of `batch_size` images.
  YoloScheduleOptions(std::int64_t epochs, std::int64_t batch_size, std::int64_t batches_per_epoch)
      : epochs_(epochs), batch_size_(batch_size), batches_per_epoch_(batches_per_epoch) {}

  /// @fn epochs(const std::int64_t&)
  /// @brief Sets epochs(); returns `*this` for chaining.
  /// @fn batch_size(const std::int64_t&)
  /// @brief Sets batch_size(); returns `*this` for chaining.
  /// @fn batches_per_epoch(const std::int64_t&)
  /// @brief Sets batches_per_epoch(); returns `*this` for chaining.
  /// @fn lr0(const double&)
  /// @brief Sets lr0(); returns `*this` for chaining.
  /// @fn lrf(const double&)
  /// @brief Sets lrf(); returns `*this` for chaining.
  /// @fn momentum(const double&)
  /// @brief Sets momentum(); returns `*this` for chaining.
  /// @fn weight_decay(const double&)
  /// @brief Sets weight_decay(); returns `*this` for chaining.
  /// @fn warmup_epochs(const double&)
  /// @brief Sets warmup_epochs(); returns `*this` for chaining.
  /// @fn warmup_momentum(const double&)
  /// @brief Sets warmup_momentum(); returns `*this` for chaining.
  /// @fn warmup_bias_lr(const double&)
  /// @brief Sets warmup_bias_lr(); returns `*this` for chaining.
  /// @fn decay(const LrDecay&)
  /// @brief Sets decay(); returns `*this` for chaining.
  /// @fn nominal_batch(const std::int64_t&)
  /// @brief Sets nominal_batch(); returns `*this` for chaining.

  /// Number of epochs (>= 1).
  OREPA_OPTION(std::int64_t, epochs);
  /// Images per batch (>= 1).
  OREPA_OPTION(std::int64_t, batch_size);
  /// Batches per epoch (>= 1).
  OREPA_OPTION(std::int64_t, batches_per_epoch);
  /// Initial learning rate (default 0.01).
  OREPA_OPTION(double, lr0) = 0.01;
  /// Final learning rate as a fraction of lr0 (default 0.01).
  OREPA_OPTION(double, lrf) = 0.01;
  /// SGD momentum after the warm-up (default 0.937).
  OREPA_OPTION(double, momentum) = 0.937;
  /// Weight decay at the nominal batch (default 5e-4; scaled, see YoloSchedule::weight_decay).
  OREPA_OPTION(double, weight_decay) = 5e-4;
  /// Warm-up length in epochs (default 3; at least 100 iterations).
  OREPA_OPTION(double, warmup_epochs) = 3.0;
  /// Momentum at the start of the warm-up (default 0.8).
  OREPA_OPTION(double, warmup_momentum) = 0.8;
  /// Learning rate of the bias group at the start of the warm-up (default 0.1).
  OREPA_OPTION(double, warmup_bias_lr) = 0.1;
  /// Decay of the learning rate over the epochs (default linear).
  OREPA_OPTION(LrDecay, decay) = LrDecay::linear;
  /// The batch size gradients are accumulated to (default 64).
  OREPA_OPTION(std::int64_t, nominal_batch) = 64;

 public:
  /// This object (what the setters return).
  YoloScheduleOptions& self() { return *this; }
};

/// YOLOv5's training schedule as closed forms of the iteration ni (batches since the
/// start: i + batches_per_epoch * epoch) and the epoch, with nw = warmup_iterations():
///   - lf(x): LrDecay's formula; after the warm-up every group's lr is lr0 * lf(epoch);
///   - warm-up (ni <= nw), linear in ni from 0 to nw: group 0's lr from warmup_bias_lr,
///     the other groups' from 0, to lr0 * lf(epoch); momentum from warmup_momentum to
///     momentum; the accumulation from 1 to nominal_batch / batch_size batches, rounded;
///   - the optimizer steps when ni - (the last step's ni) >= accumulate(ni).
/// Rounding is Python's (half to even), as YOLOv5's round() and numpy's round().
/// Its state (should_step()'s last step) and settings are in state_dict().
class YoloSchedule {
 public:
  /// Throws config_error for a size < 1, a negative rate, warm-up length or momentum, or
  /// lrf outside [0, 1].
  explicit YoloSchedule(const YoloScheduleOptions& o) : o_(o) {
    const std::string bad = problem(o);
    if (!bad.empty()) throw config_error("YoloSchedule: " + bad);
  }

  /// The settings.
  const YoloScheduleOptions& options() const { return o_; }
  /// YOLOv5's lf(x): the learning rate of epoch x as a fraction of lr0.
  double lf(double x) const {
    const double e = double(o_.epochs());
    if (o_.decay() == LrDecay::linear) return (1 - x / e) * (1 - o_.lrf()) + o_.lrf();
    return ((1 - std::cos(x * pi / e)) / 2) * (o_.lrf() - 1) + 1;
  }
  /// Warm-up iterations nw = max(round(warmup_epochs * batches_per_epoch), 100).
  std::int64_t warmup_iterations() const {
    return std::max<std::int64_t>(std::int64_t(std::nearbyint(o_.warmup_epochs() * double(o_.batches_per_epoch()))), 100);
  }
  /// Batches per optimizer step after the warm-up: max(round(nominal_batch / batch_size), 1).
  std::int64_t accumulate() const {
    return std::max<std::int64_t>(std::int64_t(std::nearbyint(double(o_.nominal_batch()) / double(o_.batch_size()))), 1);
  }
  /// Batches per optimizer step at iteration `ni` (rises during the warm-up).
  std::int64_t accumulate(std::int64_t ni) const {
    if (ni > warmup_iterations()) return accumulate();
    const double a = interp(ni, 1.0, double(o_.nominal_batch()) / double(o_.batch_size()));
    return std::max<std::int64_t>(1, std::int64_t(std::nearbyint(a)));
  }
  /// The weight decay to give group 1: weight_decay * batch_size * accumulate() / nominal_batch.
  double weight_decay() const {
    return o_.weight_decay() * double(o_.batch_size()) * double(accumulate()) / double(o_.nominal_batch());
  }
  /// The learning rate of parameter group `group` (0: biases) at iteration `ni` of `epoch`.
  double lr(std::size_t group, std::int64_t ni, std::int64_t epoch) const {
    const double target = o_.lr0() * lf(double(epoch));
    if (ni > warmup_iterations()) return target;
    return interp(ni, group == 0 ? o_.warmup_bias_lr() : 0.0, target);
  }
  /// The SGD momentum at iteration `ni`.
  double momentum(std::int64_t ni) const {
    if (ni > warmup_iterations()) return o_.momentum();
    return interp(ni, o_.warmup_momentum(), o_.momentum());
  }
  /// Sets every group's learning rate and the momentum of `opt` for iteration `ni` of
  /// `epoch` (config_error for a negative ni or epoch).
  template <class S>
  void apply(SGD<S>& opt, std::int64_t ni, std::int64_t epoch) const {
    if (ni < 0 || epoch < 0)
      throw config_error(detail::cat("YoloSchedule::apply: ni and epoch must be >= 0, got ", ni, " and ", epoch));
    for (std::size_t g = 0; g < opt.groups().size(); ++g) opt.set_lr(g, S(lr(g, ni, epoch)));
    opt.set_momentum(momentum(ni));
  }
  /// Call once per batch, after its backward: true when the optimizer is to step now
  /// (ni - the last step's ni >= accumulate(ni)), which it then records as the last step.
  bool should_step(std::int64_t ni) {
    if (ni - last_step_ < accumulate(ni)) return false;
    last_step_ = ni;
    return true;
  }
  /// The iteration of the last step should_step() gave (-1 before the first).
  std::int64_t last_step() const { return last_step_; }

  /// Every setting (reals and counters under the option names, "decay" 0 linear / 1
  /// cosine) and the counter "last_step".
  template <class S = float>
  StateDict<S> state_dict() const {
    StateDict<S> sd;
    sd.insert_count("epochs", o_.epochs());
    sd.insert_count("batch_size", o_.batch_size());
    sd.insert_count("batches_per_epoch", o_.batches_per_epoch());
    sd.insert_real("lr0", o_.lr0());
    sd.insert_real("lrf", o_.lrf());
    sd.insert_real("momentum", o_.momentum());
    sd.insert_real("weight_decay", o_.weight_decay());
    sd.insert_real("warmup_epochs", o_.warmup_epochs());
    sd.insert_real("warmup_momentum", o_.warmup_momentum());
    sd.insert_real("warmup_bias_lr", o_.warmup_bias_lr());
    sd.insert_count("decay", o_.decay() == LrDecay::cosine ? 1 : 0);
    sd.insert_count("nominal_batch", o_.nominal_batch());
    sd.insert_count("last_step", last_step_);
    return sd;
  }
  /// Restores state_dict()'s settings and state; format_error naming every entry that is
  /// missing, unexpected or invalid (the schedule unchanged).
  template <class S>
  void load_state_dict(const StateDict<S>& sd) {
    StateReader<S> r(sd, "YoloSchedule");
    YoloScheduleOptions o(r.count("epochs"), r.count("batch_size"), r.count("batches_per_epoch"));
    o.lr0(r.real("lr0")).lrf(r.real("lrf")).momentum(r.real("momentum")).weight_decay(r.real("weight_decay"));
    o.warmup_epochs(r.real("warmup_epochs")).warmup_momentum(r.real("warmup_momentum"));
    o.warmup_bias_lr(r.real("warmup_bias_lr")).nominal_batch(r.count("nominal_batch"));
    const std::int64_t decay = r.count("decay"), last = r.count("last_step");
    o.decay(decay == 1 ? LrDecay::cosine : LrDecay::linear);
    if (r.fits()) {
      if (decay != 0 && decay != 1) r.invalid(detail::cat("decay ", decay, " (0 linear or 1 cosine)"));
      if (last < -1) r.invalid(detail::cat("last_step ", last, " (must be >= -1)"));
      const std::string bad = problem(o);
      if (!bad.empty()) r.invalid(bad);
    }
    r.finish();
    o_ = o;
    last_step_ = last;
  }

 private:
  static constexpr double pi = 3.14159265358979323846;
  // numpy.interp(ni, [0, nw], [a, b]) for 0 <= ni <= nw: exact at both ends.
  double interp(std::int64_t ni, double a, double b) const {
    const std::int64_t nw = warmup_iterations();
    if (ni <= 0) return a;
    if (ni >= nw) return b;
    return (b - a) / double(nw) * double(ni) + a;
  }
  // What is wrong with these settings ("" when nothing).
  static std::string problem(const YoloScheduleOptions& o) {
    if (o.epochs() < 1 || o.batch_size() < 1 || o.batches_per_epoch() < 1 || o.nominal_batch() < 1)
      return detail::cat("epochs, batch_size, batches_per_epoch and nominal_batch must be >= 1, got ", o.epochs(), ", ",
                         o.batch_size(), ", ", o.batches_per_epoch(), " and ", o.nominal_batch());
    for (auto [name, v] : {std::pair{"lr0", o.lr0()}, std::pair{"momentum", o.momentum()},
                           std::pair{"weight_decay", o.weight_decay()}, std::pair{"warmup_epochs", o.warmup_epochs()},
                           std::pair{"warmup_momentum", o.warmup_momentum()},
                           std::pair{"warmup_bias_lr", o.warmup_bias_lr()}})
      if (!(v >= 0) || !std::isfinite(v)) return detail::cat(name, " must be finite and >= 0, got ", v);
    if (!(o.lrf() >= 0 && o.lrf() <= 1)) return detail::cat("lrf must be in [0, 1], got ", o.lrf());
    if (!(o.momentum() > 0)) return detail::cat("momentum must be > 0 (Nesterov), got ", o.momentum());
    return "";
  }

  YoloScheduleOptions o_;
  std::int64_t last_step_ = -1;
};

/// Settings of ModelEMA (YOLOv5's defaults).
struct ModelEMAOptions {
  /// @fn decay(const double&)
  /// @brief Sets decay(); returns `*this` for chaining.
  /// @fn tau(const double&)
  /// @brief Sets tau(); returns `*this` for chaining.

  /// The decay the ramp tends to (default 0.9999), in [0, 1].
  OREPA_OPTION(double, decay) = 0.9999;
  /// The ramp's time constant in updates (default 2000), > 0.
  OREPA_OPTION(double, tau) = 2000.0;

 public:
  /// This object (what the setters return).
  ModelEMAOptions& self() { return *this; }
};

/// YOLOv5's exponential moving average of a model: after each optimizer step,
/// update(model) sets every parameter and buffer (BN running statistics included) of the
/// EMA module to d * ema + (1 - d) * model with d = decay * (1 - exp(-updates / tau))
/// (updates counted from 1), and copies every BN's num_batches_tracked. Tensors are
/// paired by name and checked for shape. The EMA module is a second instance of the
/// model's structure that the caller provides (built the same way, or a clone); the
/// constructor sets it to the model's weights.
template <class Module>
class ModelEMA {
 public:
  /// The scalar of the tensors.
  using Scalar = typename decltype(std::declval<const Module&>().state_dict())::Scalar;

  /// Takes `ema` over and loads `model`'s state into it (format_error when the two do not
  /// have the same tensors); config_error for decay outside [0, 1] or tau <= 0.
  ModelEMA(Module ema, const Module& model, const ModelEMAOptions& opts = ModelEMAOptions())
      : ema_(std::move(ema)), o_(opts) {
    const std::string bad = problem(opts.decay(), opts.tau());
    if (!bad.empty()) throw config_error("ModelEMA: " + bad);
    ema_.load_state_dict(model.state_dict());
  }

  /// The averaged module (evaluate, deploy or save this one).
  Module& module() { return ema_; }
  /// The averaged module, read-only.
  const Module& module() const { return ema_; }
  /// Number of update() calls so far.
  std::int64_t updates() const { return updates_; }
  /// The settings.
  const ModelEMAOptions& options() const { return o_; }
  /// The decay the `updates`-th update uses: decay * (1 - exp(-updates / tau)).
  double decay(std::int64_t updates) const { return o_.decay() * (1 - std::exp(-double(updates) / o_.tau())); }

  /// Moves the average towards `model` (same structure; state_error naming the first
  /// tensor whose name or shape differs, nothing changed).
  template <class Model>
  void update(Model& model) {
    using S = Scalar;
    Tensors<S> e, m;
    ema_.collect_tensors(e, "");
    model.collect_tensors(m, "");
    check_pairs(e.parameters, m.parameters, "parameter");
    check_pairs(e.buffers, m.buffers, "buffer");
    if (e.batch_norms.size() != m.batch_norms.size())
      throw state_error(detail::cat("ModelEMA::update: the model has ", m.batch_norms.size(), " BatchNorms, the EMA ",
                                    e.batch_norms.size()));
    const double d = decay(updates_ + 1);
    const S keep = S(d), take = S(1 - d);
    // Every parameter's and buffer's elements as one index range, split over the threads.
    std::vector<std::pair<S*, const S*>> spans;
    std::vector<std::int64_t> sizes;
    auto add = [&](const NamedParams<S>& to, const NamedParams<S>& from) {
      for (std::size_t i = 0; i < to.size(); ++i) {
        spans.emplace_back(to[i].second->value.data(), from[i].second->value.data());
        sizes.push_back(to[i].second->value.numel());
      }
    };
    add(e.parameters, m.parameters);
    add(e.buffers, m.buffers);
    parallel_spans(sizes, [&](std::size_t k, std::int64_t j0, std::int64_t j1) {
      S* ev = spans[k].first;
      const S* mv = spans[k].second;
      OREPA_SIMD
      for (std::int64_t j = j0; j < j1; ++j) {
        const S decayed = ev[j] * keep;  // YOLOv5: v *= d; v += (1 - d) * model_v
        ev[j] = decayed + take * mv[j];
      }
    });
    for (std::size_t i = 0; i < e.batch_norms.size(); ++i)
      e.batch_norms[i].second->num_batches_tracked = m.batch_norms[i].second->num_batches_tracked;
    ++updates_;
  }

  /// The counter "updates", the reals "decay" and "tau", and the EMA module's state
  /// dict under "module.".
  StateDict<Scalar> state_dict() const {
    StateDict<Scalar> sd;
    sd.insert_count("updates", updates_);
    sd.insert_real("decay", o_.decay());
    sd.insert_real("tau", o_.tau());
    for (const auto& [n, e] : ema_.state_dict()) sd.insert("module." + n, e);
    return sd;
  }
  /// Restores state_dict() (the module strictly, as its own load_state_dict); format_error
  /// naming what does not fit, nothing changed.
  void load_state_dict(const StateDict<Scalar>& sd) {
    StateDict<Scalar> own, module;
    for (const auto& [n, e] : sd) {
      if (n.compare(0, 7, "module.") == 0) module.insert(n.substr(7), e.is_tensor() ? StateEntry<Scalar>(e.tensor().alias()) : e);
      else own.insert(n, e);
    }
    StateReader<Scalar> r(own, "ModelEMA");
    const std::int64_t updates = r.count("updates");
    const double decay = r.real("decay"), tau = r.real("tau");
    if (r.fits()) {
      if (updates < 0) r.invalid(detail::cat("updates ", updates, " (must be >= 0)"));
      const std::string bad = problem(decay, tau);
      if (!bad.empty()) r.invalid(bad);
    }
    r.finish();
    ema_.load_state_dict(module);  // all or nothing itself; the rest cannot fail
    updates_ = updates;
    o_.decay(decay).tau(tau);
  }

 private:
  static std::string problem(double decay, double tau) {
    if (!(decay >= 0 && decay <= 1)) return detail::cat("decay must be in [0, 1], got ", decay);
    if (!(tau > 0) || !std::isfinite(tau)) return detail::cat("tau must be finite and > 0, got ", tau);
    return "";
  }
  template <class S>
  static void check_pairs(const NamedParams<S>& e, const NamedParams<S>& m, const char* what) {
    if (e.size() != m.size())
      throw state_error(detail::cat("ModelEMA::update: the model has ", m.size(), " ", what, "s, the EMA ", e.size()));
    for (std::size_t i = 0; i < e.size(); ++i)
      if (e[i].first != m[i].first || e[i].second->value.sizes() != m[i].second->value.sizes())
        throw state_error(detail::cat("ModelEMA::update: ", what, " ", i, " is ", m[i].first, " ",
                                      shape_str(m[i].second->value.sizes()), " in the model but ", e[i].first, " ",
                                      shape_str(e[i].second->value.sizes()), " in the EMA"));
  }

  Module ema_;
  ModelEMAOptions o_;
  std::int64_t updates_ = 0;
};

}  // namespace orepa
