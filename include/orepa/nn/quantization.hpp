#pragma once
/// @file quantization.hpp
/// Post-training quantization of deployed networks: a Calibrator that records each
/// deployed convolution's input over user batches and picks its int8 range, and
/// quantization_report(), the per-layer error (SQNR of the weights and of the output
/// against fp32) that shows which layer a reduced precision hurts.
///
///   InferenceChain<float> fp32 = net.deploy();
///   Calibrator cal;                                   // min/max ranges
///   for (const auto& x : batches) cal.observe(fp32, x);
///   auto int8 = net.deploy(DeployOptions().precision(Precision::int8).calibration(cal.calibration()));
///   quantization_report(fp32, int8, batches).print(std::cout);

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include "orepa/core/linkage.hpp"
#include "orepa/deploy/deployed_conv.hpp"
#include "orepa/deploy/precision.hpp"
#include "orepa/nn/sequential.hpp"

#if OREPA_DEFINITIONS
#include <iomanip>
#endif

namespace orepa {

/// How a Calibrator turns the recorded inputs of a layer into its int8 range.
enum class CalibrationMethod {
  minmax,  ///< the smallest and largest value seen: nothing saturates, outliers cost resolution
  /// the clipped range with the smallest quantization mean squared error on the data; at 8
  /// bits it clips only outliers rarer than about one in 255^2 * 12 (~800k) values
  mse,
};

/// Records the inputs of every deployed convolution over calibration batches (eval
/// forwards, fp32) and gives their int8 ranges as a Calibration.
class Calibrator {
 public:
  /// Ranges by `method` (default min/max: on the demo network it gives 39 dB end to end
  /// against 24 dB for the MSE clip, whose input-side error ignores how much each clipped
  /// value matters downstream); each layer keeps at most `max_samples` input values (a strided
  /// subsample) for the MSE search, while its min / max see every value.
  explicit Calibrator(CalibrationMethod method = CalibrationMethod::minmax, std::int64_t max_samples = 1 << 20)
      : method_(method), max_samples_(std::max<std::int64_t>(max_samples, 1)) {}

  /// Runs `chain` (an fp32 deployed network: an InferenceChain, a yolo::DeployedModel,
  /// anything with visit_convs() and forward()) on `batch`, recording the input of every
  /// deployed convolution in it, in every stage and module, under its name ("3.",
  /// "2.m.0.cv1.": see AnyDeployed::visit_convs). A batch that fails (a shape error, or a
  /// NaN / Inf reaching any layer: value_error naming the layer, the index and the value)
  /// records nothing.
  template <class Network>
  void observe(const Network& chain, ConstTensorView<float> batch) {
    Recorder r(*this);
    chain.visit_convs("", [&](const std::string& name, const DeployedConv<float>& c) { r.names[&c] = name; });
    {
      ScopedConvObserver scope(&r);
      (void)chain.forward(batch);
    }
    commit(r.pending);
  }
  /// Records the input of a single deployed block (layer ""), all or nothing likewise.
  void observe(const DeployedConv<float>& conv, ConstTensorView<float> batch);

  /// The range of every layer seen so far, computed when first asked for after an
  /// observe(). The reference stays valid while the Calibrator lives (so
  /// `for (auto& [layer, r] : cal.calibration().ranges())` is safe); the next call after
  /// an observe() brings the same object up to date. Like observe(), not to be called
  /// from two threads at once.
  const Calibration& calibration() const;
  /// Number of batches observed per layer (the same for every layer of one chain).
  std::int64_t batches(const std::string& layer) const;

 private:
  struct Stats {
    float lo = std::numeric_limits<float>::infinity(), hi = -std::numeric_limits<float>::infinity();
    std::vector<float> samples;
    std::int64_t batches = 0;

    ActivationRange minmax() const { return {std::min(lo, 0.f), std::max(hi, 0.f)}; }
    // Grid search over clipped ranges [a * lo, b * hi] (a, b in (0, 1]) on a histogram of
    // the samples; each candidate's error is summed at the bin centres.
    ActivationRange mse_optimal() const;
  };

  struct Recorder final : ConvObserver {
    explicit Recorder(Calibrator& c) : cal(c) {}
    void seen(const DeployedConv<float>& conv, ConstTensorView<float> x, ConstTensorView<float>) override;
    Calibrator& cal;
    std::map<const DeployedConv<float>*, std::string> names;
    std::map<std::string, Stats> pending;  // this batch's statistics, committed once it completes
  };

  // Adds `x` to `s`, this batch's statistics of `layer`.
  void record(const std::string& layer, ConstTensorView<float> x, Stats& s) const;
  void commit(const std::map<std::string, Stats>& pending);

