#pragma once
/// @file optim.hpp
/// Optimizers with PyTorch's exact update rules, over parameter groups:
///   - `SGD<S>`: momentum, dampening, Nesterov, L2 weight decay (torch.optim.SGD);
///   - `AdamW<S>`: decoupled weight decay with bias correction (torch.optim.AdamW).
/// A ParamGroup carries its own learning rate and weight decay; split_decay() builds the
/// usual two groups (decay on kernels, a separate decay, typically 0, on scaling vectors,
/// BN parameters and biases). Buffers (ParamKind::buffer) are never updated.
///
///   SGD<float> opt(split_decay(net.parameters(), 5e-4), SGDOptions(0.1).momentum(0.9).nesterov(true));
///   opt.zero_grad(); ...backward...; opt.set_lr(schedule.lr(step)); opt.step();
///
/// Like PyTorch with zero_grad(set_to_none=False), a parameter whose gradient is zero is
/// still stepped (weight decay, momentum).
///
/// `state_dict()` / `load_state_dict()` hold what a resumed run needs to continue
/// bit-identically, under PyTorch's names flattened: "steps", "param_groups.<i>.lr",
/// "param_groups.<i>.weight_decay", "param_groups.<i>.params" (the group's size), the
/// optimizer's settings ("momentum", "betas", ...) and the per-parameter state
/// "state.<k>.momentum_buffer" (SGD) or "state.<k>.exp_avg" / "exp_avg_sq" (AdamW), k
/// counting the parameters over the groups in order. Loading checks the group count and
/// sizes and every state tensor's shape, and changes nothing unless all of it fits.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/options.hpp"
#include "orepa/core/parallel.hpp"
#include "orepa/core/param.hpp"
#include "orepa/core/state_dict.hpp"

namespace orepa {

/// Parameters sharing a learning rate and a weight decay. Unset values take the
/// optimizer's defaults when the optimizer is built (they are always set afterwards).
template <class S>
struct ParamGroup {
  ParamGroup() = default;
  /// `ParamGroup<float>{params}`, `ParamGroup<float>{params, lr, weight_decay}`.
  ParamGroup(ParamList<S> params_, std::optional<S> lr_ = std::nullopt, std::optional<S> weight_decay_ = std::nullopt)
      : params(std::move(params_)), lr(lr_), weight_decay(weight_decay_) {}

  ParamList<S> params;            ///< the group's tensors (buffers are dropped by the optimizer)
  std::optional<S> lr;            ///< unset: the optimizer's lr
  std::optional<S> weight_decay;  ///< unset: the optimizer's weight_decay
};

/// Splits `params` into two groups: [0] kernels (ParamKind::kernel) with `weight_decay`,
/// [1] scaling vectors, BN parameters and biases with `other_weight_decay`. Buffers are
/// dropped. Learning rates are left unset (the optimizer's lr).
template <class S>
std::vector<ParamGroup<S>> split_decay(const ParamList<S>& params, double weight_decay,
                                       double other_weight_decay = 0.0) {
  ParamGroup<S> decay{{}, std::nullopt, S(weight_decay)};
  ParamGroup<S> other{{}, std::nullopt, S(other_weight_decay)};
  for (auto* p : params) {
    if (!p || !p->trainable()) continue;
    (p->kind == ParamKind::kernel ? decay : other).params.push_back(p);
  }
  return {std::move(decay), std::move(other)};
}

/// Group bookkeeping shared by the optimizers: defaults, validation, lr changes,
/// zero_grad and the step counter. Not used on its own.
template <class S>
class Optimizer {
 public:
  /// The groups, with lr and weight_decay resolved and buffers removed.
  const std::vector<ParamGroup<S>>& groups() const { return groups_; }
  /// Sets the learning rate of every group (what a single-rate schedule needs).
  void set_lr(S lr) {
    check_non_negative("lr", double(lr));
    for (auto& g : groups_) g.lr = lr;
  }
  /// Sets the learning rate of group `group`.
  void set_lr(std::size_t group, S lr) {
    check_non_negative("lr", double(lr));
    if (group >= groups_.size())
      throw config_error(detail::cat(who_, "::set_lr: group ", group, " out of range (", groups_.size(), " groups)"));
    groups_[group].lr = lr;
  }
  /// Zeroes the gradient of every parameter of every group.
  void zero_grad() {
    for (auto& g : groups_)
      for (auto* p : g.params) p->zero_grad();
  }
  /// Number of step() calls so far.
  std::int64_t steps() const { return steps_; }

