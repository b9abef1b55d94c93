// demo: the main example. A small YOLOv5-style classifier (stride-2 Conv stem, Conv
// downsamples, C3 CSP bottlenecks, global pooling and a linear head) whose every conv is
// an OREPA-family block (nn/yolo.hpp, yolo_conv), trained on procedurally generated
// images of bars (nn/synthetic.hpp: classify the bar's orientation), with a live
// one-line progress bar. Then it deploys every block to one fused oneDNN convolution,
// checks that the deployed network predicts exactly what the eval forward predicts, and
// prints parameters (training vs deployed form), the training step time of the SAME
// network built from OREPA, DBB and plain ConvBN blocks, and the inference time of the
// eval forward vs the deployed network; then the deployed network in bf16 and int8
// (calibrated on training images): held-out accuracy, inference time and the per-layer
// quantization error of each. Writes the loss / accuracy curves as an SVG.
//
//   demo [--steps N] [--batch B] [--width W] [--svg PATH] [--seed S] [--help]
//
// Exit status: 0 on success; 1 when the deployed network disagrees with eval mode, the
// held-out accuracy is below the sanity bound, the loss is not finite, or on any error.
#include <orepa/orepa.hpp>
#include <orepa/nn/yolo.hpp>

#include "demo_network.hpp"
#include "tool_args.hpp"  // tools::parse_int, the checked integer-flag parser

#include <unistd.h>  // isatty

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

using namespace orepa;
using orepa::examples::build_classifier;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// ---------------------------------------------------------------------------------------
// Command line

struct Args {
  std::int64_t steps = 500;   // training steps
  std::int64_t batch = 64;    // images per step
  std::int64_t width = 16;    // channels after the stem; the network goes w, 2w, 4w
  std::uint64_t seed = 1;     // data, initialisation and shuffling
  std::string svg = "orepa_demo_curves.svg";
};

const char* usage() {
  return R"(usage: demo [--steps N] [--batch B] [--width W] [--svg PATH] [--seed S] [--help]

Trains a small YOLOv5-style classifier built from OREPA blocks on procedurally generated
32x32 images of bars (4 orientations, fresh images every epoch), deploys every block and checks deploy == eval, then compares the
training step time with the same network built from DBB and from plain ConvBN blocks.
  --steps N   training steps (default 500)
  --batch B   images per step (default 64)
  --width W   channels after the stem, the network goes W, 2W, 4W (default 16)
  --svg PATH  where to write the loss / accuracy curves (default ./orepa_demo_curves.svg)
  --seed S    seed of the data, the initialisation and the shuffling (default 1)
Exit status 1 when the deployed network disagrees with eval mode or, from 150 steps on,
the held-out accuracy is below 90%.
)";
}


// Returns false when --help was given (usage printed).
bool parse_args(int argc, char** argv, Args& a) {
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(usage(), stdout);
      return false;
    }
    if (i + 1 >= argc) throw config_error(detail::cat(flag, ": unknown flag or missing value (see --help)"));
    const std::string v = argv[++i];
    if (flag == "--steps") a.steps = tools::parse_int(flag, v, 1, 10'000'000);
    else if (flag == "--batch") a.batch = tools::parse_int(flag, v, 2, 4096);
    else if (flag == "--width") a.width = tools::parse_int(flag, v, 2, 1024);
    else if (flag == "--seed") a.seed = std::uint64_t(tools::parse_int(flag, v, 0, 1'000'000'000));
    else if (flag == "--svg") a.svg = v;
    else throw config_error(detail::cat("unknown flag '", flag, "' (see --help)"));
  }
  return true;
}

// ---------------------------------------------------------------------------------------
// The data (the network is build_classifier, examples/demo_network.hpp)

constexpr std::int64_t kImageSize = 32;
// Pixel noise of the bar images (nn/synthetic.hpp's default is 0.2): noisier images make
// the task take a few hundred steps instead of a few dozen.
constexpr double kNoise = 0.5;