  CalibrationMethod method_;
  std::int64_t max_samples_;
  std::map<std::string, Stats> stats_;
  mutable Calibration calibration_;  // what calibration() returns, recomputed when stale_
  mutable bool stale_ = false;
};

#if OREPA_DEFINITIONS
OREPA_INLINE ActivationRange Calibrator::Stats::mse_optimal() const {
  const ActivationRange full = minmax();
  if (samples.empty() || !(full.hi > full.lo)) return full;
  constexpr int bins = 2048, steps = 40;
  std::vector<double> count(bins, 0.0);
  const double width = (double(full.hi) - full.lo) / bins;
  for (float v : samples) count[std::size_t(std::clamp(int((v - full.lo) / width), 0, bins - 1))] += 1;
  ActivationRange best = full;
  double best_err = std::numeric_limits<double>::infinity();
  for (int i = 0; i < steps; ++i)
    for (int j = 0; j < steps; ++j) {
      const ActivationRange r{full.lo * float(steps - i) / steps, full.hi * float(steps - j) / steps};
      if (!(r.hi > r.lo)) continue;
      const QuantParams q = QuantParams::for_range(r, false);
      double err = 0;
      for (int b = 0; b < bins && err < best_err; ++b) {
        if (count[std::size_t(b)] == 0) continue;
        const float x = float(full.lo + (b + 0.5) * width);
        const double d = double(x) - q.dequantize(q.quantize(x));
        err += count[std::size_t(b)] * d * d;
      }
      if (err < best_err) best_err = err, best = r;
    }
  return best;
}

OREPA_INLINE void Calibrator::Recorder::seen(const DeployedConv<float>& conv, ConstTensorView<float> x, ConstTensorView<float>) {
  auto it = names.find(&conv);
  if (it != names.end()) cal.record(it->second, x, pending[it->second]);
}

OREPA_INLINE void Calibrator::observe(const DeployedConv<float>& conv, ConstTensorView<float> batch) {
  Recorder r(*this);
  r.names[&conv] = "";
  {
    ScopedConvObserver scope(&r);
    (void)conv.forward(batch);
  }
  commit(r.pending);
}

OREPA_INLINE const Calibration& Calibrator::calibration() const {
  if (stale_) {
    Calibration c;
    for (const auto& [name, s] : stats_) c.set(name, method_ == CalibrationMethod::minmax ? s.minmax() : s.mse_optimal());
    calibration_ = std::move(c);
    stale_ = false;
  }
  return calibration_;
}

OREPA_INLINE std::int64_t Calibrator::batches(const std::string& layer) const {
  auto it = stats_.find(layer);
  return it == stats_.end() ? 0 : it->second.batches;
}

OREPA_INLINE void Calibrator::record(const std::string& layer, ConstTensorView<float> x, Stats& s) const {
  ++s.batches;
  const std::int64_t n = x.numel();
  // Every batch adds at most max_samples_ / 16 values, so the first 16 batches fill it.
  const auto before = stats_.find(layer);
  const std::int64_t held = before == stats_.end() ? 0 : std::int64_t(before->second.samples.size());
  const std::int64_t room = std::max<std::int64_t>(0, max_samples_ - held - std::int64_t(s.samples.size()));
  const std::int64_t take = std::min(room, std::max<std::int64_t>(1, max_samples_ / 16));
  const std::int64_t stride = take > 0 ? std::max<std::int64_t>(1, n / take) : n + 1;
  if (const std::int64_t bad = first_non_finite(x); bad >= 0)
    throw value_error(detail::cat("Calibrator: the input of ", detail::layer_label(layer), " ", shape_str(x.sizes()),
                                  " holds ", logical_element(x, bad),
                                  " at index ", index_str(x.sizes(), bad),
                                  "; calibrate on finite data (an int8 range must be finite)"));
  const float* p = x.data();  // element order does not matter for a distribution
  for (std::int64_t i = 0, added = 0; i < n; ++i) {
    s.lo = std::min(s.lo, p[i]);
    s.hi = std::max(s.hi, p[i]);
    if (i % stride == 0 && added < take) s.samples.push_back(p[i]), ++added;
  }
}

OREPA_INLINE void Calibrator::commit(const std::map<std::string, Stats>& pending) {
  for (const auto& [layer, b] : pending) {
    Stats& s = stats_[layer];
    s.lo = std::min(s.lo, b.lo);
    s.hi = std::max(s.hi, b.hi);
    s.batches += b.batches;
    s.samples.insert(s.samples.end(), b.samples.begin(), b.samples.end());
  }
  stale_ = stale_ || !pending.empty();
}
#endif  // OREPA_DEFINITIONS

/// The quantization error of one deployed convolution.
struct LayerQuantError {
  std::string layer;         ///< prefix ("3." for layer 3 of a Sequential; "" for a single block)
  Precision precision;       ///< what it runs in
  double weight_sqnr_db;     ///< kernel as held by the primitive vs the fp32 kernel
  double output_sqnr_db;     ///< its output vs the fp32 layer's, both given the fp32 network's input (NaN: undefined, see print)
  std::string note;          ///< a clamp the numbers depend on (an int8 input range widened to QuantParams::min_scale), or ""
};

/// Per-layer and end-to-end quantization error of a reduced-precision deployment.
struct QuantizationReport {
  std::vector<LayerQuantError> layers;  ///< worst output SQNR first
  double output_sqnr_db = 0;            ///< the whole network's output vs fp32 (NaN: undefined, see print)