 protected:
  /// What load_state_dict reads of the groups before it changes anything.
  struct GroupState {
    std::int64_t steps = 0;          ///< step() calls
    std::vector<S> lr;               ///< per group
    std::vector<S> weight_decay;     ///< per group
  };
  /// Key `field` of group `i` ("param_groups.<i>.<field>").
  static std::string group_key(std::size_t i, const char* field) { return detail::cat("param_groups.", i, ".", field); }
  /// Key `field` of the state of parameter `k` ("state.<k>.<field>").
  static std::string state_key(std::size_t k, const char* field) { return detail::cat("state.", k, ".", field); }
  /// Adds the step count and every group's lr, weight decay and size to `sd`.
  void save_groups(StateDict<S>& sd) const {
    sd.insert_count("steps", steps_);
    for (std::size_t i = 0; i < groups_.size(); ++i) {
      sd.insert_real(group_key(i, "lr"), double(*groups_[i].lr));
      sd.insert_real(group_key(i, "weight_decay"), double(*groups_[i].weight_decay));
      sd.insert_count(group_key(i, "params"), std::int64_t(groups_[i].params.size()));
    }
  }
  /// Reads what save_groups() wrote, recording in `r` a group count or size that differs
  /// from this optimizer's and negative values.
  GroupState read_groups(StateReader<S>& r, const StateDict<S>& sd) const {
    GroupState st;
    st.steps = r.count("steps");
    if (st.steps < 0) r.invalid(detail::cat("steps ", st.steps, " (must be >= 0)"));
    std::size_t saved_groups = 0;
    while (sd.contains(group_key(saved_groups, "params"))) ++saved_groups;
    if (saved_groups != groups_.size())
      r.invalid(detail::cat("the state dict has ", saved_groups, " parameter groups, the optimizer ", groups_.size()));
    for (std::size_t i = 0; i < groups_.size(); ++i) {
      const std::int64_t n = r.count(group_key(i, "params"));
      if (sd.contains(group_key(i, "params")) && n != std::int64_t(groups_[i].params.size()))
        r.invalid(detail::cat(group_key(i, "params"), " ", n, " (the optimizer's group ", i, " has ",
                              groups_[i].params.size(), " parameters)"));
      for (auto [field, out] : {std::pair{"lr", &st.lr}, std::pair{"weight_decay", &st.weight_decay}}) {
        const double v = r.real(group_key(i, field));
        if (!(v >= 0)) r.invalid(detail::cat(group_key(i, field), " ", v, " (must be >= 0)"));
        out->push_back(S(v));
      }
    }
    return st;
  }
  /// Sets the step count and the groups' settings read by read_groups().
  void apply_groups(const GroupState& st) {
    steps_ = st.steps;
    for (std::size_t i = 0; i < groups_.size(); ++i) groups_[i].lr = st.lr[i], groups_[i].weight_decay = st.weight_decay[i];
  }
  /// Adds per-parameter state `field` ([group][param], empty: none) to `sd`.
  void save_param_state(StateDict<S>& sd, const std::vector<std::vector<Tensor<S>>>& state, const char* field) const {
    std::size_t k = 0;
    for (const auto& g : state)
      for (const auto& t : g) sd.insert(state_key(k++, field), t);
  }
  /// Reads per-parameter state `field` if the state dict has it (every parameter's, each
  /// of its parameter's shape); returns none otherwise.
  std::vector<std::vector<Tensor<S>>> read_param_state(StateReader<S>& r, const char* field) const {
    std::vector<std::vector<Tensor<S>>> state;
    bool any = false;
    std::size_t k = 0;
    for (const auto& g : groups_)
      for (std::size_t j = 0; j < g.params.size(); ++j) any = any || r.contains(state_key(k++, field));
    if (!any) return state;
    state.resize(groups_.size());
    k = 0;
    for (std::size_t i = 0; i < groups_.size(); ++i)
      for (const auto* p : groups_[i].params) {
        const Tensor<S>* t = r.tensor(state_key(k++, field), p->value.sizes());
        state[i].push_back(t ? *t : Tensor<S>());
      }
    return state;
  }

