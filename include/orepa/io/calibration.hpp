#pragma once
/// @file calibration.hpp
/// A Calibration in safetensors: each layer's int8 input range as the F32 tensor
/// "<prefix>input_range" = [lo, hi] ("0.input_range" for layer 0 of a Sequential,
/// "input_range" for a single block), so it can share one file with the deployed weights.

#include <string>

#include "orepa/core/linkage.hpp"
#include "orepa/deploy/precision.hpp"
#include "orepa/io/safetensors.hpp"

namespace orepa::io {

/// The tensor-name suffix of a calibrated range.
OREPA_INLINE const std::string& input_range_suffix();
#if OREPA_DEFINITIONS
OREPA_INLINE const std::string& input_range_suffix() {
  static const std::string s = "input_range";
  return s;
}
#endif  // OREPA_DEFINITIONS

/// Adds every range of `c` to `w` (the object first, as every io function takes it).
OREPA_INLINE void save_calibration(const Calibration& c, SafetensorsWriter& w);
#if OREPA_DEFINITIONS
OREPA_INLINE void save_calibration(const Calibration& c, SafetensorsWriter& w) {
  for (const auto& [layer, r] : c.ranges()) {
    Tensor<float> t({2});
    t[0] = r.lo, t[1] = r.hi;
    w.add(layer + input_range_suffix(), t);
  }
}
#endif  // OREPA_DEFINITIONS

/// The ranges stored in `f` (every tensor named "...input_range"; other tensors, such as
/// deployed weights, are ignored). Throws format_error naming a range tensor that is not
/// two finite values with lo <= hi (and its values). A range finite but unusable for int8
/// ([0, 0]) is refused when deployed, naming the layer (DeployedConv::apply).
OREPA_INLINE Calibration load_calibration(const SafetensorsFile& f);
#if OREPA_DEFINITIONS
OREPA_INLINE Calibration load_calibration(const SafetensorsFile& f) {
  Calibration c;
  const std::string& suffix = input_range_suffix();
  for (const auto& name : f.names()) {
    if (name.size() < suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    const Tensor<float> t = f.get<float>(name);
    if (t.numel() != 2)
      throw format_error(orepa::detail::cat(f.label(), ": calibration tensor '", name,
                                            "' must hold two values [lo, hi], got shape ", shape_str(t.sizes())));
    if (!std::isfinite(t[0]) || !std::isfinite(t[1]) || t[0] > t[1])
      throw format_error(orepa::detail::cat(f.label(), ": calibration tensor '", name,
                                            "' must hold two finite values lo <= hi, got [", t[0], ", ", t[1], "]"));
    c.set(name.substr(0, name.size() - suffix.size()), {t[0], t[1]});
  }
  return c;
}
#endif  // OREPA_DEFINITIONS

}  // namespace orepa::io
