#pragma once
/// @file state_dict.hpp (io)
/// State dicts as safetensors files, under the PyTorch reference names. Every function
/// takes the object first, then the file (path, SafetensorsFile or SafetensorsWriter),
/// then the options (name prefix, dtype):
///
///   io::save(net, "model.safetensors");                 // one call each way
///   io::load(net, "model.safetensors");
///   io::SafetensorsWriter w;                            // several objects in one file
///   io::save_state_dict(backbone, w, "backbone.");
///   io::save_state_dict(head, w, "head.");
///   w.write("both.safetensors");
///   io::load_state_dict(head, io::SafetensorsFile::open("both.safetensors"), "head.");
///
/// An object is anything with `state_dict()` and `load_state_dict(sd)`: blocks, layers,
/// Sequential, optimizers, schedules, ModelEMA, io::TrainingCheckpoint. Tensors are stored
/// in the object's scalar (F32 for float, F64 for double) unless a dtype is given and read
/// back converted to it; counters (PyTorch's int64 `num_batches_tracked`) are I64 scalars,
/// reals (an optimizer's learning rates) F64 scalars.
///
/// Loading is the object's own load_state_dict: strict and all-or-nothing, one
/// format_error (prefixed with the file name) listing every missing, unexpected and
/// mis-shaped entry, the object unchanged. For a block, loaded buffers (the frequency
/// prior, id_tensor, the average kernel, running statistics) override the generated ones.

#include <set>
#include <string>
#include <type_traits>
#include <utility>

#include "orepa/blocks/module.hpp"
#include "orepa/io/safetensors.hpp"

namespace orepa::io {

/// How strictly load_state_dict treats tensors under the prefix that the block lacks.
enum class Unexpected { reject, ignore };

/// The scalar of the StateDict that `T::state_dict()` returns.
template <class T>
using state_scalar_t = typename decltype(std::declval<const T&>().state_dict())::Scalar;

/// The dtype that stores scalar `S` exactly: F64 for double, F32 otherwise.
template <class S>
constexpr DType exact_dtype() {
  return std::is_same_v<S, double> ? DType::F64 : DType::F32;
}

/// True when `T` lists its tensors with `collect_tensors` (a block or layer, module.hpp).
template <class T, class S, class = void>
struct is_module : std::false_type {};
/// \cond DO_NOT_DOCUMENT_THIS
template <class T, class S>
struct is_module<T, S, std::void_t<decltype(std::declval<T&>().collect_tensors(std::declval<Tensors<S>&>(), std::string()))>>
    : std::true_type {};
/// \endcond

/// True for the dtypes read as counters when they hold one element.
inline bool is_integer(DType d) {
  return d != DType::F32 && d != DType::F64 && d != DType::F16 && d != DType::BF16 && d != DType::F8_E5M2 &&
         d != DType::F8_E4M3;
}

/// Entry `name` of `file` added to `sd` as `as` (default: the same name): a counter for a
/// one-element integer tensor, a real for an F64 scalar (shape []), else a tensor
/// converted to S.
template <class S>
void add_entry(StateDict<S>& sd, const SafetensorsFile& file, const std::string& name, const std::string& as = "") {
  const auto& e = file.entry(name);
  const std::string& key = as.empty() ? name : as;
  if (is_integer(e.dtype) && checked_numel(e.shape) == 1) sd.insert_count(key, file.get_int(name));
  else if (e.dtype == DType::F64 && e.shape.empty()) sd.insert_real(key, file.get<double>(name)[0]);
  else sd.insert(key, file.get<S>(name));
}

/// Every entry of `file` whose name starts with `prefix`, under its full name, or under
/// the rest of it with `strip_prefix`.
template <class S>
StateDict<S> read_state_dict(const SafetensorsFile& file, const std::string& prefix = "", bool strip_prefix = false) {
  StateDict<S> sd;
  for (const auto& n : file.names())
    if (n.compare(0, prefix.size(), prefix) == 0) add_entry(sd, file, n, strip_prefix ? n.substr(prefix.size()) : n);
  return sd;
}

/// Loads `object` from the entries of `file` named `prefix + name` (strict, see the file
/// comment). With Unexpected::reject, any other entry whose name starts with `prefix` is
/// an error too (with an empty prefix: any other entry in the file). Unexpected::ignore
/// needs a block or layer, whose tensor names are known beforehand (config_error
/// otherwise).
template <class T>
void load_state_dict(T& object, const SafetensorsFile& file, const std::string& prefix = "",
                     Unexpected unexpected = Unexpected::reject) {
  using S = state_scalar_t<T>;
  try {
    if constexpr (is_module<T, S>::value) {
      Tensors<S> t;
      object.collect_tensors(t, prefix);
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
      object.load_state_dict(sd, prefix);
    } else {
      if (unexpected != Unexpected::reject)
        throw config_error(file.label() + ": load_state_dict: Unexpected::ignore needs a block or layer");
      object.load_state_dict(read_state_dict<S>(file, prefix, /*strip_prefix=*/true));
    }
  } catch (const format_error& e) {
    throw format_error(file.label() + ": " + e.what());
  }
}

/// Adds every entry of `sd` to `writer` as `prefix + name`: tensors as `dtype`, counters
/// as I64 scalars, as PyTorch writes them, reals as F64 scalars.
template <class S>
void save_state_dict(const StateDict<S>& sd, SafetensorsWriter& writer, const std::string& prefix = "",
                     DType dtype = exact_dtype<S>()) {
  for (const auto& [n, e] : sd) {
    if (e.is_count()) writer.add_int64(prefix + n, {}, {e.count()});
    else if (e.is_real()) writer.add(prefix + n, Tensor<double>(Shape{}, e.real()), DType::F64);
    else writer.add(prefix + n, e.tensor(), dtype);
  }
}

/// Adds `object`'s state dict to `writer` under `prefix`.
template <class T, class S = state_scalar_t<T>>
void save_state_dict(const T& object, SafetensorsWriter& writer, const std::string& prefix = "",
                     DType dtype = exact_dtype<S>()) {
  save_state_dict(object.state_dict(), writer, prefix, dtype);
}

/// Writes `object`'s state dict to the safetensors file `path` (atomically: a failed
/// write leaves an existing file as it was). Tensors as `dtype` (default: exact).
template <class T>
void save(const T& object, const std::string& path, DType dtype = exact_dtype<state_scalar_t<T>>()) {
  SafetensorsWriter w;
  save_state_dict(object, w, "", dtype);
  w.write(path);
}

/// Loads `object` from the safetensors file `path`, strictly (every entry of the file
/// must belong to it) and all-or-nothing.
template <class T>
void load(T& object, const std::string& path) {
  load_state_dict(object, SafetensorsFile::open(path));
}

}  // namespace orepa::io