  /// One group holding `params`, lr and weight decay unset.
  static std::vector<ParamGroup<S>> single_group(const ParamList<S>& params) {
    return {ParamGroup<S>(params)};
  }
  /// Fills unset group values with `lr` / `weight_decay`, drops buffers, rejects negative
  /// values and a tensor listed in two groups (config_error). `who` names the optimizer.
  Optimizer(std::vector<ParamGroup<S>> groups, double lr, double weight_decay, const char* who)
      : groups_(std::move(groups)), who_(who) {
    check_non_negative("lr", lr);
    check_non_negative("weight_decay", weight_decay);
    std::set<const Param<S>*> seen;
    for (std::size_t i = 0; i < groups_.size(); ++i) {
      auto& g = groups_[i];
      if (!g.lr) g.lr = S(lr);
      if (!g.weight_decay) g.weight_decay = S(weight_decay);
      check_non_negative("group lr", double(*g.lr));
      check_non_negative("group weight_decay", double(*g.weight_decay));
      ParamList<S> kept;
      for (std::size_t j = 0; j < g.params.size(); ++j) {
        auto* p = g.params[j];
        if (!p) throw config_error(detail::cat(who_, ": group ", i, " holds a null parameter"));
        if (!p->trainable()) continue;  // buffers are never optimized
        // A tensor in two groups would be stepped twice (PyTorch rejects it too).
        if (!seen.insert(p).second)
          throw config_error(detail::cat(who_, ": parameter ", j, " of group ", i, " (shape ",
                                         shape_str(p->value.sizes()), ") appears in an earlier group too"));
        kept.push_back(p);
      }
      g.params = std::move(kept);
    }
  }
  /// Throws config_error naming `what` unless v >= 0.
  void check_non_negative(const char* what, double v) const {
    if (!(v >= 0)) throw config_error(detail::cat(who_, ": ", what, " must be >= 0, got ", v));
  }
  /// Throws state_error when a gradient does not match its value (checked before any update).
  void check_grads() const {
    for (std::size_t i = 0; i < groups_.size(); ++i)
      for (std::size_t j = 0; j < groups_[i].params.size(); ++j) {
        const auto* p = groups_[i].params[j];
        if (p->grad.sizes() != p->value.sizes())
          throw state_error(detail::cat(who_, "::step: gradient of parameter ", j, " of group ", i, " has shape ",
                                        shape_str(p->grad.sizes()), ", its value has ", shape_str(p->value.sizes())));
      }
  }
  /// One zero tensor per parameter, shaped like it (optimizer state).
  std::vector<std::vector<Tensor<S>>> zeros_like_params() const {
    std::vector<std::vector<Tensor<S>>> s(groups_.size());
    for (std::size_t i = 0; i < groups_.size(); ++i)
      for (auto* p : groups_[i].params) s[i].emplace_back(p->value.sizes());
    return s;
  }

  std::vector<ParamGroup<S>> groups_;  ///< the groups, lr / weight_decay resolved, buffers dropped
  const char* who_;                    ///< optimizer name for error messages ("SGD", "AdamW")
  std::int64_t steps_ = 0;             ///< number of completed step() calls
};

/// Hyper-parameters of SGD (torch.optim.SGD defaults except the required lr).
struct SGDOptions {
  /// torch.optim.SGD defaults with learning rate `lr` (required: torch has no default lr).
  explicit SGDOptions(double lr) : lr_(lr) {}

  /// @fn lr(const double&)
  /// @brief Sets lr(); returns `*this` for chaining.
  /// @fn momentum(const double&)
  /// @brief Sets momentum(); returns `*this` for chaining.
  /// @fn dampening(const double&)
  /// @brief Sets dampening(); returns `*this` for chaining.
  /// @fn weight_decay(const double&)
  /// @brief Sets weight_decay(); returns `*this` for chaining.
  /// @fn nesterov(const bool&)
  /// @brief Sets nesterov(); returns `*this` for chaining.

