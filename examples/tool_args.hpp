#pragma once
// Command-line parsing of the orepa-run and orepa-convert tools, kept apart from their
// main() so the fuzz target and the tests can drive it. Errors throw orepa::config_error
// naming the flag and the value, without the tool's name (main() prints "TOOL: error: ").
// checked_output() is the tools' output-path check (it looks at the file system, so the
// parsers themselves stay pure).
#include <orepa/deploy/precision.hpp>
#include <orepa/io/checkpoint.hpp>
#include <orepa/io/output_path.hpp>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

namespace orepa::tools {

/// Arguments of orepa-run.
struct RunArgs {
  std::string weights, input, output, grad_output, prefix, mode, calibration;
  std::string model;  ///< --model: a YOLOv5 model yaml, the whole network runs (examples/yolo_tool.hpp)
  Precision precision = Precision::fp32;
  std::optional<io::BlockType> block;
  io::BlockSettings settings;
  bool help = false;
};

inline const char* run_usage() {
  return R"(usage: orepa-run --weights W.safetensors --input X.safetensors --output Y.safetensors
                 --mode eval|deploy|train [--block TYPE] [--prefix P]
                 [--stride S] [--padding P] [--dilation D] [--groups G]
                 [--activation identity|relu|silu] [--grad-output G.safetensors]
                 [--precision fp32|bf16|int8] [--calibration CAL.safetensors]

Runs one training-time block of a PyTorch OREPA checkpoint and writes what it computes.
  --weights   safetensors checkpoint holding the block's state dict (under --prefix)
  --input     safetensors file with tensor `input` (NCHW)
  --output    safetensors file to write (replaced atomically): a regular file, a new
              path, or a symbolic link to a regular file (whose target is replaced);
              never a directory, FIFO or device, nor any of the input files
  --mode      eval: running statistics; deploy: the folded single convolution (refused
              when a tensor holds a NaN / Inf or a BN's running_var + eps <= 0);
              train: batch statistics; also writes every BN's updated running
              statistics under the block's own names (e.g. bn.running_mean,
              rbr_identity.running_var)
  --block     OREPA, OREPA_1x1, OREPA_LargeConv, RepVGGBlock_OREPA, ConvBN or DBB;
              detected from the tensor names when absent
  --prefix    name prefix of the block's tensors (default: none)
  --stride (default 1), --padding (default autopad: dilation * (k - 1) / 2),
              --dilation (default 1), --groups (default: from the shapes where they
              tell, else 1), --activation (default identity); a flag that contradicts
              the tensors is an error (e.g. --stride 1 for a RepVGG block without
              rbr_identity but with equal channels; such a block needs --stride)
  --grad-output  (train) safetensors file with tensor `grad_output`: runs backward of
              sum(output * grad_output) and writes grad.input and grad.<name> for every
              trainable parameter
  --precision (deploy) fp32 (default), bf16 or int8: the deployed convolution runs in
              it; bf16 / int8 also print the quantization report (weight and output
              SQNR against fp32) on the calibration batches, or on the input
  --calibration  (deploy) safetensors file in which every tensor is one input batch
              [N, C, H, W], whatever its name; required for int8, whose input range
              is calibrated on them (min/max); the range is written to the
              output as `input_range`
Channels, the kernel size and which optional branches the block has come from the
tensors.

The whole YOLOv5 network instead of one block:
       orepa-run --model MODEL.yaml --weights W.safetensors --input X.safetensors
                 --output Y.safetensors --mode eval|deploy
                 [--precision fp32|bf16|int8] [--calibration CAL.safetensors]
  --model     the model yaml the checkpoint was trained from (e.g. models/yolov5n-orepa.yaml);
              W is a YOLOv5 checkpoint (names model.N.*, each conv slot any block type)
              or the output of orepa-convert --model
  --input     every tensor NAME in it is a batch [N, 3, H, W] (H, W multiples of the
              largest stride); writes NAME.pred, the decoded [N, sum na*H*W, 5 + nc],
              and NAME.raw.0 .. NAME.raw.{nl-1}, the Detect maps before the sigmoid
  --mode      eval (running statistics) or deploy (every conv fused)
  --calibration  (int8) the calibrated input range of every convolution, as
              io::save_calibration writes it (<layer>input_range, e.g.
              model.2.m.0.cv1.input_range)
Exit status 0 on success, 1 with a message on stderr on any error.
)";
}

