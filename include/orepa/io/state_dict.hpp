#pragma once
/// @file state_dict.hpp (io)
/// State dicts as safetensors files, under the PyTorch reference names: read a file (or
/// the part of it under a prefix) into a StateDict, load a block from a file, save a
/// block into a writer. Floating-point tensors are converted to the block's scalar;
/// integer scalars (PyTorch's int64 `num_batches_tracked`) are counters.
///
/// Loading is the block's own load_state_dict: strict and all-or-nothing, one
/// format_error listing every missing, unexpected and mis-shaped tensor with expected
/// and actual shapes, the block unchanged. Loaded buffers (the frequency prior,
/// id_tensor, the average kernel, running statistics) override the generated ones.

#include <set>
#include <string>
#include <type_traits>

#include "orepa/blocks/module.hpp"
#include "orepa/io/safetensors.hpp"

namespace orepa::io {

/// How strictly load_state_dict treats tensors under the prefix that the block lacks.
enum class Unexpected { reject, ignore };

/// True for the dtypes read as counters when they hold one element.
inline bool is_integer(DType d) {
  return d != DType::F32 && d != DType::F64 && d != DType::F16 && d != DType::BF16 && d != DType::F8_E5M2 &&
         d != DType::F8_E4M3;
}

/// Entry `name` of `file` added to `sd` under the same name: a counter for a
/// one-element integer tensor, else a tensor converted to S.
template <class S>
void add_entry(StateDict<S>& sd, const SafetensorsFile& file, const std::string& name) {
  const auto& e = file.entry(name);
  if (is_integer(e.dtype) && checked_numel(e.shape) == 1) sd.insert_count(name, file.get_int(name));
  else sd.insert(name, file.get<S>(name));
}

/// Every tensor of `file` whose name starts with `prefix`, under its full name.
template <class S>
StateDict<S> read_state_dict(const SafetensorsFile& file, const std::string& prefix = "") {
  StateDict<S> sd;
  for (const auto& n : file.names())
    if (n.compare(0, prefix.size(), prefix) == 0) add_entry(sd, file, n);
  return sd;
}

/// Loads `block`'s tensors from `file`, each named `prefix + name` (strict, see the file
/// comment). With Unexpected::reject, any other tensor whose name starts with `prefix` is
/// an error too (with an empty prefix: any other tensor in the file).
template <class Block>
void load_state_dict(Block& block, const SafetensorsFile& file, const std::string& prefix = "",
                     Unexpected unexpected = Unexpected::reject) {
  using S = typename decltype(block.state_dict())::Scalar;
  Tensors<S> t;
  block.collect_tensors(t, prefix);
  std::set<std::string> counters;  // read as integers whatever their dtype
  for (const auto& [bn_prefix, bn] : t.batch_norms) counters.insert(bn_prefix + "num_batches_tracked");
  StateDict<S> sd;
  auto take = [&](const std::string& n) {
    if (counters.count(n)) sd.insert_count(n, file.get_int(n));
    else sd.insert(n, file.get<S>(n));
  };
  if (unexpected == Unexpected::reject) {
    for (const auto& n : file.names())
      if (n.compare(0, prefix.size(), prefix) == 0) take(n);
  } else {  // only the names the block has
    for (const auto* list : {&t.parameters, &t.buffers})
      for (const auto& [n, p] : *list)
        if (file.contains(n)) take(n);
    for (const auto& n : counters)
      if (file.contains(n)) take(n);
  }
  try {
    block.load_state_dict(sd, prefix);
  } catch (const format_error& e) {
    throw format_error(file.label() + ": " + e.what());
  }
}

/// Adds every entry of `sd` to `writer` as `prefix + name`: tensors as `dtype`, counters
/// as I64 scalars, as PyTorch writes them.
template <class S>
void add_state_dict(SafetensorsWriter& writer, const StateDict<S>& sd, const std::string& prefix = "",
                    DType dtype = DType::F32) {
  for (const auto& n : sd.names()) {
    if (sd.is_count(n)) writer.add_int64(prefix + n, {}, {sd.count(n)});
    else writer.add(prefix + n, sd.tensor(n), dtype);
  }
}

/// Adds `block`'s state dict to `writer` under `prefix`.
template <class Block>
void save_state_dict(const Block& block, SafetensorsWriter& writer, const std::string& prefix = "",
                     DType dtype = DType::F32) {
  add_state_dict(writer, block.state_dict(), prefix, dtype);
}

}  // namespace orepa::io