// One line per layer: what the network is made of.
void describe(Sequential<float>& net) {
  for (std::size_t i = 0; i < net.size(); ++i) {
    AnyBlock<float>& l = net.layer(i);
    std::string what;
    if (l.is_conv()) {
      const auto& g = l.geometry();
      what = detail::cat("Conv ", g.in_channels, "->", g.out_channels, " k", g.kernel, " s", g.stride, "  [",
                         l.type_name(), "]");
    } else if (auto* c = l.target<C3<float>>()) {
      what = detail::cat("C3 ", c->cv1().geometry().in_channels, "->", c->cv3().geometry().out_channels,
                         ", 1 Bottleneck  [1x1 ", c->cv1().type_name(), ", 3x3 ", c->m()[0].cv2().type_name(), "]");
    } else if (auto* lin = l.target<Linear<float>>()) {
      what = detail::cat("Linear ", lin->in_features(), "->", lin->out_features());
    } else {
      what = l.type_name();
    }
    std::printf("  %zu  %s\n", i, what.c_str());
  }
}

// Trainable elements (buffers such as running statistics and OREPA's fixed prior excluded).
std::int64_t trainable_parameters(Sequential<float>& net) {
  std::int64_t n = 0;
  for (auto* p : net.parameters()) n += p->value.numel();
  return n;
}

// SGD with Nesterov momentum; no weight decay on scaling vectors, BN parameters, biases.
SGD<float> make_optimizer(Sequential<float>& net, double lr) {
  return SGD<float>(split_decay(net.parameters(), 5e-4, 0.0), SGDOptions(lr).momentum(0.9).nesterov(true));
}

struct StepResult {
  float loss = 0;
  std::int64_t correct = 0;
};

// One optimisation step on (x, y) at learning rate lr.
StepResult train_step(Sequential<float>& net, SGD<float>& opt, SoftmaxCrossEntropy<float>& ce, const Tensor<float>& x,
                      const std::vector<int>& y, double lr) {
  opt.zero_grad();
  const Tensor<float>& logits = net.forward_train(x);
  StepResult r;
  const auto pred = argmax_rows(logits);
  for (std::size_t n = 0; n < y.size(); ++n) r.correct += pred[n] == y[n];
  r.loss = ce.forward_train(logits, y);
  net.backward(ce.backward());
  opt.set_lr(float(lr));
  opt.step();
  return r;
}

// One network in training form with its optimizer, for timing training steps.
struct TimedNet {
  std::string family;
  Sequential<float> net;
  SGD<float> opt;
  SoftmaxCrossEntropy<float> ce;
  std::vector<double> ms;  // one entry per timed step

  TimedNet(std::string name, Sequential<float> n)
      : family(std::move(name)), net(std::move(n)), opt(make_optimizer(net, 0.01)) {}
  void step(const Tensor<float>& x, const std::vector<int>& y) { train_step(net, opt, ce, x, y, 0.01); }
};

