#pragma once
/// @file onednn.hpp
/// oneDNN 2.x glue shared by the training engine and the deployed convolution: the CPU
/// engine and per-thread stream, memory descriptors for NCHW / OIHW tensors, cached
/// layout "ports" (reorder into the layout a primitive prefers only when it differs),
/// and error translation. Every use of the 2.x-only API lives under engine/ and deploy/.

#include <oneapi/dnnl/dnnl.hpp>
#include <oneapi/dnnl/dnnl_version.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <unordered_map>

#include "orepa/core/conv_geometry.hpp"
#include "orepa/core/gemm.hpp"
#include "orepa/core/linkage.hpp"

#if DNNL_VERSION_MAJOR != 2
#error "orepa needs the oneDNN 2.x API (Debian bookworm's libdnnl-dev 2.6); 3.x changed every constructor"
#endif

namespace orepa::engine {

using dnnl::memory;
/// oneDNN memory format tag.
using tag = dnnl::memory::format_tag;

/// \cond DO_NOT_DOCUMENT_THIS
inline std::atomic<std::int64_t>& detail_memory_allocations() {
  static std::atomic<std::int64_t> n{0};
  return n;
}
/// \endcond

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

/// Number of oneDNN buffers orepa has allocated in this process (reorder buffers,
/// scratchpads, reordered weights, blocked activations). Every orepa allocation of a
/// dnnl::memory goes through allocate(), so a steady state that allocates nothing keeps
/// this constant (tests/test_performance_invariants.cpp checks it).
inline std::int64_t memory_allocations() { return detail_memory_allocations().load(); }

/// A dnnl::memory owning a fresh buffer for `d` on the CPU engine (counted).
inline memory allocate(const memory::desc& d) {
  detail_memory_allocations().fetch_add(1, std::memory_order_relaxed);
  return memory(d, cpu_engine());
}

/// Plain NCHW float descriptor of `s`.
inline memory::desc nchw_desc(const Shape& s) {
  return memory::desc(memory::dims(s.begin(), s.end()), memory::data_type::f32, tag::nchw);
}
/// Descriptor of a 4-D tensor of `s` in memory format `f` (NCHW or NHWC), float unless `dt`.
inline memory::desc plain_desc(const Shape& s, MemoryFormat f, memory::data_type dt = memory::data_type::f32) {
  return memory::desc(memory::dims(s.begin(), s.end()), dt, f == MemoryFormat::channels_last ? tag::nhwc : tag::nchw);
}
/// Plain OIHW (or grouped GOIHW, which has the same bytes) descriptor of a kernel, float
/// unless `dt`; tag::any lets the primitive choose.
inline memory::desc weights_desc(const ConvGeometry& g, tag t = tag::any, memory::data_type dt = memory::data_type::f32) {
  const auto O = g.out_channels, Ig = g.in_per_group(), k = g.kernel;
  if (g.groups == 1) return memory::desc({O, Ig, k, k}, dt, t == tag::any ? t : tag::oihw);
  return memory::desc({g.groups, O / g.groups, Ig, k, k}, dt, t == tag::any ? t : tag::goihw);
}

/// The instruction set oneDNN runs on here (it honours ONEDNN_MAX_CPU_ISA), e.g.
/// "avx512_core_bf16", for error messages and benchmark labels.
inline std::string cpu_isa_name() {
  using dnnl::cpu_isa;
  const unsigned isa = unsigned(dnnl::get_effective_cpu_isa());
  const std::pair<cpu_isa, const char*> known[] = {
      {cpu_isa::avx512_core_amx, "avx512_core_amx"}, {cpu_isa::avx512_core_bf16, "avx512_core_bf16"},
      {cpu_isa::avx512_core_vnni, "avx512_core_vnni"}, {cpu_isa::avx512_core, "avx512_core"},
      {cpu_isa::avx2_vnni, "avx2_vnni"}, {cpu_isa::avx2, "avx2"}, {cpu_isa::avx, "avx"}, {cpu_isa::sse41, "sse41"}};
  for (const auto& [i, name] : known)
    if ((isa & unsigned(i)) == unsigned(i)) return name;
  return "no SIMD";
}
/// True when oneDNN's ISA multiplies u8 x s8 without intermediate saturation (VNNI). Without
/// it, int8 convolutions take s8 activations, for which oneDNN halves the weights instead.
inline bool cpu_has_vnni() {
  using dnnl::cpu_isa;
  const unsigned isa = unsigned(dnnl::get_effective_cpu_isa());
  for (cpu_isa i : {cpu_isa::avx512_core_vnni, cpu_isa::avx2_vnni})
    if ((isa & unsigned(i)) == unsigned(i)) return true;
  return false;
}
/// oneDNN strides {s, s} of `g`.
inline memory::dims strides_of(const ConvGeometry& g) { return {g.stride, g.stride}; }
/// oneDNN dilations {d-1, d-1} of `g` (0 = dense).
inline memory::dims dilates_of(const ConvGeometry& g) { return {g.dilation - 1, g.dilation - 1}; }  // 0 = dense
/// oneDNN padding {p, p} of `g`.
inline memory::dims padding_of(const ConvGeometry& g) { return {g.padding, g.padding}; }

/// "conv I->O k3 s1 p1 d1 g1 on [N, I, H, W]" for error messages.
inline std::string describe(const ConvGeometry& g, const Shape& x) {
  return detail::cat("conv ", g.in_channels, "->", g.out_channels, " k", g.kernel, " s", g.stride, " p",
                     g.padding, " d", g.dilation, " g", g.groups, " on input ", shape_str(x));
}

/// Runs `f`, turning a dnnl::error into an engine_error that says what was attempted.
/// `what` is a string, or a callable returning one (built only when something fails, so
/// hot paths do no string work).
template <class W, class F>
auto guarded(W&& what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const dnnl::error& e) {
    std::string w;
    if constexpr (std::is_invocable_v<W>) w = what();
    else w = what;
    throw engine_error(detail::cat("oneDNN failed (status ", int(e.status), ": ", e.what(), ") in ", w));
  }
}