  /// Learning rate (default of groups without their own).
  OREPA_OPTION(double, lr);
  /// Momentum factor (default 0: plain SGD, no state).
  OREPA_OPTION(double, momentum) = 0.0;
  /// Dampening of the gradient added to the momentum buffer (default 0).
  OREPA_OPTION(double, dampening) = 0.0;
  /// L2 penalty added to the gradient (default of groups without their own; default 0).
  OREPA_OPTION(double, weight_decay) = 0.0;
  /// Nesterov momentum (needs momentum > 0 and dampening 0).
  OREPA_OPTION(bool, nesterov) = false;

 public:
  /// This object (what the setters return).
  SGDOptions& self() { return *this; }
};

/// Stochastic gradient descent, torch.optim.SGD's update for each parameter p, grad g:
///   d = g + wd * p;  buf = d on the first step, else momentum * buf + (1 - dampening) * d;
///   d = nesterov ? d + momentum * buf : buf;  p -= lr * d   (no buffer when momentum = 0).
template <class S>
class SGD : public Optimizer<S> {
 public:
  /// Throws config_error on negative values or Nesterov without momentum / with dampening.
  SGD(std::vector<ParamGroup<S>> groups, const SGDOptions& opts)
      : Optimizer<S>(std::move(groups), opts.lr(), opts.weight_decay(), "SGD"), opts_(opts) {
    this->check_non_negative("momentum", opts.momentum());
    if (opts.nesterov() && (opts.momentum() <= 0 || opts.dampening() != 0))
      throw config_error(detail::cat("SGD: nesterov needs momentum > 0 and dampening 0, got momentum ",
                                     opts.momentum(), " and dampening ", opts.dampening()));
  }
  /// One group holding `params` with the options' lr and weight decay.
  SGD(const ParamList<S>& params, const SGDOptions& opts) : SGD(Optimizer<S>::single_group(params), opts) {}

  /// The hyper-parameters given at construction.
  const SGDOptions& options() const { return opts_; }

  /// Sets the momentum factor of the following steps (YOLOv5's warm-up raises it);
  /// config_error when negative or 0 with Nesterov.
  void set_momentum(double momentum) {
    this->check_non_negative("momentum", momentum);
    if (opts_.nesterov() && momentum <= 0)
      throw config_error(detail::cat("SGD::set_momentum: nesterov needs momentum > 0, got ", momentum));
    opts_.momentum(momentum);
  }

  /// Updates every parameter from its accumulated gradient.
  void step() {
    this->check_grads();
    const bool use_momentum = opts_.momentum() != 0;
    // A buffer starts as the first update it sees (torch: buf = d when there is none).
    const bool first = use_momentum && buf_.empty();
    if (first) buf_ = this->zeros_like_params();
    const S mom = S(opts_.momentum()), damp = S(1) - S(opts_.dampening());
    const bool nesterov = opts_.nesterov();
    // Every parameter's elements as one index range, split over the threads.
    struct Span {
      S* w;
      const S* grad;
      S* buf;
      S lr, wd;
    };
    std::vector<Span> spans;
    std::vector<std::int64_t> sizes;
    for (std::size_t gi = 0; gi < this->groups_.size(); ++gi) {
      const auto& g = this->groups_[gi];
      for (std::size_t pi = 0; pi < g.params.size(); ++pi) {
        Param<S>& p = *g.params[pi];
        S* buf = use_momentum ? buf_[gi][pi].data() : nullptr;
        spans.push_back({p.value.data(), p.grad.data(), buf, *g.lr, *g.weight_decay});
        sizes.push_back(p.value.numel());
      }
    }
    parallel_spans(sizes, [&](std::size_t k, std::int64_t j0, std::int64_t j1) {
      const Span& sp = spans[k];
      S* w = sp.w;
      const S* gr = sp.grad;
      S* b = sp.buf;
      const S lr = sp.lr, wd = sp.wd;
      const bool decay = wd != 0;
      if (!use_momentum) {
        OREPA_SIMD
        for (std::int64_t j = j0; j < j1; ++j) w[j] -= lr * (decay ? gr[j] + wd * w[j] : gr[j]);
      } else if (first) {  // the buffer starts as the first update, undamped (as torch)
        OREPA_SIMD
        for (std::int64_t j = j0; j < j1; ++j) {
          const S d = decay ? gr[j] + wd * w[j] : gr[j];
          b[j] = d;
          w[j] -= lr * (nesterov ? d + mom * d : d);
        }
      } else {
        OREPA_SIMD
        for (std::int64_t j = j0; j < j1; ++j) {
          const S d = decay ? gr[j] + wd * w[j] : gr[j];
          const S bj = mom * b[j] + damp * d;
          b[j] = bj;
          w[j] -= lr * (nesterov ? d + mom * bj : bj);
        }
      }
    });
    ++this->steps_;
  }

