#pragma once
// Shared helpers of the orepa benchmarks: random inputs and the shape tables.
#include <benchmark/benchmark.h>
#include <malloc.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <unordered_map>
#include <vector>

#include <orepa/orepa.hpp>

namespace orepa::bench {

/// A tensor of `shape` with U(-1, 1) values from a fixed seed.
inline Tensor<float> random_tensor(const Shape& shape, std::uint64_t seed = 1) {
  Tensor<float> t(shape);
  Rng rng(seed);
  fill_uniform(t, 1.0, rng);
  return t;
}

/// Forward FLOPs of a convolution (2 per multiply-add) for input `x`.
inline double conv_flops(const ConvGeometry& g, const Shape& x) {
  const Shape y = g.output_shape(x, "conv_flops");
  return 2.0 * double(y[0]) * double(y[1]) * double(y[2]) * double(y[3]) * double(g.in_per_group()) *
         double(g.kernel * g.kernel);
}

/// A bare oneDNN convolution, the yardstick of the deployed forms: bias and the activation
/// as post-ops, in precision `p` (bf16 or u8/s8 input, bf16 or s8 weights, float output
/// as DeployedConv's; int8 with per-channel output scales and an input zero point), with
/// its input, weights and output already in the layouts it chose (`plain`: src / dst fixed
/// to NCHW instead of format_tag::any). `ok()` is false where this CPU has no such kernel.
class BarePrimitive {
 public:
  /// The primitive of `g` on input `xs`; `silu` fuses a swish post-op.
  BarePrimitive(const ConvGeometry& g, const Shape& xs, Precision p, bool silu = true, bool plain = false) {
    using namespace dnnl;
    using tag = memory::format_tag;
    using dt = memory::data_type;
    auto& eng = engine::cpu_engine();
    const Shape ys = g.output_shape(xs, "BarePrimitive");
    const tag act = plain ? tag::nchw : tag::any;
    const dt src_type = p == Precision::bf16 ? dt::bf16 : p == Precision::int8 ? (engine::cpu_has_vnni() ? dt::u8 : dt::s8) : dt::f32;
    const dt weight_type = p == Precision::bf16 ? dt::bf16 : p == Precision::int8 ? dt::s8 : dt::f32;
    auto md = [](const Shape& sh, tag t, dt type = dt::f32) { return memory::desc(memory::dims(sh.begin(), sh.end()), type, t); };
    post_ops ops;
    if (silu) ops.append_eltwise(1.f, algorithm::eltwise_swish, 1.f, 0.f);
    primitive_attr attr;
    attr.set_post_ops(ops);
    attr.set_scratchpad_mode(scratchpad_mode::user);
    if (p == Precision::int8) {
      attr.set_output_scales(1 << 1, std::vector<float>(std::size_t(g.out_channels), 1e-3f));
      attr.set_zero_points(DNNL_ARG_SRC, 0, {3});
    }
    const memory::dims k = g.groups == 1 ? memory::dims{g.out_channels, g.in_channels, g.kernel, g.kernel}
                                         : memory::dims{g.groups, g.out_channels / g.groups, g.in_per_group(), g.kernel, g.kernel};
    pd_ = convolution_forward::primitive_desc(
        convolution_forward::desc(prop_kind::forward_inference, algorithm::convolution_direct, md(xs, act, src_type),
                                  memory::desc(k, weight_type, tag::any), memory::desc({g.out_channels}, dt::f32, tag::x),
                                  md(ys, act), {g.stride, g.stride}, {g.dilation - 1, g.dilation - 1},
                                  {g.padding, g.padding}, {g.padding, g.padding}),
        attr, eng, /*allow_empty=*/true);
    if (!pd_) return;
    prim_ = convolution_forward(pd_);
    // Weights, bias and input filled through reorders from plain buffers, once.
    stream s(eng);
    const auto xplain = random_tensor(xs);
    Tensor<float> wplain(g.weight_shape(), 0.01f), bplain({g.out_channels}, 0.1f);
    memory src(pd_.src_desc(), eng), wts(pd_.weights_desc(), eng), bias(pd_.bias_desc(), eng), dst(pd_.dst_desc(), eng),
        scratch(pd_.scratchpad_desc(), eng);
    memory xu(md(xs, tag::nchw), eng, const_cast<float*>(xplain.data()));
    memory wu(memory::desc(k, dt::f32, g.groups == 1 ? tag::oihw : tag::goihw), eng, wplain.data());
    if (p == Precision::int8)
      std::fill_n(static_cast<unsigned char*>(src.get_data_handle()), src.get_desc().get_size(), 5);
    else
      reorder(xu, src).execute(s, xu, src);
    reorder(wu, wts).execute(s, wu, wts);
    std::copy(bplain.begin(), bplain.end(), static_cast<float*>(bias.get_data_handle()));
    s.wait();
    args_ = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wts}, {DNNL_ARG_BIAS, bias}, {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}};
  }
  /// Whether oneDNN has a kernel for it on this CPU.
  bool ok() const { return bool(pd_); }
  /// Runs it once on `s` (without waiting).
  void execute(dnnl::stream& s) const { prim_.execute(s, args_); }
  /// oneDNN's name of the kernel.
  std::string impl() const { return pd_.impl_info_str(); }

 private:
  dnnl::convolution_forward::primitive_desc pd_;
  dnnl::convolution_forward prim_;
  std::unordered_map<int, dnnl::memory> args_;
};

/// Bytes of `n` floats.
inline double float_bytes(std::int64_t n) { return double(n) * double(sizeof(float)); }

/// A memory figure of this process from /proc/self/status ("VmRSS", "VmHWM"), in bytes
/// (-1 where the file is not there).
inline std::int64_t process_memory(const std::string& field) {
  std::ifstream f("/proc/self/status");
  std::string key;
  std::int64_t kib = -1;
  while (f >> key) {
    if (key == field + ":") {
      f >> kib;
      return kib * 1024;
    }
    std::getline(f, key);
  }
  return -1;
}
/// Resets VmHWM to the current VmRSS (Linux: writing 5 to /proc/self/clear_refs).
inline void reset_peak_memory() { std::ofstream("/proc/self/clear_refs") << "5"; }
/// Returns the heap's free memory to the system, so that what a measurement allocates
/// shows in the RSS instead of reusing memory an earlier benchmark freed.
inline void release_free_memory() { malloc_trim(0); }
/// Peak memory growth of the process while `work()` runs, in bytes: free heap released,
/// then VmHWM after it minus VmRSS before it.
template <class F>
std::int64_t peak_memory_of(F&& work) {
  release_free_memory();
  const std::int64_t before = process_memory("VmRSS");
  reset_peak_memory();
  work();
  return process_memory("VmHWM") - before;
}

}  // namespace orepa::bench
