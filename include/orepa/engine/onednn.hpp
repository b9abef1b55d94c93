#pragma once
/// @file onednn.hpp
/// oneDNN 2.x glue shared by the training engine and the deployed convolution: the CPU
/// engine and per-thread stream, memory descriptors for NCHW / OIHW tensors, cached
/// layout "ports" (reorder into the layout a primitive prefers only when it differs),
/// and error translation. Every use of the 2.x-only API lives under engine/ and deploy/.

#include <oneapi/dnnl/dnnl.hpp>
#include <oneapi/dnnl/dnnl_version.h>

#include <string>

#include "orepa/core/conv_geometry.hpp"

#if DNNL_VERSION_MAJOR != 2
#error "orepa needs the oneDNN 2.x API (Debian bookworm's libdnnl-dev 2.6); 3.x changed every constructor"
#endif

namespace orepa::engine {

using dnnl::memory;
using tag = dnnl::memory::format_tag;

/// The process-wide CPU engine.
inline dnnl::engine& cpu_engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

/// A stream per thread (streams are cheap; this keeps concurrent callers independent).
inline dnnl::stream& thread_stream() {
  thread_local dnnl::stream s(cpu_engine());
  return s;
}

/// Plain NCHW float descriptor of `s`.
inline memory::desc nchw_desc(const Shape& s) {
  return memory::desc(memory::dims(s.begin(), s.end()), memory::data_type::f32, tag::nchw);
}
/// Plain OIHW (or grouped GOIHW, which has the same bytes) float descriptor of a kernel.
inline memory::desc weights_desc(const ConvGeometry& g, tag t = tag::any) {
  const auto O = g.out_channels, Ig = g.in_per_group(), k = g.kernel;
  if (g.groups == 1) return memory::desc({O, Ig, k, k}, memory::data_type::f32, t == tag::any ? t : tag::oihw);
  return memory::desc({g.groups, O / g.groups, Ig, k, k}, memory::data_type::f32,
                      t == tag::any ? t : tag::goihw);
}
inline memory::dims strides_of(const ConvGeometry& g) { return {g.stride, g.stride}; }
inline memory::dims dilates_of(const ConvGeometry& g) { return {g.dilation - 1, g.dilation - 1}; }  // 0 = dense
inline memory::dims padding_of(const ConvGeometry& g) { return {g.padding, g.padding}; }

/// "conv I->O k3 s1 p1 d1 g1 on [N, I, H, W]" for error messages.
inline std::string describe(const ConvGeometry& g, const Shape& x) {
  return detail::cat("conv ", g.in_channels, "->", g.out_channels, " k", g.kernel, " s", g.stride, " p",
                     g.padding, " d", g.dilation, " g", g.groups, " on input ", shape_str(x));
}

/// Runs `f`, turning a dnnl::error into an engine_error that says what was attempted.
template <class F>
auto guarded(const std::string& what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const dnnl::error& e) {
    throw engine_error(detail::cat("oneDNN failed (status ", int(e.status), ": ", e.what(), ") in ", what));
  }
}

/// One tensor argument of a primitive: the user's plain buffer and the layout the
/// primitive wants. When they differ the port owns a buffer in the primitive's layout and
/// the two reorders, all created once; otherwise it wraps the user's pointer (no copy).
class Port {
 public:
  Port() = default;
  Port(const memory::desc& user, const memory::desc& prim) : user_(user, cpu_engine(), DNNL_MEMORY_NONE) {
    if (user != prim) {
      internal_ = memory(prim, cpu_engine());
      to_prim_ = dnnl::reorder(user_, internal_);
      to_user_ = dnnl::reorder(internal_, user_);
    }
  }
  bool reorders() const { return bool(internal_); }
  /// The primitive's input memory holding the contents of `user`.
  memory& in(const float* user) {
    user_.set_data_handle(const_cast<float*>(user));
    if (!internal_) return user_;
    to_prim_.execute(thread_stream(), user_, internal_);
    return internal_;
  }
  /// The primitive's output memory; call finish() after the primitive ran.
  memory& out(float* user) {
    user_.set_data_handle(user);
    return internal_ ? internal_ : user_;
  }
  /// Copies the primitive's output into the user's buffer (if a reorder is needed).
  void finish() {
    if (internal_) to_user_.execute(thread_stream(), internal_, user_);
  }

 private:
  memory user_, internal_;
  dnnl::reorder to_prim_, to_user_;
};

}  // namespace orepa::engine