  /// The table: layer, precision, weight and output SQNR, worst first; then end to end,
  /// then each layer's note. An SQNR that does not exist (NaN: an fp32 or reduced output
  /// held a NaN or Inf on the batches) prints as "n/a", with a line saying why.
  /// `max_layers` limits the rows (0: all).
  void print(std::ostream& os, std::size_t max_layers = 0) const;
};

#if OREPA_DEFINITIONS
OREPA_INLINE void QuantizationReport::print(std::ostream& os, std::size_t max_layers) const {
  const auto flags = os.flags();
  bool undefined = std::isnan(output_sqnr_db);
  auto db = [&](double v, int width) {
    os << std::setw(width);
    if (std::isnan(v)) {
      undefined = true;
      os << "n/a";
    } else {
      os << std::fixed << std::setprecision(1) << v;
    }
  };
  os << "  layer        precision  weight SQNR dB  output SQNR dB\n";
  const std::size_t n = max_layers == 0 ? layers.size() : std::min(max_layers, layers.size());
  for (std::size_t i = 0; i < n; ++i) {
    const auto& l = layers[i];
    os << "  " << std::left << std::setw(12) << (l.layer.empty() ? std::string("(block)") : l.layer) << ' '
       << std::setw(10) << precision_name(l.precision) << std::right;
    db(l.weight_sqnr_db, 15);
    db(l.output_sqnr_db, 16);
    os << '\n';
  }
  if (n < layers.size()) os << "  ... " << layers.size() - n << " better layers not shown\n";
  os << "  end to end output SQNR ";
  db(output_sqnr_db, 0);
  os << (std::isnan(output_sqnr_db) ? "\n" : " dB\n");
  for (const auto& l : layers)
    if (!l.note.empty()) os << "  note: " << (l.layer.empty() ? std::string("(block)") : l.layer) << ": " << l.note << '\n';
  if (undefined)
    os << "  n/a: an fp32 or reduced-precision output held a NaN or Inf on these batches (non-finite input "
          "data or weights), so no SQNR exists\n";
  os.flags(flags);
}
#endif  // OREPA_DEFINITIONS

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
struct SqnrSum {
  double signal = 0, noise = 0;
  void add(const Tensor<float>& ref, const Tensor<float>& approx) {
    for (std::int64_t i = 0; i < ref.numel(); ++i) {
      const double d = double(ref[i]) - approx[i];
      signal += double(ref[i]) * ref[i];
      noise += d * d;
    }
  }
  double db() const { return noise == 0 ? std::numeric_limits<double>::infinity() : 10 * std::log10(signal / noise); }
};
OREPA_INLINE double weight_sqnr(const DeployedConv<float>& c);
#if OREPA_DEFINITIONS
OREPA_INLINE double weight_sqnr(const DeployedConv<float>& c) {
  const Tensor<float> w = c.effective_weight();
  return sqnr_db(c.weight().data(), w.data(), w.numel());
}
#endif
// The clamp an int8 layer's numbers depend on, if any.
OREPA_INLINE std::string quantization_note(const DeployedConv<float>& c);
#if OREPA_DEFINITIONS
OREPA_INLINE std::string quantization_note(const DeployedConv<float>& c) {
  if (c.precision() != Precision::int8 || !QuantParams::widens(c.input_range())) return {};
  return cat("int8 input range [", c.input_range().lo, ", ", c.input_range().hi, "] is narrower than 255 steps of ",
             QuantParams::min_scale, ": widened to that step (its values round to the codes next to 0)");
}
#endif
OREPA_INLINE void sort_worst_first(std::vector<LayerQuantError>& v);
#if OREPA_DEFINITIONS
OREPA_INLINE void sort_worst_first(std::vector<LayerQuantError>& v) {
  // std::sort with a tie-break, not stable_sort: GCC 12's stable_sort buffer trips ASan's
  // alloc-dealloc-mismatch check (operator new vs free inside libstdc++).
  // An undefined (NaN) SQNR sorts first, as the worst: NaN in the comparison itself
  // would break std::sort's strict weak ordering.
  auto key = [](double db) { return std::isnan(db) ? -std::numeric_limits<double>::infinity() : db; };
  std::sort(v.begin(), v.end(), [&](const auto& a, const auto& b) {
    const double ka = key(a.output_sqnr_db), kb = key(b.output_sqnr_db);
    return ka != kb ? ka < kb : a.layer < b.layer;
  });
}
#endif
}  // namespace detail
/// \endcond

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// While the fp32 network runs, runs each convolution's reduced-precision twin (same name)
// on the same input and sums both outputs into that layer's SQNR.
struct TwinComparer final : ConvObserver {
  void seen(const DeployedConv<float>& conv, ConstTensorView<float> x, ConstTensorView<float> y) override;
  std::map<const DeployedConv<float>*, std::string> names;  // the fp32 network's
  std::map<std::string, const DeployedConv<float>*> reduced;
  std::map<std::string, SqnrSum> sums;
};
#if OREPA_DEFINITIONS
OREPA_INLINE void TwinComparer::seen(const DeployedConv<float>& conv, ConstTensorView<float> x, ConstTensorView<float> y) {
  auto it = names.find(&conv);
  if (it == names.end()) return;
  const auto twin = reduced.find(it->second);
  if (twin == reduced.end()) return;
  ScopedConvObserver quiet(nullptr);
  const Tensor<float> yq = twin->second->forward(x);
  Tensor<float> ref;
  ref.assign(y, MemoryFormat::contiguous);
  sums[it->second].add(ref, yq.to(MemoryFormat::contiguous));
}
#endif  // OREPA_DEFINITIONS
}  // namespace detail
/// \endcond