  /// The step count, the groups' settings, "momentum", "dampening", "nesterov" (0 or 1)
  /// and, once a step with momentum has run, every "state.<k>.momentum_buffer".
  StateDict<S> state_dict() const {
    StateDict<S> sd;
    this->save_groups(sd);
    sd.insert_real("momentum", opts_.momentum());
    sd.insert_real("dampening", opts_.dampening());
    sd.insert_count("nesterov", opts_.nesterov() ? 1 : 0);
    this->save_param_state(sd, buf_, "momentum_buffer");
    return sd;
  }
  /// Restores what state_dict() gave (settings included, as torch does); format_error
  /// listing every entry that does not fit (group count or size, a buffer's shape,
  /// missing, unexpected or invalid values), the optimizer unchanged.
  void load_state_dict(const StateDict<S>& sd) {
    StateReader<S> r(sd, "SGD");
    const auto groups = this->read_groups(r, sd);
    const double momentum = r.real("momentum"), dampening = r.real("dampening");
    const std::int64_t nesterov = r.count("nesterov");
    if (!(momentum >= 0)) r.invalid(detail::cat("momentum ", momentum, " (must be >= 0)"));
    if (!(dampening >= 0)) r.invalid(detail::cat("dampening ", dampening, " (must be >= 0)"));
    if (nesterov != 0 && nesterov != 1) r.invalid(detail::cat("nesterov ", nesterov, " (must be 0 or 1)"));
    if (nesterov == 1 && (momentum <= 0 || dampening != 0))
      r.invalid(detail::cat("nesterov with momentum ", momentum, " and dampening ", dampening,
                            " (needs momentum > 0 and dampening 0)"));
    auto buf = this->read_param_state(r, "momentum_buffer");
    r.finish();
    this->apply_groups(groups);
    opts_.momentum(momentum).dampening(dampening).nesterov(nesterov == 1);
    buf_ = std::move(buf);
  }

 private:
  SGDOptions opts_;
  std::vector<std::vector<Tensor<S>>> buf_;  // momentum buffers, [group][param]
};

/// (beta1, beta2) of Adam-type optimizers.
using Betas = std::pair<double, double>;

/// Hyper-parameters of AdamW (torch.optim.AdamW defaults).
struct AdamWOptions {
  /// Starts from the torch.optim.AdamW defaults with learning rate `lr`.
  explicit AdamWOptions(double lr = 1e-3) : lr_(lr) {}

  /// @fn lr(const double&)
  /// @brief Sets lr(); returns `*this` for chaining.
  /// @fn betas(const Betas&)
  /// @brief Sets betas(); returns `*this` for chaining.
  /// @fn eps(const double&)
  /// @brief Sets eps(); returns `*this` for chaining.
  /// @fn weight_decay(const double&)
  /// @brief Sets weight_decay(); returns `*this` for chaining.

  /// Learning rate (default of groups without their own; default 1e-3).
  OREPA_OPTION(double, lr);
  /// Decay rates of the first and second moment (default 0.9, 0.999).
  OREPA_OPTION(Betas, betas) = Betas(0.9, 0.999);
  /// Added to the denominator (default 1e-8).
  OREPA_OPTION(double, eps) = 1e-8;
  /// Decoupled weight decay (default of groups without their own; default 0.01).
  OREPA_OPTION(double, weight_decay) = 1e-2;

