#pragma once
// Shared helpers for the tests: random tensors, tolerances, finite differences.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>

#include "orepa/orepa.hpp"

namespace orepa::test {

template <class S>
Tensor<S> random_tensor(const Shape& shape, Rng& rng, double bound = 1.0) {
  Tensor<S> t(shape);
  fill_uniform(t, bound, rng);
  return t;
}

/// Randomises every trainable tensor of a block (so zero-initialised ones such as idconv1
/// and the zero prior scale take part in the checks) and its BN running statistics.
template <class Block>
void randomise(Block& b, Rng& rng) {
  for (auto* p : b.parameters()) fill_uniform(p->value, 0.5, rng);
  for (auto* bn : b.batch_norms()) {
    fill_uniform(bn->running_mean.value, 0.5, rng);
    for (auto& v : bn->running_var.value) v = static_cast<std::decay_t<decltype(v)>>(rng.uniform(0.5, 1.5));
  }
}

/// The BatchNorm of `block` whose tensors are `prefix` + "weight", ...; config_error if absent.
template <class Block>
auto& batch_norm(Block& block, const std::string& prefix) {
  Tensors<typename decltype(block.state_dict())::Scalar> t;
  block.collect_tensors(t, "");
  for (auto& [p, bn] : t.batch_norms)
    if (p == prefix) return *bn;
  throw config_error("no BatchNorm with prefix '" + prefix + "'");
}

/// The name prefixes of the block's BatchNorms ("bn.", "rbr_identity.", ...), in order.
template <class Block>
std::vector<std::string> bn_prefixes(Block& block) {
  Tensors<typename decltype(block.state_dict())::Scalar> t;
  block.collect_tensors(t, "");
  std::vector<std::string> r;
  for (auto& [p, bn] : t.batch_norms) r.push_back(p);
  return r;
}

/// Copies every parameter and buffer of `from` into `to` (the same block type built with
/// another scalar), converting the values.
template <class From, class To>
void copy_tensors(From& from, To& to) {
  const auto fp = from.parameters(), fb = from.buffers();  // one auto, one scalar (clang)
  const auto tp = to.parameters(), tb = to.buffers();
  ASSERT_EQ(fp.size(), tp.size());
  ASSERT_EQ(fb.size(), tb.size());
  using T = typename decltype(to.state_dict())::Scalar;
  for (std::size_t j = 0; j < fp.size(); ++j) tp[j]->value = fp[j]->value.template cast<T>();
  for (std::size_t j = 0; j < fb.size(); ++j) tb[j]->value = fb[j]->value.template cast<T>();
}

/// Asserts max |a - e| <= rel * max(1, max |e|), the fixture tolerance.
template <class A, class E>
void expect_close(const Tensor<A>& a, const Tensor<E>& e, double rel, const std::string& what) {
  ASSERT_EQ(a.sizes(), e.sizes()) << what;
  double emax = 0;
  for (auto v : e) emax = std::max(emax, std::abs(double(v)));
  const double err = max_abs_diff(a, e), tol = rel * std::max(1.0, emax);
  EXPECT_LE(err, tol) << what << ": max abs error " << err << " > tolerance " << tol;
}

/// Central-difference derivative of `loss` w.r.t. value[j] of `t`.
template <class S>
double numeric_grad(Tensor<S>& t, std::int64_t j, const std::function<double()>& loss, double h = 1e-6) {
  const S keep = t[j];
  t[j] = keep + S(h);
  const double up = loss();
  t[j] = keep - S(h);
  const double down = loss();
  t[j] = keep;
  return (up - down) / (2 * h);
}

/// Compares an analytic gradient with central differences on up to `samples` entries
/// spread over the tensor; returns the largest relative error seen.
template <class S>
double check_grad(Tensor<S>& value, const Tensor<S>& analytic, const std::function<double()>& loss,
                  const std::string& what, double tol = 1e-5, std::int64_t samples = 12) {
  double worst = 0;
  const std::int64_t n = value.numel(), stride = std::max<std::int64_t>(1, n / samples);
  for (std::int64_t j = 0; j < n; j += stride) {
    const double num = numeric_grad(value, j, loss), ana = double(analytic[j]);
    const double err = std::abs(num - ana) / std::max(1.0, std::abs(num));
    worst = std::max(worst, err);
    EXPECT_LE(err, tol) << what << "[" << j << "]: analytic " << ana << " vs numeric " << num;
  }
  return worst;
}

/// Finite-difference check, in double, of the input and every trainable tensor of `block`
/// for the loss sum(forward_train(x) * gout) with a random gout; buffers must get no
/// gradient. `before_forward` runs before every forward (DBB uses it to pin the
/// statistics its detached border depends on).
template <class Block>
void check_block_gradients(Block& block, Tensor<double> x, Rng& rng,
                           const std::function<void()>& before_forward = [] {}) {
  before_forward();
  const auto& y0 = block.forward_train(x);
  const auto gout = random_tensor<double>(y0.sizes(), rng);
  block.zero_grad();
  const Tensor<double> dx = block.backward(gout);
  auto loss = [&] {
    before_forward();
    const auto& y = block.forward_train(x);
    double l = 0;
    for (std::int64_t j = 0; j < y.numel(); ++j) l += y[j] * gout[j];
    return l;
  };
  double worst = check_grad(x, dx, loss, "input");
  for (auto& [name, p] : block.named_parameters()) worst = std::max(worst, check_grad(p->value, p->grad, loss, name));
  for (auto& [name, p] : block.named_buffers()) EXPECT_TRUE(p->grad.empty()) << name << " is a buffer and must get no gradient";
  ::testing::Test::RecordProperty("worst_fd_relative_error", std::to_string(worst));
  std::printf("  worst finite-difference relative error: %.2e\n", worst);
}

/// Path of a committed test data file.
inline std::string data_path(const std::string& name) { return std::string(OREPA_TEST_DATA_DIR) + "/" + name; }

/// Path of a file of the yolov5n-OREPA fixture (tests/data/yolov5n_orepa/).
inline std::string yolo_fixture(const std::string& name) { return data_path("yolov5n_orepa/" + name); }

/// max |a - e| / max |e| over a tensor (the fixture README's measure); shape_error when
/// the shapes differ.
inline double max_relative_error(const Tensor<float>& a, const Tensor<float>& e) {
  if (a.sizes() != e.sizes())
    throw shape_error("max_relative_error: " + shape_str(a.sizes()) + " vs " + shape_str(e.sizes()));
  double m = 0;
  for (auto v : e) m = std::max(m, double(std::abs(v)));
  return max_abs_diff(a, e) / std::max(m, 1e-30);
}

/// A fresh temporary directory, removed with everything in it at scope exit.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& prefix = "orepa-test") {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path = tmpl;
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  /// Path of `name` inside the directory.
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

/// The what() of the exception of type E thrown by f ("" and a failure if none).
template <class E, class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an exception";
  return "";
}

/// Whether `s` contains `part`.
inline bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

#ifdef OREPA_TOOLS_DIR
/// Exit status and combined stdout + stderr of one tool run.
struct Run {
  int status;
  std::string output;
};
/// Runs `tool` (orepa-convert, orepa-run) with shell-quoted `args`, output captured.
inline Run run(const std::string& tool, const std::string& args) {
  TempDir dir;
  const std::string log = dir / "log";
  const std::string cmd = std::string(OREPA_TOOLS_DIR) + "/" + tool + " " + args + " > " + log + " 2>&1";
  const int raw = std::system(cmd.c_str());
  std::ifstream f(log);
  return {WIFEXITED(raw) ? WEXITSTATUS(raw) : -1, std::string(std::istreambuf_iterator<char>(f), {})};
}
#endif

}  // namespace orepa::test
