#pragma once
/// @file precision.hpp
/// Reduced-precision deployment settings: the Precision a deployed convolution runs in,
/// the activation range an int8 convolution quantizes its input over, a Calibration (one
/// range per layer) and DeployOptions. The quantization formulas DeployedConv hands to
/// oneDNN are written here once, so tests and error reports compute the same numbers
/// without oneDNN.
///
/// int8 (SPEC-independent, oneDNN 2.6 semantics): activations are affine 8-bit,
/// x = scale * (q - zero_point), over a calibrated range that always holds 0 (zero
/// padding stays exact); weights are symmetric s8 per output channel, w = sw[o] * q with
/// sw[o] = max|w[o]| / 127; the bias stays float; the output is float.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/tensor.hpp"

namespace orepa {

/// The arithmetic a deployed convolution runs in.
enum class Precision {
  fp32,  ///< float everywhere (default)
  bf16,  ///< bfloat16 input and weights, float accumulation, bias and output
  int8,  ///< 8-bit input (calibrated range) and per-output-channel s8 weights, float bias and output
};

/// "fp32", "bf16" or "int8".
inline const char* precision_name(Precision p) {
  switch (p) {
    case Precision::bf16: return "bf16";
    case Precision::int8: return "int8";
    default: return "fp32";
  }
}
/// The Precision named `s` ("fp32", "bf16", "int8"); config_error for anything else.
inline Precision parse_precision(const std::string& s) {
  for (Precision p : {Precision::fp32, Precision::bf16, Precision::int8})
    if (s == precision_name(p)) return p;
  throw config_error(detail::cat("unknown precision '", s, "' (expected fp32, bf16 or int8)"));
}

/// The real interval [lo, hi] an int8 convolution's input is quantized over.
struct ActivationRange {
  float lo = 0.f;  ///< smallest value represented (values below saturate)
  float hi = 0.f;  ///< largest value represented (values above saturate)
};

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// How messages name a calibrated layer: its tensor prefix, or the single block's "".
inline std::string layer_label(const std::string& layer) {
  return layer.empty() ? std::string("the single deployed block") : "layer '" + layer + "'";
}
}  // namespace detail
/// \endcond

/// Affine 8-bit quantization x = scale * (q - zero_point), q in [qmin, qmin + 255].
struct QuantParams {
  float scale = 1.f;            ///< real step between two codes
  std::int32_t zero_point = 0;  ///< the code of real 0
  std::int32_t qmin = 0;        ///< 0 for u8, -128 for s8
  bool bf16 = false;            ///< not codes: bfloat16 values (scale, zero_point and qmin unused)

  /// bfloat16 values, the "quantization" a bf16 convolution reads and writes between
  /// layers (see Int8Codes).
  static QuantParams bfloat16() {
    QuantParams q;
    q.bf16 = true;
    return q;
  }

  /// The smallest step of an activation or weight quantization. A narrower range is
  /// widened to this step (its values then round to the codes next to 0): the product of
  /// an input step and a weight step, oneDNN's output scale, stays a normal float (>= 1e-36),
  /// and 1 / step stays finite. Real activations and weights are never this small.
  static constexpr float min_scale = 1e-18f;

  /// True when `r`, widened to hold 0, is narrower than 255 * min_scale, so that
  /// for_range() widens it (a clamp quantization_report() shows).
  static bool widens(ActivationRange r) {
    return std::isfinite(r.lo) && std::isfinite(r.hi) && r.lo <= r.hi && !(r.lo == 0 && r.hi == 0) &&
           (double(std::max(r.hi, 0.f)) - double(std::min(r.lo, 0.f))) / 255.0 < double(min_scale);
  }

  /// Parameters covering `r` widened to hold 0, for an unsigned (u8) or signed (s8) code;
  /// the step is computed in double, so a range as wide as the floats allow still has a
  /// finite one, and is at least min_scale. Throws value_error for a non-finite or empty
  /// range, and for [0, 0], which no step fits.
  static QuantParams for_range(ActivationRange r, bool is_signed) {
    if (!std::isfinite(r.lo) || !std::isfinite(r.hi) || r.lo > r.hi)
      throw value_error(detail::cat("int8 activation range [", r.lo, ", ", r.hi,
                                    "] is not a finite interval with lo <= hi"));
    const float lo = std::min(r.lo, 0.f), hi = std::max(r.hi, 0.f);
    if (!(hi > lo))
      throw value_error(
          "int8 activation range is [0, 0]: every calibration value of this input was 0, so no int8 step "
          "fits it; calibrate on batches for which this input is not all zero");
    QuantParams q;
    q.qmin = is_signed ? -128 : 0;
    q.scale = std::max(float((double(hi) - double(lo)) / 255.0), min_scale);
    q.zero_point = std::int32_t(std::clamp(std::nearbyint(float(q.qmin) - lo / q.scale), float(q.qmin),
                                           float(q.qmin + 255)));
    return q;
  }
  /// The code of `x`: saturate(round-half-even(x / scale + zero_point)), as oneDNN's
  /// quantizing reorder computes it (NaN gives qmin).
  std::int32_t quantize(float x) const {
    float q = x * (1.f / scale) + float(zero_point);
    q = q >= float(qmin) ? q : float(qmin);  // NaN too; saturating first keeps the rounding in range
    q = std::min(q, float(qmin + 255));
    // Adding and taking away 1.5 * 2^23 rounds |q| < 2^22 half to even, as a plain float
    // sum that vectorizes (the conversion then is exact).
    constexpr float kRound = 12582912.f;
    return std::int32_t((q + kRound) - kRound);
  }
  /// The real value of code `q`.
  float dequantize(std::int32_t q) const { return scale * float(q - zero_point); }
  /// The same codes for the same values.
  bool operator==(const QuantParams& o) const {
    return bf16 == o.bf16 && (bf16 || (scale == o.scale && zero_point == o.zero_point && qmin == o.qmin));
  }
  /// Not operator==.
  bool operator!=(const QuantParams& o) const { return !(*this == o); }
};

