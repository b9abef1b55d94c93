// Training-step benchmarks: forward_train + backward of one block, batch 8, for the
// plain ConvBN baseline, OREPA (squeeze + ONE conv), DBB (every branch on the
// activations) and RepVGGBlock_OREPA; plus the squeeze and its adjoint on their own.
//
// Names: train_step/<Block>/<shape>, squeeze/<Block>/<shape>, squeeze_backward/<Block>/<shape>
// with <shape> = c<channels>_h<size>_n<batch> (C -> C, 3x3, stride 1, padding 1).
// ConvBN and OREPA train on the same Trunk (conv + BN + activation); ConvBN's kernel
// source is a plain weight, so OREPA / ConvBN is the squeeze's cost.
// Counters: bytes_saved_for_backward (activation-sized buffers the block keeps between
// forward_train and backward, plus the kernel and BN statistics), peak_step_bytes (the
// process's peak memory over a fresh block's first three steps), squeeze_share (OREPA
// blocks: squeeze + adjoint time over the step time, measured right after the step loop).
#include <chrono>

#include <orepa/blocks/conv_bn.hpp>
#include <orepa/blocks/dbb.hpp>
#include <orepa/blocks/orepa.hpp>
#include <orepa/blocks/repvgg.hpp>

#include "bench_common.hpp"

namespace orepa::bench {
namespace {

struct TrainShape {
  const char* name;
  std::int64_t c, h, n;
};
constexpr TrainShape kTrainShapes[] = {{"c64_h56_n8", 64, 56, 8}, {"c128_h28_n8", 128, 28, 8}};

// The block's own options type (OrepaOptions, DbbOptions, ...) for a C -> C 3x3 shape.
template <class Block>
typename Block::Options options_of(const TrainShape& s) {
  return typename Block::Options(s.c, s.c, 3).seed(7);
}

// Every block reports its own bytes_saved_for_backward (activation-sized buffers kept
// between forward_train and backward, plus kernels and BN statistics).
struct ConvBNCase {
  using Block = ConvBN<float, SiLU>;
  static constexpr const char* name = "ConvBN";
};
struct OrepaCase {
  using Block = OREPA<float, SiLU>;
  static constexpr const char* name = "OREPA";
  static BranchSum<float>& squeezer(Block& b) { return b.source(); }
};
struct DbbCase {
  using Block = DBB<float, SiLU>;
  static constexpr const char* name = "DBB";
};
struct RepVGGCase {
  using Block = RepVGGBlock_OREPA<float, SiLU>;
  static constexpr const char* name = "RepVGGBlock_OREPA";
  static BranchSum<float>& squeezer(Block& b) { return b.dense().source(); }
};
template <class Case>
typename Case::Block make(const TrainShape& s) {
  return typename Case::Block(options_of<typename Case::Block>(s));
}

template <class Case>
void train_step(benchmark::State& state, TrainShape s) {
  const auto x = random_tensor({s.n, s.c, s.h, s.h}, 1);
  const auto dy = random_tensor({s.n, s.c, s.h, s.h}, 2);
  // Peak memory of a fresh block's first three steps (primitives and buffers are created
  // in the first).
  auto block = make<Case>(s);
  state.counters["peak_step_bytes"] = double(peak_memory_of([&] {
    for (int step = 0; step < 3; ++step) {
      block.forward_train(x);
      block.backward(dy);
    }
  }));
  for (auto _ : state) {
    benchmark::DoNotOptimize(block.forward_train(x).data());
    benchmark::DoNotOptimize(block.backward(dy).data());
    benchmark::ClobberMemory();
  }
  state.counters["bytes_saved_for_backward"] = double(block.bytes_saved_for_backward());
  // Conv FLOPs of ONE kxk conv's forward + backward-data + backward-weights, the work a
  // plain ConvBN does; a block's "effective" GFLOP/s against that yardstick.
  const double flops = 3 * conv_flops(options_of<ConvBN<float>>(s).geometry(), x.sizes());
  state.counters["conv_gflops"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  if constexpr (std::is_same_v<Case, OrepaCase> || std::is_same_v<Case, RepVGGCase>) {
    // Squeeze share, timed right after the step loop on the same block.
    auto& sq = Case::squeezer(block);
    Tensor<float> w, dw = random_tensor(block.geometry().weight_shape(), 3);
    const int reps = 20;
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    for (int r = 0; r < reps; ++r) {
      sq.squeeze_into(w);
      sq.squeeze_backward(dw);
    }
    const double squeeze_s = std::chrono::duration<double>(clock::now() - t0).count() / reps;
    const auto t1 = clock::now();
    for (int r = 0; r < 3; ++r) {
      block.forward_train(x);
      block.backward(dy);
    }
    const double step_s = std::chrono::duration<double>(clock::now() - t1).count() / 3;
    state.counters["squeeze_share"] = squeeze_s / step_s;
  }
}

template <class Case>
void squeeze_fwd(benchmark::State& state, TrainShape s) {
  auto block = make<Case>(s);
  auto& sq = Case::squeezer(block);
  Tensor<float> w;
  sq.squeeze_into(w);
  for (auto _ : state) {
    sq.squeeze_into(w);
    benchmark::DoNotOptimize(w.data());
    benchmark::ClobberMemory();
  }
}

template <class Case>
void squeeze_bwd(benchmark::State& state, TrainShape s) {
  auto block = make<Case>(s);
  auto& sq = Case::squeezer(block);
  const auto dw = random_tensor(block.geometry().weight_shape(), 3);
  sq.squeeze_backward(dw);
  for (auto _ : state) {
    sq.squeeze_backward(dw);
    benchmark::ClobberMemory();
  }
}

template <class Case>
void register_train(const TrainShape& s) {
  const std::string tail = std::string(Case::name) + "/" + s.name;
  benchmark::RegisterBenchmark(("train_step/" + tail).c_str(), train_step<Case>, s)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}
template <class Case>
void register_squeeze(const TrainShape& s) {
  const std::string tail = std::string(Case::name) + "/" + s.name;
  benchmark::RegisterBenchmark(("squeeze/" + tail).c_str(), squeeze_fwd<Case>, s)->UseRealTime()->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark(("squeeze_backward/" + tail).c_str(), squeeze_bwd<Case>, s)
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond);
}

const bool train_registered = [] {
  for (const auto& s : kTrainShapes) {
    register_train<ConvBNCase>(s);
    register_train<OrepaCase>(s);
    register_train<DbbCase>(s);
    register_train<RepVGGCase>(s);
  }
  for (const auto& s : kTrainShapes) {
    register_squeeze<OrepaCase>(s);
    register_squeeze<RepVGGCase>(s);
  }
  return true;
}();

}  // namespace
}  // namespace orepa::bench
