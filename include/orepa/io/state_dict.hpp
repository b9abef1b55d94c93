#pragma once
/// @file state_dict.hpp
/// State dicts of blocks under the PyTorch reference names: load from a safetensors file
/// (any stored float dtype converted to the block's scalar) and save into a writer.
/// Works for every block type that has `parameters()` and `batch_norms()`.
///
/// Loading is all-or-nothing: every expected tensor is checked (present, right shape)
/// first, and one format_error lists every missing, unexpected and mis-shaped tensor
/// with expected and actual shapes; only then is the block changed. Loaded buffers (the
/// frequency prior, id_tensor, the average kernel, running statistics) override the
/// generated ones.

#include <set>
#include <string>

#include "orepa/engine/batch_norm.hpp"
#include "orepa/io/safetensors.hpp"

namespace orepa::io {

/// How strictly load_state_dict treats tensors under the prefix that the block lacks.
enum class Unexpected { reject, ignore };

/// Loads `block`'s tensors from `file`, each named `prefix + name`.
/// With Unexpected::reject, any other tensor whose name starts with `prefix` is an error
/// (with an empty prefix: any other tensor in the file).
template <class Block>
void load_state_dict(Block& block, const SafetensorsFile& file, const std::string& prefix = "",
                     Unexpected unexpected = Unexpected::reject) {
  using S = std::decay_t<decltype(block.parameters()[0]->value[0])>;
  std::vector<std::string> missing, misshaped, extra;
  std::set<std::string> expected;
  auto params = block.parameters();
  for (auto* p : params) {
    const std::string name = prefix + p->name;
    expected.insert(name);
    if (!file.contains(name)) {
      missing.push_back(name + " " + shape_str(p->value.sizes()));
    } else if (file.entry(name).shape != p->value.sizes()) {
      misshaped.push_back(name + " (expected " + shape_str(p->value.sizes()) + ", got " +
                          shape_str(file.entry(name).shape) + ")");
    }
  }
  std::vector<engine::BatchNorm<S>*> bns = block.batch_norms();
  for (auto* bn : bns) {
    const std::string name = prefix + bn->prefix() + "num_batches_tracked";
    expected.insert(name);
    if (file.contains(name) && !file.entry(name).shape.empty() && checked_numel(file.entry(name).shape) != 1)
      misshaped.push_back(name + " (expected a scalar, got " + shape_str(file.entry(name).shape) + ")");
    // optional: PyTorch writes it, other exporters may not
  }
  if (unexpected == Unexpected::reject)
    for (const auto& n : file.names())
      if (n.compare(0, prefix.size(), prefix) == 0 && !expected.count(n)) extra.push_back(n);
  if (!missing.empty() || !misshaped.empty() || !extra.empty()) {
    std::string msg = "load_state_dict: the tensors of " + file.label() + " under prefix '" + prefix +
                      "' do not fit the block";
    auto list = [&](const char* what, const std::vector<std::string>& v) {
      if (v.empty()) return;
      msg += orepa::detail::cat("; ", v.size(), " ", what, ":");
      for (const auto& s : v) msg += " " + s + ",";
      msg.pop_back();
    };
    list("missing", missing);
    list("mis-shaped", misshaped);
    list("unexpected", extra);
    throw format_error(msg);
  }
  // Convert everything before changing anything, so a bad value leaves the block intact.
  std::vector<Tensor<S>> values;
  values.reserve(params.size());
  for (auto* p : params) values.push_back(file.get<S>(prefix + p->name));
  std::vector<std::int64_t> counts;
  for (auto* bn : bns) {
    const std::string name = prefix + bn->prefix() + "num_batches_tracked";
    counts.push_back(file.contains(name) ? file.get_int(name) : bn->num_batches_tracked);
  }
  for (std::size_t j = 0; j < params.size(); ++j) params[j]->value = std::move(values[j]);
  for (std::size_t j = 0; j < bns.size(); ++j) bns[j]->num_batches_tracked = counts[j];
}

/// Adds `block`'s tensors to `writer` as `prefix + name` (float tensors as `dtype`,
/// num_batches_tracked as I64 scalars, as PyTorch writes them).
template <class Block>
void save_state_dict(Block& block, SafetensorsWriter& writer, const std::string& prefix = "",
                     DType dtype = DType::F32) {
  for (auto* p : block.parameters()) writer.add(prefix + p->name, p->value, dtype);
  for (auto* bn : block.batch_norms())
    writer.add_int64(prefix + bn->prefix() + "num_batches_tracked", {}, {bn->num_batches_tracked});
}

}  // namespace orepa::io