/// Per-output-channel symmetric weight scales of kernel `w` [O, ...]: max|w[o]| / 127,
/// at least QuantParams::min_scale (1 for an all-zero row).
inline std::vector<float> weight_scales(const Tensor<float>& w) {
  const std::int64_t O = w.size(0), per = w.numel() / std::max<std::int64_t>(O, 1);
  std::vector<float> s(std::size_t(O), 1.f);
  for (std::int64_t o = 0; o < O; ++o) {
    float m = 0.f;
    for (std::int64_t j = 0; j < per; ++j) m = std::max(m, std::fabs(w[o * per + j]));
    if (m > 0.f) s[std::size_t(o)] = std::max(m / 127.f, QuantParams::min_scale);
  }
  return s;
}

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// The 16 bits of the bfloat16 nearest to x (ties to even; Inf stays Inf, past the largest
// bf16 rounds to Inf); a NaN gives a quiet NaN. Plain integer steps, so a loop of it
// vectorizes.
inline std::uint16_t bf16_bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return std::uint16_t(nan ? (u >> 16) | 0x40u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
// The float bfloat16 bits `h` stand for: the top half of a float, so exact.
inline float bf16_value(std::uint16_t h) {
  const std::uint32_t u = std::uint32_t(h) << 16;
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
}  // namespace detail
/// \endcond

/// Round to the nearest bfloat16 (ties to even), returned as float.
inline float round_to_bf16(float x) {
  if (!std::isfinite(x)) return x;
  return detail::bf16_value(detail::bf16_bits(x));
}

/// Signal-to-quantization-noise ratio in dB of `approx` against `ref` (n values):
/// 10 log10(sum ref^2 / sum (ref - approx)^2); +infinity when they are equal.
inline double sqnr_db(const float* ref, const float* approx, std::int64_t n) {
  double signal = 0, noise = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    signal += double(ref[i]) * ref[i];
    noise += (double(ref[i]) - approx[i]) * (double(ref[i]) - approx[i]);
  }
  if (noise == 0) return std::numeric_limits<double>::infinity();
  return 10.0 * std::log10(signal / noise);
}

/// Activation ranges per layer, keyed by the layer's tensor-name prefix: "" for a single
/// block, "3." for layer 3 of a Sequential (the prefix its state-dict names carry).
/// Written by a Calibrator; saved to safetensors as "<prefix>input_range" [lo, hi]
/// (io/calibration.hpp).
class Calibration {
 public:
  /// Sets the range of `layer`.
  void set(const std::string& layer, ActivationRange r) { ranges_[layer] = r; }
  /// True when `layer` has a range.
  bool contains(const std::string& layer) const { return ranges_.count(layer) != 0; }
  /// The range of `layer`; config_error naming the layer (and the known ones) when absent.
  ActivationRange at(const std::string& layer) const {
    auto it = ranges_.find(layer);
    if (it != ranges_.end()) return it->second;
    std::string known;
    for (const auto& [name, r] : ranges_) known += (known.empty() ? "'" : ", '") + name + "'";
    throw config_error(detail::cat("int8 deployment: no calibrated input range for layer '", layer,
                                   "' (the calibration has ", known.empty() ? std::string("none") : known,
                                   "); run a Calibrator over this network first"));
  }
  /// Every layer's range.
  const std::map<std::string, ActivationRange>& ranges() const { return ranges_; }
  /// Number of layers with a range.
  std::size_t size() const { return ranges_.size(); }

 private:
  std::map<std::string, ActivationRange> ranges_;
};

/// How to deploy: the precision and, for int8, the calibration.
///
///   auto q = net.deploy(DeployOptions().precision(Precision::int8).calibration(cal));
class DeployOptions {
 public:
  /// The precision deployed convolutions run in (default fp32).
  DeployOptions& precision(Precision p) {
    precision_ = p;
    return *this;
  }
  /// The precision.
  Precision precision() const { return precision_; }
  /// The activation ranges int8 deployment quantizes each layer's input over.
  DeployOptions& calibration(Calibration c) {
    calibration_ = std::move(c);
    return *this;
  }
  /// The calibration.
  const Calibration& calibration() const { return calibration_; }

 private:
  Precision precision_ = Precision::fp32;
  Calibration calibration_;
};

}  // namespace orepa
