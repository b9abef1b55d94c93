#pragma once
/// @file state_dict.hpp
/// `StateDict<S>`: what `state_dict()` returns and `load_state_dict()` takes, as in
/// PyTorch: every tensor of a block (parameters and buffers) under its state-dict name, in
/// order, plus the integer counters PyTorch keeps as int64 tensors (BN's
/// `num_batches_tracked`) and, for optimizers and schedules, real-valued settings (a
/// group's learning rate) kept exactly as doubles. io/state_dict.hpp reads and writes
/// them as safetensors files.
///
///   for (const auto& [name, e] : net.state_dict())
///     if (e.is_tensor()) std::cout << name << " " << shape_str(e.tensor().sizes()) << "\n";

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/tensor.hpp"

namespace orepa {

/// One entry of a StateDict: a tensor, an integer counter or a real number.
template <class S>
class StateEntry {
 public:
  /// A tensor entry.
  explicit StateEntry(Tensor<S> t) : v_(std::move(t)) {}
  /// A counter entry (an int64 scalar in a file).
  explicit StateEntry(std::int64_t n) : v_(n) {}
  /// A real entry (an F64 scalar in a file).
  explicit StateEntry(double x) : v_(x) {}

  /// True for a tensor.
  bool is_tensor() const { return std::holds_alternative<Tensor<S>>(v_); }
  /// True for a counter.
  bool is_count() const { return std::holds_alternative<std::int64_t>(v_); }
  /// True for a real.
  bool is_real() const { return std::holds_alternative<double>(v_); }
  /// "tensor [shape]", "counter" or "real", for messages.
  std::string describe() const {
    return is_tensor() ? "tensor " + shape_str(tensor().sizes()) : is_count() ? "counter" : "real";
  }
  /// The tensor; config_error for another kind.
  const Tensor<S>& tensor() const { return get<Tensor<S>>("a tensor"); }
  /// The counter; config_error for another kind.
  std::int64_t count() const { return get<std::int64_t>("a counter"); }
  /// The real; config_error for another kind.
  double real() const { return get<double>("a real"); }

 private:
  template <class T>
  const T& get(const char* what) const {
    if (const T* p = std::get_if<T>(&v_)) return *p;
    throw config_error(detail::cat("StateDict: the entry is a ", describe(), ", not ", what));
  }
  std::variant<Tensor<S>, std::int64_t, double> v_;
};

/// Named tensors, counters and reals in insertion order; names are unique. Iterating
/// gives `std::pair<std::string, StateEntry<S>>` in that order.
template <class S>
class StateDict {
 public:
  /// The scalar type of the tensors.
  using Scalar = S;
  /// One (name, entry) pair, what iteration yields.
  using value_type = std::pair<std::string, StateEntry<S>>;
  /// Iterator over the entries in insertion order (read-only).
  using const_iterator = typename std::vector<value_type>::const_iterator;

  /// Adds tensor `t` as `name`; throws config_error if the name is taken.
  void insert(const std::string& name, Tensor<S> t) { add(name, StateEntry<S>(std::move(t))); }
  /// Adds the integer counter `n` as `name`; throws config_error if the name is taken.
  void insert_count(const std::string& name, std::int64_t n) { add(name, StateEntry<S>(n)); }
  /// Adds the real `x` as `name`; throws config_error if the name is taken.
  void insert_real(const std::string& name, double x) { add(name, StateEntry<S>(x)); }
  /// Adds entry `e` (of any kind) as `name`; throws config_error if the name is taken.
  void insert(const std::string& name, StateEntry<S> e) { add(name, std::move(e)); }
  /// Removes `name`; returns false (and changes nothing) when it is absent.
  bool erase(const std::string& name) {
    auto it = index_.find(name);
    if (it == index_.end()) return false;
    const std::size_t at = it->second;
    entries_.erase(entries_.begin() + std::ptrdiff_t(at));
    index_.erase(it);
    for (auto& [n, i] : index_)
      if (i > at) --i;
    return true;
  }

  /// True when `name` is present (of any kind).
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  /// True when `name` is a tensor.
  bool is_tensor(const std::string& name) const { return find(name) && find(name)->is_tensor(); }
  /// True when `name` is a counter.
  bool is_count(const std::string& name) const { return find(name) && find(name)->is_count(); }
  /// True when `name` is a real.
  bool is_real(const std::string& name) const { return find(name) && find(name)->is_real(); }
  /// The entry `name`; throws config_error if absent.
  const StateEntry<S>& entry(const std::string& name) const {
    if (const auto* e = find(name)) return *e;
    throw config_error("StateDict: no entry named '" + name + "'");
  }
  /// The tensor `name`; throws config_error if absent or of another kind.
  const Tensor<S>& tensor(const std::string& name) const { return checked(name, &StateEntry<S>::is_tensor, "tensor").tensor(); }
  /// The counter `name`; throws config_error if absent or of another kind.
  std::int64_t count(const std::string& name) const { return checked(name, &StateEntry<S>::is_count, "counter").count(); }
  /// The real `name`; throws config_error if absent or of another kind.
  double real(const std::string& name) const { return checked(name, &StateEntry<S>::is_real, "real").real(); }

