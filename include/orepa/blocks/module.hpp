#pragma once
/// @file module.hpp
/// How blocks and layers list their tensors. Each writes one function,
///
///     void collect_tensors(Tensors<S>& out, const std::string& prefix);
///
/// which appends its parameters, buffers and BatchNorms under their state-dict names
/// (prefix + name; a part owned by another passes `prefix + "rbr_dense."` and so on,
/// exactly as PyTorch composes module paths). The mixin ModuleTensors derives every
/// other tensor member of the block concept (blocks/block.hpp) from it: named and plain
/// parameter / buffer lists, zero_grad, the BatchNorms, state_dict and the strict,
/// all-or-nothing load_state_dict.

#include <set>
#include <string>
#include <utility>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/param.hpp"
#include "orepa/core/state_dict.hpp"

namespace orepa {

template <class S>
class BatchNorm2d;

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// Selects the deep-copy constructor of a module (its clone()); the copy constructors
// themselves are deleted so that no module is copied silently.
struct CloneTag {};
}  // namespace detail
/// \endcond

/// The tensors a block or layer lists: trainable parameters, buffers, and its BatchNorms
/// with their name prefixes (for their `num_batches_tracked` counters and synchronised BN).
template <class S>
struct Tensors {
  NamedParams<S> parameters;                                         ///< trainable, in state-dict order
  NamedParams<S> buffers;                                            ///< not trained, in state-dict order
  std::vector<std::pair<std::string, BatchNorm2d<S>*>> batch_norms;  ///< prefix ("bn.") and the BN

  /// Appends `p` as `name`: a parameter when trainable, else a buffer.
  void add(const std::string& name, Param<S>& p) { (p.trainable() ? parameters : buffers).emplace_back(name, &p); }
};

/// The tensor members of the block concept, derived from `Derived::collect_tensors`
/// (CRTP). `Derived` also provides `type_name()` for messages.
template <class Derived, class S>
class ModuleTensors {
 public:
  /// Trainable tensors with their state-dict names (`prefix` prepended).
  NamedParams<S> named_parameters(const std::string& prefix = "") { return collect(prefix).parameters; }
  /// Buffers (running statistics, fixed priors, identity tensors) with their names.
  NamedParams<S> named_buffers(const std::string& prefix = "") { return collect(prefix).buffers; }
  /// Trainable tensors, in state-dict order (what optimizers take).
  ParamList<S> parameters() { return pointers(collect("").parameters); }
  /// Buffers, in state-dict order.
  ParamList<S> buffers() { return pointers(collect("").buffers); }
  /// The BatchNorms, in state-dict order.
  std::vector<BatchNorm2d<S>*> batch_norms() {
    std::vector<BatchNorm2d<S>*> all;
    for (auto& [prefix, bn] : collect("").batch_norms) all.push_back(bn);
    return all;
  }
  /// Zeroes every gradient.
  void zero_grad() {
    for (auto* p : parameters()) p->zero_grad();
  }
  /// The parameter or buffer called `name` (its state-dict name, e.g. "rbr_dense.vector");
  /// throws config_error listing the names when absent.
  Param<S>& param(const std::string& name) {
    const auto t = collect("");
    std::string names;
    for (const auto* list : {&t.parameters, &t.buffers})
      for (const auto& [n, p] : *list) {
        if (n == name) return *p;
        names += " " + n;
      }
    throw config_error(self().type_name() + ": no tensor named '" + name + "'; it has:" + names);
  }

  /// Every parameter and buffer (copied) and every BN's num_batches_tracked, by name.
  StateDict<S> state_dict() const {
    const auto t = const_cast<ModuleTensors*>(this)->collect("");
    StateDict<S> sd;
    for (const auto* list : {&t.parameters, &t.buffers})
      for (const auto& [n, p] : *list) sd.insert(n, p->value);
    for (const auto& [prefix, bn] : t.batch_norms) sd.insert_count(prefix + "num_batches_tracked", bn->num_batches_tracked);
    return sd;
  }

  /// Loads `sd` strictly and all-or-nothing: every parameter and buffer must be present
  /// with its shape and no other name may be; counters (num_batches_tracked) are optional,
  /// as exporters other than PyTorch may leave them out. Otherwise throws format_error
  /// listing every missing, mis-shaped and unexpected entry, and nothing is changed.
  /// Entries are looked up as `prefix` + name (a block's part of a whole model's state
  /// dict), and the error names them so.
  void load_state_dict(const StateDict<S>& sd, const std::string& prefix = "") {
    const auto t = collect(prefix);
    std::vector<std::string> missing, misshaped, unexpected;
    std::set<std::string> expected;
    for (const auto* list : {&t.parameters, &t.buffers})
      for (const auto& [n, p] : *list) {
        expected.insert(n);
        if (!sd.contains(n)) missing.push_back(n + " " + shape_str(p->value.sizes()));
        else if (sd.is_count(n)) misshaped.push_back(n + " (expected " + shape_str(p->value.sizes()) + ", got a counter)");
        else if (sd.tensor(n).sizes() != p->value.sizes())
          misshaped.push_back(n + " (expected " + shape_str(p->value.sizes()) + ", got " +
                              shape_str(sd.tensor(n).sizes()) + ")");
      }
    for (const auto& [prefix, bn] : t.batch_norms) {
      const std::string n = prefix + "num_batches_tracked";
      expected.insert(n);
      if (sd.contains(n) && !sd.is_count(n))
        misshaped.push_back(n + " (expected a counter, got a tensor " + shape_str(sd.tensor(n).sizes()) + ")");
    }
    for (const auto& n : sd.names())
      if (!expected.count(n)) unexpected.push_back(n);
    if (!missing.empty() || !misshaped.empty() || !unexpected.empty()) {
      std::string msg = "load_state_dict: the state dict does not fit the " + self().type_name() +
                        (prefix.empty() ? "" : " under prefix '" + prefix + "'");
      auto list = [&](const char* what, const std::vector<std::string>& v) {
        if (v.empty()) return;
        msg += detail::cat("; ", v.size(), " ", what, ":");
        for (const auto& s : v) msg += " " + s + ",";
        msg.pop_back();
      };
      list("missing", missing);
      list("mis-shaped", misshaped);
      list("unexpected", unexpected);
      throw format_error(msg);
    }
    for (const auto* list : {&t.parameters, &t.buffers})
      for (const auto& [n, p] : *list) {
        const auto& v = sd.tensor(n);
        std::copy(v.begin(), v.end(), p->value.begin());
      }
    for (const auto& [prefix, bn] : t.batch_norms)
      if (sd.contains(prefix + "num_batches_tracked")) bn->num_batches_tracked = sd.count(prefix + "num_batches_tracked");
  }

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
  Tensors<S> collect(const std::string& prefix) {
    Tensors<S> t;
    self().collect_tensors(t, prefix);
    return t;
  }
  static ParamList<S> pointers(const NamedParams<S>& named) {
    ParamList<S> all;
    for (const auto& [n, p] : named) all.push_back(p);
    return all;
  }
};

}  // namespace orepa