 public:
  /// This object (what the setters return).
  AdamWOptions& self() { return *this; }
};

/// AdamW, torch.optim.AdamW's update (amsgrad off) at step t = 1, 2, ...:
///   p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
///   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
template <class S>
class AdamW : public Optimizer<S> {
 public:
  /// Throws config_error on negative values or a beta outside [0, 1).
  AdamW(std::vector<ParamGroup<S>> groups, const AdamWOptions& opts = AdamWOptions())
      : Optimizer<S>(std::move(groups), opts.lr(), opts.weight_decay(), "AdamW"), opts_(opts) {
    const auto [b1, b2] = opts.betas();
    if (!(b1 >= 0 && b1 < 1) || !(b2 >= 0 && b2 < 1))
      throw config_error(detail::cat("AdamW: betas must be in [0, 1), got (", b1, ", ", b2, ")"));
    this->check_non_negative("eps", opts.eps());
  }
  /// One group holding `params` with the options' lr and weight decay.
  AdamW(const ParamList<S>& params, const AdamWOptions& opts = AdamWOptions())
      : AdamW(Optimizer<S>::single_group(params), opts) {}

  /// The hyper-parameters given at construction.
  const AdamWOptions& options() const { return opts_; }

  /// Updates every parameter from its accumulated gradient.
  void step() {
    this->check_grads();
    if (m_.empty()) {  // moments allocated once, on the first step
      m_ = this->zeros_like_params();
      v_ = this->zeros_like_params();
    }
    const std::int64_t t = ++this->steps_;
    const auto [beta1, beta2] = opts_.betas();
    const double bc1 = 1 - std::pow(beta1, double(t)), bc2 = 1 - std::pow(beta2, double(t));
    const S b1 = S(beta1), b2 = S(beta2), eps = S(opts_.eps()), bc2_sqrt = S(std::sqrt(bc2));
    for (std::size_t gi = 0; gi < this->groups_.size(); ++gi) {
      const auto& g = this->groups_[gi];
      const S lr = *g.lr, decay = S(1) - lr * *g.weight_decay, step_size = S(double(lr) / bc1);
      for (std::size_t pi = 0; pi < g.params.size(); ++pi) {
        Param<S>& p = *g.params[pi];
        S* w = p.value.data();
        const S* gr = p.grad.data();
        S* m = m_[gi][pi].data();
        S* v = v_[gi][pi].data();
        for (std::int64_t j = 0, n = p.value.numel(); j < n; ++j) {
          w[j] *= decay;  // decoupled: the decay never enters the moments
          m[j] = b1 * m[j] + (S(1) - b1) * gr[j];
          v[j] = b2 * v[j] + (S(1) - b2) * gr[j] * gr[j];
          w[j] -= step_size * m[j] / (std::sqrt(v[j]) / bc2_sqrt + eps);
        }
      }
    }
  }

  /// The step count, the groups' settings, "beta1", "beta2", "eps" and, once a step has
  /// run, every "state.<k>.exp_avg" and "state.<k>.exp_avg_sq".
  StateDict<S> state_dict() const {
    StateDict<S> sd;
    this->save_groups(sd);
    sd.insert_real("beta1", opts_.betas().first);
    sd.insert_real("beta2", opts_.betas().second);
    sd.insert_real("eps", opts_.eps());
    this->save_param_state(sd, m_, "exp_avg");
    this->save_param_state(sd, v_, "exp_avg_sq");
    return sd;
  }
  /// Restores what state_dict() gave (settings included); format_error listing every
  /// entry that does not fit, the optimizer unchanged.
  void load_state_dict(const StateDict<S>& sd) {
    StateReader<S> r(sd, "AdamW");
    const auto groups = this->read_groups(r, sd);
    const double b1 = r.real("beta1"), b2 = r.real("beta2"), eps = r.real("eps");
    if (!(b1 >= 0 && b1 < 1) || !(b2 >= 0 && b2 < 1))
      r.invalid(detail::cat("betas (", b1, ", ", b2, ") (must be in [0, 1))"));
    if (!(eps >= 0)) r.invalid(detail::cat("eps ", eps, " (must be >= 0)"));
    auto m = this->read_param_state(r, "exp_avg");
    auto v = this->read_param_state(r, "exp_avg_sq");
    if (m.empty() != v.empty()) r.invalid("exp_avg and exp_avg_sq must be present together");
    r.finish();
    this->apply_groups(groups);
    opts_.betas(Betas(b1, b2)).eps(eps);
    m_ = std::move(m);
    v_ = std::move(v);
  }

 private:
  AdamWOptions opts_;
  std::vector<std::vector<Tensor<S>>> m_, v_;  // first / second moments, [group][param]
};

}  // namespace orepa
