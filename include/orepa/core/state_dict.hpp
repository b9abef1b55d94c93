#pragma once
/// @file state_dict.hpp
/// `StateDict<S>`: what `state_dict()` returns and `load_state_dict()` takes, as in
/// PyTorch: every tensor of a block (parameters and buffers) under its state-dict name, in
/// order, plus the integer counters PyTorch keeps as int64 tensors (BN's
/// `num_batches_tracked`). io/state_dict.hpp reads and writes them as safetensors files.

#include <cstdint>
#include <map>
#include <string>
#include <variant>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/tensor.hpp"

namespace orepa {

/// Named tensors and counters in insertion order; names are unique.
template <class S>
class StateDict {
 public:
  /// The scalar type of the tensors.
  using Scalar = S;

  /// Adds tensor `t` as `name`; throws config_error if the name is taken.
  void insert(const std::string& name, Tensor<S> t) { add(name, std::move(t)); }
  /// Adds the integer counter `n` as `name`; throws config_error if the name is taken.
  void insert_count(const std::string& name, std::int64_t n) { add(name, n); }

  /// True when `name` is present (tensor or counter).
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  /// True when `name` is a counter.
  bool is_count(const std::string& name) const {
    auto it = entries_.find(name);
    return it != entries_.end() && std::holds_alternative<std::int64_t>(it->second);
  }
  /// The tensor `name`; throws config_error if absent or a counter.
  const Tensor<S>& tensor(const std::string& name) const {
    auto it = entries_.find(name);
    if (it == entries_.end() || !std::holds_alternative<Tensor<S>>(it->second))
      throw config_error("StateDict: no tensor named '" + name + "'");
    return std::get<Tensor<S>>(it->second);
  }
  /// The counter `name`; throws config_error if absent or a tensor.
  std::int64_t count(const std::string& name) const {
    auto it = entries_.find(name);
    if (it == entries_.end() || !std::holds_alternative<std::int64_t>(it->second))
      throw config_error("StateDict: no counter named '" + name + "'");
    return std::get<std::int64_t>(it->second);
  }
  /// Every name, in insertion order.
  const std::vector<std::string>& names() const { return order_; }
  /// Number of entries.
  std::size_t size() const { return order_.size(); }

 private:
  void add(const std::string& name, std::variant<Tensor<S>, std::int64_t> v) {
    if (!entries_.emplace(name, std::move(v)).second)
      throw config_error("StateDict: '" + name + "' is already present");
    order_.push_back(name);
  }
  std::vector<std::string> order_;
  std::map<std::string, std::variant<Tensor<S>, std::int64_t>> entries_;
};

}  // namespace orepa
