#pragma once
/// @file schedule.hpp
/// Learning-rate schedules as pure functions of the step index (0-based), to feed
/// Optimizer::set_lr before each step:
///   for (std::int64_t s = 0; s < steps; ++s) { opt.set_lr(float(sched.lr(s))); ...; opt.step(); }
/// Their state_dict() is their settings (a resumed run keeps the schedule it started
/// with, as torch's schedulers do); the step index is the caller's.

#include <cmath>
#include <cstdint>
#include <string>

#include "orepa/core/error.hpp"
#include "orepa/core/state_dict.hpp"

namespace orepa {

/// Optional linear warm-up, then cosine annealing from base_lr to min_lr.
///   step < warmup:            base_lr * (step + 1) / warmup
///   warmup <= step <= total:  min_lr + (base_lr - min_lr) * (1 + cos(pi * t / T)) / 2,
///                             t = step - warmup, T = total - warmup
///   step > total:             min_lr
/// After the warm-up this is torch.optim.lr_scheduler.CosineAnnealingLR(T_max = T,
/// eta_min = min_lr) in closed form; it stays at min_lr past the end instead of rising.
class CosineSchedule {
 public:
  /// Throws config_error unless total_steps >= 1, 0 <= warmup_steps < total_steps and
  /// both rates are >= 0.
  CosineSchedule(double base_lr, std::int64_t total_steps, std::int64_t warmup_steps = 0, double min_lr = 0.0)
      : base_(base_lr), min_(min_lr), total_(total_steps), warmup_(warmup_steps) {
    const std::string bad = problem(base_lr, total_steps, warmup_steps, min_lr);
    if (!bad.empty()) throw config_error("CosineSchedule: " + bad);
  }
  /// The learning rate of step `step` (>= 0; config_error otherwise).
  double lr(std::int64_t step) const {
    if (step < 0) throw config_error(detail::cat("CosineSchedule::lr: step must be >= 0, got ", step));
    if (step < warmup_) return base_ * double(step + 1) / double(warmup_);
    if (step >= total_) return min_;
    const double progress = double(step - warmup_) / double(total_ - warmup_);
    return min_ + (base_ - min_) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
  }

  /// The settings: reals "base_lr", "min_lr", counters "total_steps", "warmup_steps".
  template <class S = float>
  StateDict<S> state_dict() const {
    StateDict<S> sd;
    sd.insert_real("base_lr", base_);
    sd.insert_real("min_lr", min_);
    sd.insert_count("total_steps", total_);
    sd.insert_count("warmup_steps", warmup_);
    return sd;
  }
  /// Takes the settings of state_dict(); format_error (naming what does not fit, the
  /// schedule unchanged) for missing, unexpected or invalid entries.
  template <class S>
  void load_state_dict(const StateDict<S>& sd) {
    StateReader<S> r(sd, "CosineSchedule");
    const double base = r.real("base_lr"), min = r.real("min_lr");
    const std::int64_t total = r.count("total_steps"), warmup = r.count("warmup_steps");
    if (r.fits()) {
      const std::string bad = problem(base, total, warmup, min);
      if (!bad.empty()) r.invalid(bad);
    }
    r.finish();
    base_ = base, min_ = min, total_ = total, warmup_ = warmup;
  }

 private:
  // What is wrong with these settings ("" when nothing).
  static std::string problem(double base_lr, std::int64_t total_steps, std::int64_t warmup_steps, double min_lr) {
    if (total_steps < 1) return detail::cat("total_steps must be >= 1, got ", total_steps);
    if (warmup_steps < 0 || warmup_steps >= total_steps)
      return detail::cat("warmup_steps must be in [0, total_steps = ", total_steps, "), got ", warmup_steps);
    if (!(base_lr >= 0) || !(min_lr >= 0))
      return detail::cat("base_lr and min_lr must be >= 0, got ", base_lr, " and ", min_lr);
    return "";
  }
  double base_, min_;
  std::int64_t total_, warmup_;
};

/// Step decay, torch.optim.lr_scheduler.StepLR: base_lr * gamma^floor(step / step_size).
class StepSchedule {
 public:
  /// Throws config_error unless step_size >= 1, base_lr >= 0 and gamma >= 0.
  StepSchedule(double base_lr, std::int64_t step_size, double gamma = 0.1)
      : base_(base_lr), gamma_(gamma), size_(step_size) {
    const std::string bad = problem(base_lr, step_size, gamma);
    if (!bad.empty()) throw config_error("StepSchedule: " + bad);
  }
  /// The learning rate of step `step` (>= 0; config_error otherwise).
  double lr(std::int64_t step) const {
    if (step < 0) throw config_error(detail::cat("StepSchedule::lr: step must be >= 0, got ", step));
    return base_ * std::pow(gamma_, double(step / size_));
  }

  /// The settings: reals "base_lr", "gamma", counter "step_size".
  template <class S = float>
  StateDict<S> state_dict() const {
    StateDict<S> sd;
    sd.insert_real("base_lr", base_);
    sd.insert_real("gamma", gamma_);
    sd.insert_count("step_size", size_);
    return sd;
  }
  /// Takes the settings of state_dict(); format_error (naming what does not fit, the
  /// schedule unchanged) for missing, unexpected or invalid entries.
  template <class S>
  void load_state_dict(const StateDict<S>& sd) {
    StateReader<S> r(sd, "StepSchedule");
    const double base = r.real("base_lr"), gamma = r.real("gamma");
    const std::int64_t size = r.count("step_size");
    if (r.fits()) {
      const std::string bad = problem(base, size, gamma);
      if (!bad.empty()) r.invalid(bad);
    }
    r.finish();
    base_ = base, gamma_ = gamma, size_ = size;
  }

 private:
  // What is wrong with these settings ("" when nothing).
  static std::string problem(double base_lr, std::int64_t step_size, double gamma) {
    if (step_size < 1) return detail::cat("step_size must be >= 1, got ", step_size);
    if (!(base_lr >= 0) || !(gamma >= 0)) return detail::cat("base_lr and gamma must be >= 0, got ", base_lr, " and ", gamma);
    return "";
  }
  double base_, gamma_;
  std::int64_t size_;
};

}  // namespace orepa