/// Parses a non-negative integer flag value ("--stride 2"); rejects junk and overflow.
inline std::int64_t parse_int(const std::string& flag, const std::string& v, std::int64_t lo, std::int64_t hi) {
  std::size_t used = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &used, 10);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || v.empty() || x < lo || x > hi)
    throw config_error(detail::cat(flag, ": expected an integer in [", lo, ", ", hi, "], got '", v, "'"));
  return x;
}

/// True when the whole of `v` is one real number ("0.25", "inf"), stored in `x`.
inline bool read_real(const std::string& v, double& x) {
  std::size_t used = 0;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    return false;
  }
  return !v.empty() && used == v.size();
}

/// Parses a real flag value in [lo, hi] ("0.25"; "inf" where hi is infinite); rejects junk.
inline double parse_real(const std::string& flag, const std::string& v, double lo, double hi) {
  double x = 0;
  if (!read_real(v, x) || !(x >= lo && x <= hi))
    throw config_error(detail::cat(flag, ": expected a number in [", lo, ", ", hi, "], got '", v, "'"));
  return x;
}

/// With --model the yaml gives every layer's settings: single-block flags and train mode
/// are errors naming the flag.
inline void check_model_run_args(const std::vector<std::string>& flags, const RunArgs& r) {
  for (const char* flag : {"--block", "--prefix", "--stride", "--padding", "--dilation", "--groups", "--activation",
                           "--grad-output"})
    if (std::find(flags.begin(), flags.end(), flag) != flags.end())
      throw config_error(std::string(flag) + " is for one block; with --model the yaml gives every layer");
  if (r.mode == "train") throw config_error("--mode train: with --model, only eval and deploy");
}

/// Parses orepa-run's arguments (argv[0] excluded).
inline RunArgs parse_run_args(const std::vector<std::string>& args) {
  RunArgs r;
  std::vector<std::string> flags;  // the flags given
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      r.help = true;
      return r;
    }
    if (a.rfind("--", 0) != 0) throw config_error("unexpected argument '" + a + "' (see --help)");
    if (i + 1 >= args.size()) throw config_error(a + " needs a value");
    const std::string& v = args[++i];
    flags.push_back(a);
    if (a == "--weights") r.weights = v;
    else if (a == "--input") r.input = v;
    else if (a == "--output") r.output = v;
    else if (a == "--grad-output") r.grad_output = v;
    else if (a == "--prefix") r.prefix = v;
    else if (a == "--mode") r.mode = v;
    else if (a == "--block") r.block = io::parse_block_type(v);
    else if (a == "--stride") r.settings.stride = parse_int(a, v, 1, 1 << 16);
    else if (a == "--padding") r.settings.padding = parse_int(a, v, 0, 1 << 16);
    else if (a == "--dilation") r.settings.dilation = parse_int(a, v, 1, 1 << 16);
    else if (a == "--groups") r.settings.groups = parse_int(a, v, 1, 1 << 24);
    else if (a == "--activation") r.settings.activation = parse_activation(v);
    else if (a == "--precision") r.precision = parse_precision(v);
    else if (a == "--calibration") r.calibration = v;
    else if (a == "--model") r.model = v.empty() ? throw config_error("--model needs a model yaml") : v;
    else throw config_error("unknown option '" + a + "' (see --help)");
  }
  if (!r.model.empty()) check_model_run_args(flags, r);
  for (auto [flag, value] : {std::pair{"--weights", &r.weights}, {"--input", &r.input}, {"--output", &r.output},
                             {"--mode", &r.mode}})
    if (value->empty()) throw config_error(std::string(flag) + " is required (see --help)");
  if (r.mode != "eval" && r.mode != "deploy" && r.mode != "train")
    throw config_error("--mode: expected eval, deploy or train, got '" + r.mode + "'");
  if (!r.grad_output.empty() && r.mode != "train")
    throw config_error("--grad-output: only meaningful with --mode train");
  if ((r.precision != Precision::fp32 || !r.calibration.empty()) && r.mode != "deploy")
    throw config_error("--precision / --calibration: only meaningful with --mode deploy");
  if (r.precision == Precision::int8 && r.calibration.empty())
    throw config_error("--precision int8 needs --calibration CAL.safetensors (input batches to calibrate on)");
  return r;
}