/// A network's output as one tensor, for the end-to-end error of quantization_report: the
/// tensor itself; other outputs (yolo::DetectOutput) overload it in their namespace.
inline const Tensor<float>& network_output(const Tensor<float>& y) { return y; }

/// The error of `reduced` (the same network deployed in another precision, e.g. by
/// Sequential::deploy(DeployOptions)) against `fp32` on `batches`: for every deployed
/// convolution (matched by name, in every stage and module), the SQNR of its weights and
/// of its output given the fp32 network's input to it; and of the whole network's output.
template <class Network>
QuantizationReport quantization_report(const Network& fp32, const Network& reduced,
                                       const std::vector<Tensor<float>>& batches) {
  detail::TwinComparer cmp;
  fp32.visit_convs("", [&](const std::string& name, const DeployedConv<float>& c) { cmp.names[&c] = name; });
  reduced.visit_convs("", [&](const std::string& name, const DeployedConv<float>& c) { cmp.reduced[name] = &c; });
  if (cmp.names.size() != cmp.reduced.size())
    throw config_error(detail::cat("quantization_report: the networks hold ", cmp.names.size(), " and ",
                                   cmp.reduced.size(), " deployed convolutions; deploy the same network twice"));
  detail::SqnrSum total;
  for (const auto& batch : batches) {
    Tensor<float> y;
    {
      ScopedConvObserver scope(&cmp);
      y = network_output(fp32.forward(batch));
    }
    total.add(y, network_output(reduced.forward(batch)));
  }
  QuantizationReport r;
  for (const auto& [name, s] : cmp.sums) {
    const DeployedConv<float>& c = *cmp.reduced.at(name);
    r.layers.push_back({name, c.precision(), detail::weight_sqnr(c), s.db(), detail::quantization_note(c)});
  }
  detail::sort_worst_first(r.layers);
  r.output_sqnr_db = total.db();
  return r;
}

/// The same for a single deployed block (layer ""): its weight and output SQNR.
OREPA_INLINE QuantizationReport quantization_report(const DeployedConv<float>& fp32, const DeployedConv<float>& reduced,
                                              const std::vector<Tensor<float>>& batches);
#if OREPA_DEFINITIONS
OREPA_INLINE QuantizationReport quantization_report(const DeployedConv<float>& fp32, const DeployedConv<float>& reduced,
                                              const std::vector<Tensor<float>>& batches) {
  detail::SqnrSum s;
  for (const auto& x : batches) s.add(fp32.forward(x), reduced.forward(x));
  QuantizationReport r;
  r.layers.push_back({"", reduced.precision(), detail::weight_sqnr(reduced), s.db(), detail::quantization_note(reduced)});
  r.output_sqnr_db = s.db();
  return r;
}
#endif

}  // namespace orepa
