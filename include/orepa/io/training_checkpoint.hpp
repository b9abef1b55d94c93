#pragma once
/// @file training_checkpoint.hpp
/// The whole state of a training run in one safetensors file: the model, its EMA, the
/// optimizer, the schedule, the data order's random generator and the loop's counters,
/// each under its own name, so that a run saved after k steps and resumed in a new
/// process continues bit-identically (the same N - k steps as an uninterrupted run).
///
///   std::int64_t step = 0;
///   io::TrainingCheckpoint<float> ckpt;
///   ckpt.add("model", net).add("optimizer", opt).add("schedule", sched)
///       .add("data_rng", rng).add("step", step);
///   io::save(ckpt, "last.safetensors");   // "model.0.weight...", "optimizer.steps", "step", ...
///   // later, in a new process, the same objects built the same way:
///   io::load(ckpt, "last.safetensors");   // every part or none; `step` is set too
///
/// A part is anything with `state_dict()` and `load_state_dict(sd)` (stored under
/// "<name>."), a `std::int64_t` counter or a `double` (stored as "<name>"). The
/// checkpoint refers to the parts: they must outlive it.

#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/state_dict.hpp"

namespace orepa::io {

/// True when `T` has `state_dict()` (any scalar) and `load_state_dict(sd)`.
template <class T, class = void>
struct has_state_dict : std::false_type {};
/// \cond DO_NOT_DOCUMENT_THIS
template <class T>
struct has_state_dict<T, std::void_t<decltype(std::declval<const T&>().state_dict())>> : std::true_type {};
/// \endcond

/// Several objects' state dicts as one, each under its name (see the file comment).
/// `S` is the scalar of the tensors (the model's).
template <class S>
class TrainingCheckpoint {
 public:
  /// The scalar of the tensors.
  using Scalar = S;

  /// Adds `object`, stored under "<name>."; config_error for an empty name, one with a
  /// '.', or one taken.
  template <class T>
  TrainingCheckpoint& add(const std::string& name, T& object) {
    static_assert(has_state_dict<T>::value,
                  "TrainingCheckpoint::add: the part needs state_dict() and load_state_dict(sd); counters are "
                  "std::int64_t, reals double");
    check_name(name);
    Part p{name, /*object=*/true, {}, {}};
    p.save = [&object] {
      if constexpr (std::is_same_v<decltype(object.state_dict()), StateDict<S>>) return object.state_dict();
      else return object.template state_dict<S>();  // schedules, Rng: any scalar
    };
    p.load = [&object](const StateDict<S>& sd) { object.load_state_dict(sd); };
    parts_.push_back(std::move(p));
    return *this;
  }
  /// Adds the counter `counter` (an epoch or step index), stored as "<name>".
  TrainingCheckpoint& add(const std::string& name, std::int64_t& counter) {
    check_name(name);
    Part p{name, /*object=*/false, {}, {}};
    p.save = [name, &counter] {
      StateDict<S> sd;
      sd.insert_count(name, counter);
      return sd;
    };
    p.load = [name, &counter](const StateDict<S>& sd) { counter = sd.count(name); };
    parts_.push_back(std::move(p));
    return *this;
  }
  /// Adds the real `value` (e.g. the best fitness so far), stored as "<name>".
  TrainingCheckpoint& add(const std::string& name, double& value) {
    check_name(name);
    Part p{name, /*object=*/false, {}, {}};
    p.save = [name, &value] {
      StateDict<S> sd;
      sd.insert_real(name, value);
      return sd;
    };
    p.load = [name, &value](const StateDict<S>& sd) { value = sd.real(name); };
    parts_.push_back(std::move(p));
    return *this;
  }

  /// The names of the parts, in the order they were added.
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (const auto& p : parts_) n.push_back(p.name);
    return n;
  }

  /// Every part's state, its entries prefixed with "<name>." (counters and reals: "<name>").
  StateDict<S> state_dict() const {
    StateDict<S> sd;
    for (const auto& p : parts_)
      for (const auto& [n, e] : p.save()) sd.insert(p.object ? p.name + "." + n : n, e);
    return sd;
  }

  /// Loads every part, all or nothing: format_error naming a part missing from `sd`, a
  /// counter or real of another kind, an entry that belongs to no part, or (prefixed with
  /// "part '<name>'") what a part's own load_state_dict rejects; parts loaded before the
  /// failing one are put back as they were.
  void load_state_dict(const StateDict<S>& sd) {
    std::vector<StateDict<S>> split(parts_.size());
    std::vector<std::string> problems;
    for (const auto& [n, e] : sd) {
      const std::size_t i = owner(n);
      if (i == parts_.size()) problems.push_back("unexpected entry " + n);
      else if (parts_[i].object) split[i].insert(n.substr(parts_[i].name.size() + 1), alias(e));
      else if (e.is_tensor()) problems.push_back(n + " is a " + e.describe() + ", expected a scalar");
      else split[i].insert(n, e);
    }
    for (std::size_t i = 0; i < parts_.size(); ++i) {
      if (!split[i].empty()) continue;
      if (parts_[i].object) problems.push_back("part '" + parts_[i].name + "' is missing (no entry '" + parts_[i].name + ".*')");
      else problems.push_back("'" + parts_[i].name + "' is missing");
    }
    if (!problems.empty()) {
      std::string msg = "TrainingCheckpoint::load_state_dict: the state dict does not fit:";
      for (const auto& s : problems) msg += " " + s + ";";
      msg.pop_back();
      throw format_error(msg);
    }
    std::vector<StateDict<S>> before;  // to put loaded parts back when a later one fails
    for (const auto& p : parts_) before.push_back(p.save());
    std::size_t done = 0;
    try {
      for (; done < parts_.size(); ++done) parts_[done].load(split[done]);
    } catch (const std::exception& e) {
      for (std::size_t i = 0; i < done; ++i) parts_[i].load(before[i]);
      throw format_error("TrainingCheckpoint::load_state_dict: part '" + parts_[done].name + "': " + e.what());
    }
  }

 private:
  struct Part {
    std::string name;
    bool object;  // stored under "<name>."; else one entry "<name>"
    std::function<StateDict<S>()> save;
    std::function<void(const StateDict<S>&)> load;
  };

  void check_name(const std::string& name) const {
    if (name.empty() || name.find('.') != std::string::npos)
      throw config_error("TrainingCheckpoint::add: a part's name must be non-empty and without '.', got '" + name + "'");
    for (const auto& p : parts_)
      if (p.name == name) throw config_error("TrainingCheckpoint::add: a part is already called '" + name + "'");
  }
  // Index of the part entry `n` belongs to (parts_.size() for none).
  std::size_t owner(const std::string& n) const {
    for (std::size_t i = 0; i < parts_.size(); ++i) {
      const auto& p = parts_[i].name;
      if (parts_[i].object ? n.size() > p.size() + 1 && n.compare(0, p.size(), p) == 0 && n[p.size()] == '.' : n == p)
        return i;
    }
    return parts_.size();
  }
  // The entry without copying a tensor's elements (the parts only read them).
  static StateEntry<S> alias(const StateEntry<S>& e) { return e.is_tensor() ? StateEntry<S>(e.tensor().alias()) : e; }

  std::vector<Part> parts_;
};

}  // namespace orepa::io