/// Arguments of orepa-convert: IN.safetensors OUT.safetensors [--model MODEL.yaml] [--allow-nonfinite].
struct ConvertArgs {
  std::string in, out;
  bool allow_nonfinite = false;
  std::string model;  ///< --model: a YOLOv5 model yaml (examples/yolo_tool.hpp)
  bool help = false;
};

inline const char* convert_usage() {
  return R"(usage: orepa-convert IN.safetensors OUT.safetensors [--model MODEL.yaml] [--allow-nonfinite]

Deploys every training-time OREPA-family block of a PyTorch checkpoint (OREPA, OREPA_1x1,
OREPA_LargeConv, RepVGGBlock_OREPA, ConvBN, DBB; the outermost block when blocks nest):
each becomes <prefix>orepa_reparam / or1x1_reparam / or_large_reparam / rbr_reparam /
dbb_reparam .weight + .bias (ConvBN: <prefix>conv.weight + conv.bias) and its
training-time tensors are dropped; every other tensor is copied unchanged. OUT is written
to a temporary file and renamed; IN is never modified. Prints one line per block.

A block whose tensors hold a NaN or Inf (weights, running statistics), whose BN has
running_var + eps <= 0, or whose fold overflows is an error naming the tensor and the
first bad index. --allow-nonfinite writes such blocks anyway, with a warning on stderr.
OUT must be a regular file, a new path or a symbolic link to a regular file (its
target is replaced), and not IN itself (nor a link to it).

  --model MODEL.yaml  IN is a YOLOv5 checkpoint of this model yaml (names model.N.*):
              the network is built from the yaml with each conv slot's block from IN
              and loaded strictly, and every block is folded with YOLOv5's BatchNorm
              eps 1e-3; OUT has the names of the PyTorch model after switch_to_deploy()
              and fuse(). Detect's tensors and anchors are copied unchanged.
)";
}

inline ConvertArgs parse_convert_args(const std::vector<std::string>& args) {
  ConvertArgs c;
  std::vector<std::string> pos;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      c.help = true;
      return c;
    }
    if (a == "--allow-nonfinite") {
      c.allow_nonfinite = true;
      continue;
    }
    if (a == "--model") {
      if (i + 1 >= args.size() || args[i + 1].empty()) throw config_error("--model needs a model yaml");
      c.model = args[++i];
      continue;
    }
    if (a.rfind("-", 0) == 0 && a.size() > 1) throw config_error("unknown option '" + a + "' (see --help)");
    pos.push_back(a);
  }
  if (pos.size() != 2)
    throw config_error(detail::cat("expected 2 arguments IN.safetensors OUT.safetensors, got ",
                                   pos.size(), " (see --help)"));
  if (pos[0].empty() || pos[1].empty()) throw config_error("IN and OUT must not be empty paths");
  c.in = pos[0];
  c.out = pos[1];
  return c;
}

/// The file orepa-run's --output replaces (io::check_output_path): config_error when it is
/// one of the input files or no place for a regular file.
inline std::string checked_output(const RunArgs& r) {
  return io::check_output_path({"--output", r.output}, {{"--weights", r.weights},
                                                        {"--input", r.input},
                                                        {"--grad-output", r.grad_output},
                                                        {"--calibration", r.calibration}});
}
/// The file orepa-convert's OUT replaces, checked the same way against IN.
inline std::string checked_output(const ConvertArgs& c) { return io::check_output_path({"OUT", c.out}, {{"IN", c.in}}); }

}  // namespace orepa::tools