/// One tensor argument of a primitive: the user's plain buffer and the layout the
/// primitive wants. When they differ the port owns a buffer in the primitive's layout and
/// the two reorders, all created once; otherwise it wraps the user's pointer (no copy).
class Port {
 public:
  Port() = default;
  /// Port from the user's layout `user` to the primitive's layout `prim`. A non-empty
  /// `to_prim` attribute (scales and zero point: a quantizing input) makes the port
  /// one-way, user to primitive.
  Port(const memory::desc& user, const memory::desc& prim, const dnnl::primitive_attr* to_prim = nullptr)
      : user_(user, cpu_engine(), DNNL_MEMORY_NONE) {
    if (user != prim) {
      internal_ = allocate(prim);
      if (to_prim) {
        to_prim_ = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), user, cpu_engine(), prim, *to_prim));
      } else {
        to_prim_ = dnnl::reorder(user_, internal_);
        to_user_ = dnnl::reorder(internal_, user_);
      }
    }
  }
  /// True when the primitive's layout differs from the user's (the port copies).
  bool reorders() const { return bool(internal_); }
  /// The buffer in the primitive's layout (empty when the port does not reorder).
  const memory& internal() const { return internal_; }
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

/// \cond DO_NOT_DOCUMENT_THIS
inline std::atomic<std::int64_t>& detail_gemm_creations() {
  static std::atomic<std::int64_t> n{0};
  return n;
}
struct GemmEntry {
  dnnl::matmul prim;
  memory a, b, c, scratch;
  std::unordered_map<int, memory> args;
};
/// \endcond

/// oneDNN matmul primitives created by gemm() so far, in all threads (one per distinct
/// GemmDims and thread; a steady state creates none).
inline std::int64_t gemm_creations() { return detail_gemm_creations().load(); }

/// Runs `d` on float data with a oneDNN matmul (JIT, multi-threaded), created once per
/// distinct GemmDims in each thread and kept in a thread-local cache.
OREPA_INLINE void gemm(const GemmDims& d, const float* A, const float* B, float* C);
#if OREPA_DEFINITIONS
OREPA_INLINE void gemm(const GemmDims& d, const float* A, const float* B, float* C) {
  using Key = std::array<std::int64_t, 14>;
  thread_local std::map<Key, std::unique_ptr<GemmEntry>> cache;
  const Key key{d.batch, d.M, d.N, d.K, d.a[0], d.a[1], d.a[2], d.b[0], d.b[1], d.b[2], d.c[0], d.c[1], d.c[2],
                d.accumulate ? 1 : 0};
  auto it = cache.find(key);
  if (it == cache.end()) {
    auto e = guarded("creating a matmul", [&] {
      using dt = memory::data_type;
      auto e = std::make_unique<GemmEntry>();
      // A single matrix may give batch stride 0; oneDNN wants a real one.
      auto bs = [&](std::int64_t s, std::int64_t size) { return d.batch == 1 ? size : s; };
      const memory::desc a_md({d.batch, d.M, d.K}, dt::f32, {bs(d.a[0], d.M * d.K), d.a[1], d.a[2]});
      const memory::desc b_md({d.batch, d.K, d.N}, dt::f32, {bs(d.b[0], d.K * d.N), d.b[1], d.b[2]});
      const memory::desc c_md({d.batch, d.M, d.N}, dt::f32, {bs(d.c[0], d.M * d.N), d.c[1], d.c[2]});
      dnnl::primitive_attr attr;
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      if (d.accumulate) {
        dnnl::post_ops ops;
        ops.append_sum(1.f);
        attr.set_post_ops(ops);
      }
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), attr, cpu_engine());
      e->prim = dnnl::matmul(pd);
      e->a = memory(a_md, cpu_engine(), DNNL_MEMORY_NONE);
      e->b = memory(b_md, cpu_engine(), DNNL_MEMORY_NONE);
      e->c = memory(c_md, cpu_engine(), DNNL_MEMORY_NONE);
      e->scratch = allocate(pd.scratchpad_desc());
      e->args = {{DNNL_ARG_SRC, e->a}, {DNNL_ARG_WEIGHTS, e->b}, {DNNL_ARG_DST, e->c}, {DNNL_ARG_SCRATCHPAD, e->scratch}};
      return e;
    });
    detail_gemm_creations().fetch_add(1, std::memory_order_relaxed);
    it = cache.emplace(key, std::move(e)).first;
  }
  GemmEntry& e = *it->second;
  e.a.set_data_handle(const_cast<float*>(A));
  e.b.set_data_handle(const_cast<float*>(B));
  e.c.set_data_handle(C);
  guarded("a matmul", [&] {
    e.prim.execute(thread_stream(), e.args);
    thread_stream().wait();
  });
}
#endif