  /// Every name, in insertion order.
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    n.reserve(entries_.size());
    for (const auto& e : entries_) n.push_back(e.first);
    return n;
  }
  /// Number of entries.
  std::size_t size() const { return entries_.size(); }
  /// True when there is no entry.
  bool empty() const { return entries_.empty(); }
  /// The first entry.
  const_iterator begin() const { return entries_.begin(); }
  /// Past the last entry.
  const_iterator end() const { return entries_.end(); }

 private:
  void add(const std::string& name, StateEntry<S> e) {
    if (!index_.emplace(name, entries_.size()).second)
      throw config_error("StateDict: '" + name + "' is already present");
    entries_.emplace_back(name, std::move(e));
  }
  const StateEntry<S>* find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &entries_[it->second].second;
  }
  const StateEntry<S>& checked(const std::string& name, bool (StateEntry<S>::*is)() const, const char* what) const {
    const auto* e = find(name);
    if (!e || !(e->*is)())
      throw config_error(detail::cat("StateDict: no ", what, " named '", name, "'",
                                     e ? " (it is a " + e->describe() + ")" : std::string()));
    return *e;
  }

  std::vector<value_type> entries_;
  std::map<std::string, std::size_t> index_;
};

/// Reads a StateDict into an object, all or nothing: ask for every entry the object has,
/// keeping what comes back in locals; then finish() throws one format_error listing every
/// missing, mis-typed, mis-shaped, invalid and unexpected entry. Change the object only
/// after finish() returns. (Optimizers, schedules and ModelEMA load this way.)
///
///   StateReader<float> r(sd, "MySchedule");
///   const double base = r.real("base_lr");
///   if (!(base >= 0)) r.invalid("base_lr must be >= 0");
///   r.finish();
///   base_ = base;
template <class S>
class StateReader {
 public:
  /// Reads `sd`; `who` names the object in the error ("SGD", "ModelEMA").
  StateReader(const StateDict<S>& sd, std::string who) : sd_(sd), who_(std::move(who)) {}
  /// True when `name` is present (asking does not count as reading it).
  bool contains(const std::string& name) const { return sd_.contains(name); }
  /// The counter `name`; 0 (and a problem recorded) when missing or of another kind.
  std::int64_t count(const std::string& name) {
    const auto* e = take(name, "a counter");
    if (e && e->is_count()) return e->count();
    wrong(name, e, "a counter");
    return 0;
  }
  /// The real `name`; 0 (and a problem recorded) when missing or of another kind.
  double real(const std::string& name) {
    const auto* e = take(name, "a real");
    if (e && e->is_real()) return e->real();
    wrong(name, e, "a real");
    return 0.0;
  }
  /// The tensor `name`, which must have `shape`; nullptr (and a problem recorded) when
  /// missing, of another kind or mis-shaped. Valid as long as the StateDict is.
  const Tensor<S>* tensor(const std::string& name, const Shape& shape) {
    const auto* e = take(name, "tensor " + shape_str(shape));
    if (!e) return nullptr;
    if (!e->is_tensor() || e->tensor().sizes() != shape) {
      misshaped_.push_back(name + " (expected tensor " + shape_str(shape) + ", got " + e->describe() + ")");
      return nullptr;
    }
    return &e->tensor();
  }
  /// True while every entry asked for was present with its kind and shape (so the values
  /// read can be checked against each other).
  bool fits() const { return missing_.empty() && misshaped_.empty(); }
  /// Records a value the object cannot take (e.g. a negative learning rate).
  void invalid(const std::string& what) { invalid_.push_back(what); }
  /// Throws format_error listing every problem (missing, mis-shaped, invalid, and entries
  /// that were never asked for: unexpected); returns when there is none.
  void finish() const {
    std::vector<std::string> unexpected;
    for (const auto& [name, e] : sd_)
      if (!used_.count(name)) unexpected.push_back(name);
    if (missing_.empty() && misshaped_.empty() && invalid_.empty() && unexpected.empty()) return;
    std::string msg = who_ + "::load_state_dict: the state dict does not fit";
    auto list = [&](const char* what, const std::vector<std::string>& v) {
      if (v.empty()) return;
      msg += detail::cat("; ", v.size(), " ", what, ":");
      for (const auto& s : v) msg += " " + s + ",";
      msg.pop_back();
    };
    list("missing", missing_);
    list("mis-shaped", misshaped_);
    list("invalid", invalid_);
    list("unexpected", unexpected);
    throw format_error(msg);
  }

 private:
  const StateEntry<S>* take(const std::string& name, const std::string& want) {
    used_.insert(name);
    if (!sd_.contains(name)) {
      missing_.push_back(name + " (" + want + ")");
      return nullptr;
    }
    return &sd_.entry(name);
  }
  void wrong(const std::string& name, const StateEntry<S>* e, const char* want) {
    if (e) misshaped_.push_back(name + " (expected " + want + ", got " + e->describe() + ")");
  }

  const StateDict<S>& sd_;
  std::string who_;
  std::set<std::string> used_;
  std::vector<std::string> missing_, misshaped_, invalid_;
};

}  // namespace orepa