// Training cost of the same network built from OREPA, DBB and ConvBN blocks: median time
// of one step (forward, backward, optimizer) on the same batch, after two warm-up steps
// (primitive creation, optimizer buffers). The families take turns step by step, so a
// change in the machine's load hits all three alike.
std::vector<TimedNet> time_families(const Args& a, const Tensor<float>& x, const std::vector<int>& y, int reps) {
  std::vector<TimedNet> nets;
  nets.emplace_back("OREPA", build_classifier(a.width, 4, a.seed, orepa_maker<float>()));
  nets.emplace_back("DBB", build_classifier(a.width, 4, a.seed, dbb_maker<float>()));
  nets.emplace_back("ConvBN", build_classifier(a.width, 4, a.seed, maker_of<ConvBN, float>()));
  for (auto& n : nets) n.step(x, y), n.step(x, y);
  for (int r = 0; r < reps; ++r)
    for (std::size_t k = 0; k < nets.size(); ++k) {
      TimedNet& n = nets[(k + std::size_t(r)) % nets.size()];  // rotate who goes first
      const auto t0 = Clock::now();
      n.step(x, y);
      n.ms.push_back(seconds_since(t0) * 1e3);
    }
  return nets;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// ---------------------------------------------------------------------------------------
// Progress: one terminal line rewritten with \r on a TTY, plain lines otherwise.

std::string clock_str(double s) {
  const long t = long(std::lround(std::max(0.0, s)));
  return t >= 3600 ? detail::cat(t / 3600, "h", (t / 60) % 60 < 10 ? "0" : "", (t / 60) % 60, "m")
                   : detail::cat(t / 60, ":", t % 60 < 10 ? "0" : "", t % 60);
}

class Progress {
 public:
  Progress(std::int64_t total, std::int64_t batch) : total_(total), batch_(batch), tty_(isatty(fileno(stdout))) {}

  void update(std::int64_t step, double loss, double acc, double elapsed) {
    const std::int64_t done = step + 1;
    const bool last = done == total_;
    const double per_step = elapsed / double(done);
    const double ips = double(done * batch_) / std::max(elapsed, 1e-9);
    const double eta = per_step * double(total_ - done);
    if (tty_) {
      // Redraw at most ~10 times a second (printing is not free) and always at the end.
      if (!last && elapsed - last_draw_ < 0.1) return;
      last_draw_ = elapsed;
      constexpr int kBar = 24;
      const int fill = int(double(kBar) * double(done) / double(total_));
      std::string bar(std::size_t(fill), '#');
      bar.resize(kBar, '.');
      std::printf("\r  step %*lld/%lld [%s] loss %.3f  acc %5.1f%%  %6.0f img/s  ETA %s   ", digits(),
                  static_cast<long long>(done), static_cast<long long>(total_), bar.c_str(), loss, 100 * acc, ips,
                  clock_str(eta).c_str());
      if (last) std::printf("\n");
      std::fflush(stdout);
    } else {
      // Not a terminal (a log, CI): about ten plain lines.
      const std::int64_t every = std::max<std::int64_t>(1, total_ / 10);
      if (done % every != 0 && !last) return;
      std::printf("  step %*lld/%lld  loss %.3f  acc %5.1f%%  %6.0f img/s  ETA %s\n", digits(),
                  static_cast<long long>(done), static_cast<long long>(total_), loss, 100 * acc, ips,
                  clock_str(eta).c_str());
      std::fflush(stdout);
    }
  }

 private:
  int digits() const { return int(std::to_string(total_).size()); }
  std::int64_t total_, batch_;
  bool tty_;
  double last_draw_ = -1;
};

// ---------------------------------------------------------------------------------------
// Curves as a hand-written SVG: training loss (left), accuracy (right).

struct Series {
  std::vector<std::pair<double, double>> points;  // (step, value)
  std::string color;
  double stroke = 1.5, opacity = 1.0;
  std::string label;
  bool markers = false;  // dots instead of a line
};

std::string fmt(double v, int decimals = 1) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

// One panel at (x0, y0) of size w x h with its axes, ticks, series and legend.
// The legend sits in the top-right corner, or the bottom-right one (`legend_low`) when
// the curves run along the top.
void svg_panel(std::ostream& o, double x0, double y0, double w, double h, const std::string& title, double xmax,
               double ymax, bool percent, bool legend_low, const std::vector<Series>& series) {
  const double L = x0 + 52, R = x0 + w - 12, T = y0 + 30, B = y0 + h - 36;
  auto px = [&](double s) { return L + (R - L) * s / std::max(xmax, 1.0); };
  auto py = [&](double v) { return B - (B - T) * std::clamp(v / ymax, 0.0, 1.0); };
  o << "<text x=\"" << fmt((L + R) / 2) << "\" y=\"" << fmt(y0 + 18) << "\" text-anchor=\"middle\" font-size=\"14\" "
    << "font-weight=\"bold\">" << title << "</text>\n";
  for (int i = 0; i <= 5; ++i) {  // horizontal grid and y labels
    const double v = ymax * i / 5, y = py(v);
    o << "<line x1=\"" << fmt(L) << "\" y1=\"" << fmt(y) << "\" x2=\"" << fmt(R) << "\" y2=\"" << fmt(y)
      << "\" stroke=\"#e3e3e3\"/>\n";
    o << "<text x=\"" << fmt(L - 6) << "\" y=\"" << fmt(y + 4) << "\" text-anchor=\"end\" font-size=\"11\">"
      << (percent ? fmt(100 * v, 0) + "%" : fmt(v, 2)) << "</text>\n";
  }
  for (int i = 0; i <= 4; ++i) {  // x ticks (steps)
    const double s = std::round(xmax * i / 4), x = px(s);
    o << "<line x1=\"" << fmt(x) << "\" y1=\"" << fmt(B) << "\" x2=\"" << fmt(x) << "\" y2=\"" << fmt(B + 4)
      << "\" stroke=\"#555\"/>\n";
    o << "<text x=\"" << fmt(x) << "\" y=\"" << fmt(B + 17) << "\" text-anchor=\"middle\" font-size=\"11\">"
      << fmt(s, 0) << "</text>\n";
  }
  o << "<text x=\"" << fmt((L + R) / 2) << "\" y=\"" << fmt(B + 31) << "\" text-anchor=\"middle\" font-size=\"11\">"
    << "training step</text>\n";
  o << "<rect x=\"" << fmt(L) << "\" y=\"" << fmt(T) << "\" width=\"" << fmt(R - L) << "\" height=\"" << fmt(B - T)
    << "\" fill=\"none\" stroke=\"#555\"/>\n";
  std::size_t labelled = 0;
  for (const auto& s : series) labelled += !s.label.empty();
  const double legend_h = 15.0 * double(labelled) + 6;
  double ly = legend_low ? B - legend_h - 4 : T + 4;
  o << "<rect x=\"" << fmt(R - 158) << "\" y=\"" << fmt(ly) << "\" width=\"152\" height=\"" << fmt(legend_h)
    << "\" fill=\"white\" fill-opacity=\"0.85\" stroke=\"#ccc\"/>\n";
  ly += 16;
  for (const auto& s : series) {
    if (s.markers) {
      for (const auto& [x, v] : s.points)
        o << "<circle cx=\"" << fmt(px(x)) << "\" cy=\"" << fmt(py(v)) << "\" r=\"3\" fill=\"" << s.color << "\"/>\n";
    } else {
      o << "<polyline fill=\"none\" stroke=\"" << s.color << "\" stroke-width=\"" << fmt(s.stroke)
        << "\" stroke-opacity=\"" << fmt(s.opacity, 2) << "\" points=\"";
      for (const auto& [x, v] : s.points) o << fmt(px(x)) << "," << fmt(py(v)) << " ";
      o << "\"/>\n";
    }
    if (s.label.empty()) continue;
    o << "<rect x=\"" << fmt(R - 150) << "\" y=\"" << fmt(ly - 8) << "\" width=\"12\" height=\"4\" fill=\"" << s.color
      << "\"/>\n";
    o << "<text x=\"" << fmt(R - 132) << "\" y=\"" << fmt(ly - 3) << "\" font-size=\"11\">" << s.label << "</text>\n";
    ly += 15;
  }
}

struct Curves {
  std::vector<double> loss, acc;                      // per training step (minibatch)
  std::vector<std::pair<double, double>> held_out;  // (step, eval-mode accuracy)
};

// Moving average over the last `window` values (the first ones over what there is).
std::vector<std::pair<double, double>> smoothed(const std::vector<double>& v, std::size_t window) {
  std::vector<std::pair<double, double>> out;
  double sum = 0;
  for (std::size_t i = 0; i < v.size(); ++i) {
    sum += v[i];
    if (i >= window) sum -= v[i - window];
    out.emplace_back(double(i + 1), sum / double(std::min(i + 1, window)));
  }
  return out;
}

void write_svg(const std::string& path, const Curves& c, const std::string& subtitle) {
  const std::size_t window = std::max<std::size_t>(5, c.loss.size() / 40);
  std::vector<std::pair<double, double>> raw;
  double loss_max = 0;
  for (std::size_t i = 0; i < c.loss.size(); ++i) {
    raw.emplace_back(double(i + 1), c.loss[i]);
    loss_max = std::max(loss_max, c.loss[i]);
  }
  loss_max = std::max(0.5, std::ceil(loss_max * 2) / 2);  // round up to 0.5
  const double steps = double(c.loss.size());

  std::ostringstream o;
  o << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
    << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"900\" height=\"380\" viewBox=\"0 0 900 380\" "
    << "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n"
    << "<rect width=\"900\" height=\"380\" fill=\"white\"/>\n"
    << "<text x=\"450\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">" << subtitle << "</text>\n";
  svg_panel(o, 0, 30, 450, 350, "training loss (cross-entropy)", steps, loss_max, false, false,
            {{raw, "#1f77b4", 1.0, 0.25, "per step"},
             {smoothed(c.loss, window), "#1f77b4", 2.0, 1.0, detail::cat("mean of ", window)}});
  std::vector<std::pair<double, double>> acc_raw;
  for (std::size_t i = 0; i < c.acc.size(); ++i) acc_raw.emplace_back(double(i + 1), c.acc[i]);
  svg_panel(o, 450, 30, 450, 350, "accuracy", steps, 1.0, true, true,
            {{smoothed(c.acc, window), "#2ca02c", 2.0, 1.0, detail::cat("train, mean of ", window)},
             {c.held_out, "#d62728", 1.5, 1.0, "held-out (eval)"},
             {c.held_out, "#d62728", 1.5, 1.0, "", true}});
  o << "</svg>\n";

  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << o.str();
  f.close();
  if (!f) throw std::runtime_error("cannot write the SVG file '" + path + "'");
}

}  // namespace