/// The fastest GemmDims runner for scalar S: the oneDNN matmul for float, Eigen otherwise.
template <class S>
GemmFn<S> fast_gemm() {
  if constexpr (std::is_same_v<S, float>) return &gemm;
  else return &eigen_gemm<S>;
}

/// Element shape of a 4-D memory descriptor.
inline Shape shape_of(const memory::desc& d) {
  const auto dims = d.dims();
  return Shape(dims.begin(), dims.end());
}

/// Copies an NCHW float tensor into `dst` (any layout of the same shape) with a reorder
/// created for the call: for boundaries of a blocked-layout pipeline, not inner loops.
OREPA_INLINE void to_layout(ConstTensorView<float> x, memory& dst);
#if OREPA_DEFINITIONS
OREPA_INLINE void to_layout(ConstTensorView<float> x, memory& dst) {
  if (shape_of(dst.get_desc()) != x.sizes())
    throw shape_error(detail::cat("to_layout: tensor ", shape_str(x.sizes()), " does not fit memory of shape ",
                                  shape_str(shape_of(dst.get_desc()))));
  guarded("to_layout", [&] {
    memory src(nchw_desc(x.sizes()), cpu_engine(), const_cast<float*>(x.data()));
    dnnl::reorder(src, dst).execute(thread_stream(), src, dst);
    thread_stream().wait();
  });
}
#endif

/// Copies `src` (any 4-D float layout) into the NCHW tensor `y` (resized); a reorder is
/// created for the call, as in to_layout.
OREPA_INLINE void from_layout(const memory& src, Tensor<float>& y);
#if OREPA_DEFINITIONS
OREPA_INLINE void from_layout(const memory& src, Tensor<float>& y) {
  y.resize(shape_of(src.get_desc()));
  guarded("from_layout", [&] {
    memory dst(nchw_desc(y.sizes()), cpu_engine(), y.data());
    dnnl::reorder(src, dst).execute(thread_stream(), const_cast<memory&>(src), dst);
    thread_stream().wait();
  });
}
#endif

/// y[i] = 1 / (1 + exp(-x[i])) for i < n (y may be x) on oneDNN's logistic kernel, whose
/// exp runs at the machine's vector width; one primitive per length, cached per thread.
OREPA_INLINE void logistic(const float* x, float* y, std::int64_t n);
#if OREPA_DEFINITIONS
OREPA_INLINE void logistic(const float* x, float* y, std::int64_t n) {
  if (n <= 0) return;
  thread_local std::unordered_map<std::int64_t, dnnl::eltwise_forward> primitives;
  guarded("logistic", [&] {
    const memory::desc d({n}, memory::data_type::f32, tag::a);
    auto it = primitives.find(n);
    if (it == primitives.end()) {
      if (primitives.size() >= 64) primitives.clear();  // bounded: image sizes vary without end
      const dnnl::eltwise_forward::desc op(dnnl::prop_kind::forward_inference, dnnl::algorithm::eltwise_logistic, d, 0.f,
                                           0.f);
      it = primitives.emplace(n, dnnl::eltwise_forward(dnnl::eltwise_forward::primitive_desc(op, cpu_engine()))).first;
    }
    memory src(d, cpu_engine(), const_cast<float*>(x)), dst(d, cpu_engine(), y);
    it->second.execute(thread_stream(), {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}});
    thread_stream().wait();
  });
}
#endif

}  // namespace orepa::engine