int main(int argc, char** argv) try {
  Args args;
  if (!parse_args(argc, argv, args)) return 0;
  const auto t_start = Clock::now();

  // Data: 32x32 single-channel images of one bar each, 4 orientation classes. Images
  // cost nothing to make, so every epoch trains on fresh ones (no over-fitting to a fixed
  // set); the held-out set has its own seed.
  const std::int64_t epoch_images = 4096;
  auto data_seed = [&](std::uint64_t stream) { return args.seed * 1'000'003 + stream; };
  const auto test = make_bars_dataset<float>(1024, data_seed(0), kImageSize, kNoise);
  ImageDataset<float> train;
  std::int64_t epoch = 0;

  Sequential<float> net = build_classifier(args.width, test.num_classes, args.seed, orepa_maker<float>());
  std::printf("OREPA demo: YOLOv5-style classifier on %lldx%lld bar images (4 orientations; %lld fresh training\n"
              "images per epoch, %lld held-out)\n",
              static_cast<long long>(kImageSize), static_cast<long long>(kImageSize),
              static_cast<long long>(epoch_images), static_cast<long long>(test.size()));
  describe(net);

  // Training: SGD + Nesterov, cosine schedule with warm-up, shuffled epochs.
  const double base_lr = 0.1;
  SGD<float> opt = make_optimizer(net, base_lr);
  const CosineSchedule schedule(base_lr, args.steps, std::min<std::int64_t>(20, args.steps / 10));
  SoftmaxCrossEntropy<float> ce;
  Rng rng(args.seed + 100);
  std::vector<std::int64_t> order(static_cast<std::size_t>(epoch_images));
  std::iota(order.begin(), order.end(), 0);
  std::size_t cursor = order.size();
  const std::size_t batch = std::size_t(std::min(args.batch, epoch_images));
  Curves curves;
  Tensor<float> first_x;
  std::vector<int> first_y;
  const std::int64_t eval_every = std::max<std::int64_t>(1, args.steps / 10);
  const auto held_out_probe = test.slice(0, 256);  // cheap eval-mode accuracy for the curve
  auto probe_accuracy = [&] {
    const auto pred = argmax_rows(net.forward_eval(held_out_probe.first));
    std::int64_t ok = 0;
    for (std::size_t n = 0; n < pred.size(); ++n) ok += pred[n] == held_out_probe.second[n];
    return double(ok) / double(pred.size());
  };

  std::printf("\ntraining %lld steps of %zu images (SGD, Nesterov, cosine lr %.2g):\n",
              static_cast<long long>(args.steps), batch, base_lr);
  curves.held_out.emplace_back(0.0, probe_accuracy());  // before training: chance level
  Progress progress(args.steps, std::int64_t(batch));
  const auto t_train = Clock::now();
  double window_loss = 0, window_acc = 0;
  const std::size_t bar_window = 20;
  for (std::int64_t step = 0; step < args.steps; ++step) {
    if (cursor + batch > order.size()) {  // new epoch: fresh images, Fisher-Yates shuffle
      train = make_bars_dataset<float>(epoch_images, data_seed(std::uint64_t(++epoch)), kImageSize, kNoise);
      for (std::size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
      cursor = 0;
    }
    std::vector<std::int64_t> idx(order.begin() + std::ptrdiff_t(cursor), order.begin() + std::ptrdiff_t(cursor + batch));
    cursor += batch;
    auto [x, y] = train.batch(idx);
    if (step == 0) {  // kept for the timing comparison below
      first_x = x;
      first_y = y;
    }

    const StepResult r = train_step(net, opt, ce, x, y, schedule.lr(step));
    if (!std::isfinite(r.loss)) {
      std::printf("\n");
      std::fprintf(stderr, "demo: the loss is not finite at step %lld\n", static_cast<long long>(step));
      return 1;
    }
    curves.loss.push_back(r.loss);
    curves.acc.push_back(double(r.correct) / double(batch));
    // The bar shows the mean of the last `bar_window` steps (single minibatches are noisy).
    window_loss += r.loss;
    window_acc += curves.acc.back();
    if (curves.loss.size() > bar_window) {
      window_loss -= curves.loss[curves.loss.size() - 1 - bar_window];
      window_acc -= curves.acc[curves.acc.size() - 1 - bar_window];
    }
    const double n = double(std::min(curves.loss.size(), bar_window));
    if ((step + 1) % eval_every == 0 || step + 1 == args.steps)
      curves.held_out.emplace_back(double(step + 1), probe_accuracy());
    progress.update(step, window_loss / n, window_acc / n, seconds_since(t_train));
  }

  // Deploy: every block becomes one fused convolution (BN folded, bias + SiLU fused).
  const InferenceChain<float> deployed = net.deploy();
  std::int64_t correct = 0, agree = 0;
  double max_diff = 0, max_logit = 0;
  for (std::int64_t b = 0; b < test.size(); b += 256) {
    auto [x, y] = test.slice(b, 256);
    const Tensor<float> eval = net.forward_eval(x), dep = deployed.forward(x);
    const auto pe = argmax_rows(eval), pd = argmax_rows(dep);
    for (std::size_t i = 0; i < y.size(); ++i) {
      correct += pe[i] == y[i];
      agree += pe[i] == pd[i];
    }
    max_diff = std::max(max_diff, max_abs_diff(eval, dep));
    for (float v : eval) max_logit = std::max(max_logit, double(std::abs(v)));
  }
  const double accuracy = double(correct) / double(test.size());
  std::printf("\nheld-out accuracy (eval mode): %.2f%% (%lld/%lld)\n", 100 * accuracy,
              static_cast<long long>(correct), static_cast<long long>(test.size()));
  std::printf("deployed vs eval: same class on %lld/%lld images, max |logit difference| %.2g (logits up to %.3g)\n",
              static_cast<long long>(agree), static_cast<long long>(test.size()), max_diff, max_logit);

  // Reduced precision: int8 ranges calibrated on training images (never the held-out
  // set), with both calibration methods; bf16 where this CPU has oneDNN kernels for it.
  std::printf("\nreduced precision (oneDNN ISA %s): calibrating int8 on 512 training images...\n",
              engine::cpu_isa_name().c_str());
  std::fflush(stdout);
  const auto calib_set = make_bars_dataset<float>(512, data_seed(999'999), kImageSize, kNoise);
  std::vector<Tensor<float>> calib_batches;
  for (std::int64_t b = 0; b < calib_set.size(); b += 128) calib_batches.push_back(calib_set.slice(b, 128).first);
  Calibrator cal_mse(CalibrationMethod::mse), cal_minmax(CalibrationMethod::minmax);
  for (const auto& b : calib_batches) cal_mse.observe(deployed, b), cal_minmax.observe(deployed, b);
  struct Variant {
    Precision precision;
    std::optional<InferenceChain<float>> chain;  // empty: no oneDNN kernel on this CPU
    std::string unavailable;
    double accuracy = 0, ms = 0;
    std::vector<double> times;
  };
  std::vector<Variant> variants(3);
  variants[0].precision = Precision::fp32, variants[0].chain = deployed;
  variants[1].precision = Precision::bf16, variants[2].precision = Precision::int8;
  for (auto* v : {&variants[1], &variants[2]}) {
    try {
      auto c = deployed.with_options(DeployOptions().precision(v->precision).calibration(cal_minmax.calibration()));
      (void)c.forward(calib_batches[0]);  // creates the primitives: throws where oneDNN has none
      v->chain = std::move(c);
    } catch (const engine_error& e) {
      v->unavailable = e.what();
    }
  }
  for (auto& v : variants) {
    if (!v.chain) continue;
    std::int64_t ok = 0;
    for (std::int64_t b = 0; b < test.size(); b += 256) {
      auto [x, y] = test.slice(b, 256);
      const auto pred = argmax_rows(v.chain->forward(x));
      for (std::size_t i = 0; i < y.size(); ++i) ok += pred[i] == y[i];
    }
    v.accuracy = double(ok) / double(test.size());
  }

  // Costs: parameters, training step time per block family, inference time.
  std::printf("\nmeasuring (median of timed repetitions; the machine's other load adds noise)...\n");
  std::fflush(stdout);
  const int reps = args.steps >= 100 ? 9 : 3;  // short (smoke-test) runs time fewer steps
  std::vector<TimedNet> timed = time_families(args, first_x, first_y, reps);
  const double orepa_ms = median(timed[0].ms), dbb_ms = median(timed[1].ms), convbn_ms = median(timed[2].ms);
  const std::int64_t orepa_params = trainable_parameters(timed[0].net), dbb_params = trainable_parameters(timed[1].net),
                     convbn_params = trainable_parameters(timed[2].net);
  const std::int64_t deployed_params = deployed.num_parameters();
  const Tensor<float>& probe_x = held_out_probe.first;
  std::vector<double> eval_times;  // interleaved with the deployed precisions, after one warm-up each
  (void)net.forward_eval(probe_x);
  for (auto& v : variants)
    if (v.chain) (void)v.chain->forward(probe_x);
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    (void)net.forward_eval(probe_x);
    eval_times.push_back(seconds_since(t0) * 1e3);
    for (auto& v : variants) {
      if (!v.chain) continue;
      t0 = Clock::now();
      (void)v.chain->forward(probe_x);
      v.times.push_back(seconds_since(t0) * 1e3);
    }
  }
  for (auto& v : variants)
    if (v.chain) v.ms = median(v.times);
  const double eval_ms = median(eval_times), deploy_ms = variants[0].ms;

  std::printf("\n%-36s %12s %12s %12s\n", "", "OREPA", "DBB", "ConvBN");
  std::printf("%-36s %12lld %12lld %12lld\n", "parameters, training form", static_cast<long long>(orepa_params),
              static_cast<long long>(dbb_params), static_cast<long long>(convbn_params));
  std::printf("%-36s %12lld %12lld %12lld\n", "parameters, deployed form", static_cast<long long>(deployed_params),
              static_cast<long long>(deployed_params), static_cast<long long>(deployed_params));
  std::printf("%-36s %12.2f %12.2f %12.2f\n", detail::cat("training step, batch ", batch, " (ms)").c_str(), orepa_ms,
              dbb_ms, convbn_ms);
  std::printf("%-36s %11.2fx %11.2fx %11.2fx\n", "  relative to ConvBN", orepa_ms / convbn_ms, dbb_ms / convbn_ms, 1.0);
  std::printf("%-36s %12.2f\n", "inference, batch 256, eval form (ms)", eval_ms);
  std::printf("%-36s %12.2f   (%.2fx faster)\n", "inference, batch 256, deployed (ms)", deploy_ms, eval_ms / deploy_ms);

  std::printf("\n%-36s %12s %12s %12s\n", "deployed network", "fp32", "bf16", "int8");
  auto row = [&](const char* label, auto cell) {
    std::printf("%-36s", label);
    for (const auto& v : variants) std::printf(" %12s", v.chain ? cell(v).c_str() : "n/a");
    std::printf("\n");
  };
  row("held-out accuracy (%)", [](const Variant& v) { return fmt(100 * v.accuracy, 2); });
  row("inference, batch 256 (ms)", [](const Variant& v) { return fmt(v.ms, 2); });
  row("  speed-up over fp32", [&](const Variant& v) { return fmt(deploy_ms / v.ms, 2) + "x"; });
  std::optional<QuantizationReport> int8_report;
  std::vector<std::string> sqnr(3, "-");
  for (std::size_t i = 1; i < variants.size(); ++i) {
    if (!variants[i].chain) {
      std::printf("  %s: %s\n", precision_name(variants[i].precision), variants[i].unavailable.c_str());
      continue;
    }
    auto r = quantization_report(deployed, *variants[i].chain, calib_batches);
    sqnr[i] = fmt(r.output_sqnr_db, 1);
    if (variants[i].precision == Precision::int8) int8_report = std::move(r);
  }
  std::printf("%-36s %12s %12s %12s\n", "output SQNR vs fp32 (dB)", sqnr[0].c_str(), sqnr[1].c_str(), sqnr[2].c_str());
  if (int8_report) {
    const auto mse = deployed.with_options(DeployOptions().precision(Precision::int8).calibration(cal_mse.calibration()));
    std::printf("int8 calibration: min/max ranges %.1f dB end to end (used), MSE-optimal clip %.1f dB\n",
                int8_report->output_sqnr_db, quantization_report(deployed, mse, calib_batches).output_sqnr_db);
    std::printf("int8 error per layer, the worst 3 of %zu (calibration images):\n", int8_report->layers.size());
    int8_report->print(std::cout, 3);
    std::cout.flush();
  }

  write_svg(args.svg, curves,
            detail::cat("OREPA YOLOv5-style classifier, width ", args.width, ", ", args.steps, " steps of ", batch,
                        ", held-out accuracy ", fmt(100 * accuracy, 1), "%"));
  std::printf("\nloss / accuracy curves: %s\n", std::filesystem::absolute(args.svg).string().c_str());
  std::printf("total time %.1f s\n", seconds_since(t_start));

  // Sanity: deploy must agree with eval everywhere; a default-length run must learn the task.
  const double bound = args.steps >= 150 ? 0.9 : 0.0;
  bool ok = true;
  if (agree != test.size() || !(max_diff <= 1e-3 * std::max(1.0, max_logit))) {
    std::fprintf(stderr, "demo: the deployed network disagrees with eval mode\n");
    ok = false;
  }
  if (variants[2].chain && variants[2].accuracy < accuracy - 0.05 && args.steps >= 150) {
    std::fprintf(stderr, "demo: int8 held-out accuracy %.2f%% is more than 5 points below fp32's\n",
                 100 * variants[2].accuracy);
    ok = false;
  }
  if (accuracy < bound) {
    std::fprintf(stderr, "demo: held-out accuracy %.2f%% is below the sanity bound %.0f%%\n", 100 * accuracy,
                 100 * bound);
    ok = false;
  }
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  if (isatty(fileno(stdout))) std::printf("\n");  // leave a progress bar's line
  std::fflush(stdout);
  std::fprintf(stderr, "demo: %s\n", e.what());
  return 1;
}
