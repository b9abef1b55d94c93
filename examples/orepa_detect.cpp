// orepa-detect: a YOLOv5 network (model yaml + checkpoint) finds objects in an image and
// writes them as JSON and as a picture with labelled boxes, or times its stages (--help).
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tool_main.hpp"
#include "yolo_tool.hpp"

using namespace orepa;
namespace fs = std::filesystem;

namespace {

struct DetectArgs {
  std::string model, weights, image, json_out, image_out, names, calibration;
  Precision precision = Precision::fp32;
  std::int64_t img_size = 640;
  double conf = 0.25, iou = 0.45;
  std::int64_t max_det = 1000;
  bool agnostic = false;
  std::int64_t benchmark = 0;
  bool help = false;
};

const char* usage() {
  return R"(usage: orepa-detect --model MODEL.yaml --weights W.safetensors --image IMAGE
                    [--output-json OUT.json] [--output-image OUT.png]
                    [--img-size 640] [--precision fp32|bf16|int8] [--calibration CAL.safetensors]
                    [--conf 0.25] [--iou 0.45] [--max-det 1000] [--agnostic]
                    [--names NAMES] [--benchmark N]

Finds objects in IMAGE (PNG, JPEG, BMP, TGA, PPM / PGM) with a YOLOv5 network, as
YOLOv5's detect.py does: letterbox to --img-size (the longer side; the other padded to
a multiple of the largest stride with grey 114), the deployed network, class-aware NMS,
boxes mapped back to the image's pixels.
  --model     the model yaml (e.g. models/yolov5n-orepa.yaml)
  --weights   its checkpoint: YOLOv5's names (model.N.*, any block per conv slot, as
              pth_to_safetensors.py writes them) or orepa-convert --model's output
  --output-json   detections: for each its class, class name (with --names),
              confidence and box [x1, y1, x2, y2] in the image's pixels
  --output-image  the image with the boxes drawn and labelled (.png, .jpg or .bmp)
  --img-size  letterbox size (default 640; rounded up to a multiple of the stride)
  --precision fp32 (default), bf16 or int8; int8 needs --calibration, the input range
              of every convolution as io::save_calibration writes it
  --conf, --iou, --max-det   NMS: confidence threshold (0.25), IoU threshold (0.45),
              detections kept (1000), detect.py's defaults; --agnostic: across classes
  --names     class names: a data yaml (its `names`), a yaml file holding a list or a
              map 0: name, or an inline yaml list such as "[circle, square, triangle]"
  --benchmark N   runs the whole pipeline N times (after one warm-up run) and prints
              the median, minimum and maximum latency of each stage: pre-process
              (decode + letterbox), network, NMS (+ boxes to the image)
Outputs are written only when everything succeeded (temporary file, then rename);
an output never replaces an input. Exit status 0 on success, 1 with a message on stderr.
)";
}

DetectArgs parse_args(const std::vector<std::string>& args) {
  DetectArgs r;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      r.help = true;
      return r;
    }
    if (a == "--agnostic") {
      r.agnostic = true;
      continue;
    }
    if (a.rfind("--", 0) != 0) throw config_error("orepa-detect: unexpected argument '" + a + "' (see --help)");
    if (i + 1 >= args.size()) throw config_error("orepa-detect: " + a + " needs a value");
    const std::string& v = args[++i];
    if (a == "--model") r.model = v;
    else if (a == "--weights") r.weights = v;
    else if (a == "--image") r.image = v;
    else if (a == "--output-json") r.json_out = v;
    else if (a == "--output-image") r.image_out = v;
    else if (a == "--names") r.names = v;
    else if (a == "--calibration") r.calibration = v;
    else if (a == "--precision") r.precision = parse_precision(v);
    else if (a == "--img-size") r.img_size = tools::parse_int(a, v, 32, 8192);
    else if (a == "--conf") r.conf = tools::parse_real(a, v, 0, 1);
    else if (a == "--iou") r.iou = tools::parse_real(a, v, 0, 1);
    else if (a == "--max-det") r.max_det = tools::parse_int(a, v, 1, 1 << 20);
    else if (a == "--benchmark") r.benchmark = tools::parse_int(a, v, 1, 100000);
    else throw config_error("orepa-detect: unknown option '" + a + "' (see --help)");
  }
  for (auto [flag, value] : {std::pair{"--model", &r.model}, {"--weights", &r.weights}, {"--image", &r.image}})
    if (value->empty()) throw config_error(std::string("orepa-detect: ") + flag + " is required (see --help)");
  if (!r.image_out.empty()) {
    std::string ext = fs::path(r.image_out).extension().string();
    std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return char(std::tolower(c)); });
    if (ext != ".png" && ext != ".jpg" && ext != ".jpeg" && ext != ".bmp")
      throw config_error("--output-image " + r.image_out + ": the extension must be .png, .jpg, .jpeg or .bmp");
  }
  if (!r.json_out.empty() && r.json_out == r.image_out)
    throw config_error("--output-json and --output-image name the same file " + r.json_out);
  return r;
}

// Class names from --names (see usage()); config_error / format_error naming it.
std::vector<std::string> read_names(const std::string& spec, std::int64_t nc) {
  YAML::Node doc;
  try {
    doc = spec.front() == '[' || spec.front() == '{' ? YAML::Load(spec) : YAML::LoadFile(spec);
  } catch (const YAML::Exception& e) {
    throw format_error("--names " + spec + ": cannot be read as yaml (" + e.what() + ")");
  }
  try {
    if (doc.IsMap() && doc["names"]) doc = doc["names"];
    std::vector<std::string> names;
    if (doc.IsSequence()) {
      for (const auto& n : doc) names.push_back(n.as<std::string>());
    } else if (doc.IsMap()) {
      std::map<long long, std::string> by_id;
      for (const auto& kv : doc) by_id[kv.first.as<long long>()] = kv.second.as<std::string>();
      for (const auto& [id, name] : by_id) {
        if (id != std::int64_t(names.size()))
          throw config_error(detail::cat("--names ", spec, ": a map needs the keys 0 .. ", by_id.size() - 1, ", got ", id));
        names.push_back(name);
      }
    } else {
      throw config_error("--names " + spec + ": expected a list of names, a map 0: name, or a data yaml with `names`");
    }
    if (std::int64_t(names.size()) != nc)
      throw config_error(detail::cat("--names ", spec, ": ", names.size(), " names, but the model has ", nc, " classes"));
    return names;
  } catch (const YAML::Exception& e) {
    throw format_error("--names " + spec + ": " + e.what());
  }
}

// The image as [3, H, W] in [0, 1]; format_error naming the file for an empty, oversized
// or undecodable one (truncated, another format).
Tensor<float> read_input_image(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) throw format_error(path + ": not a regular file (--image)");
  if (fs::file_size(path, ec) == 0) throw format_error(path + ": empty file (0 bytes), not an image");
  const yolo::ImageSize s = yolo::read_image_size(path);
  if (std::int64_t(s.width) * s.height > (std::int64_t(1) << 28))
    throw format_error(detail::cat(path, ": ", s.width, "x", s.height, " pixels is more than orepa-detect reads (2^28)"));
  return yolo::read_image(path, 3);
}

struct Detection {
  Tensor<float> image;               // the decoded image [3, H, W]
  yolo::LetterboxGeometry geometry;  // where it sits in the network's input
  yolo::Detections<float> found;     // rows x1, y1, x2, y2 (image pixels), confidence, class
  double ms[3] = {0, 0, 0};          // pre-process, network, NMS
};

Detection detect(const DetectArgs& a, const yolo::DeployedModel<float>& net, std::int64_t stride) {
  using clock = std::chrono::steady_clock;
  const auto ms = [](clock::time_point a, clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
  Detection d;
  const auto t0 = clock::now();
  d.image = read_input_image(a.image);
  const auto lb = yolo::letterbox<float>(d.image, yolo::LetterboxOptions(a.img_size).stride(stride));
  d.geometry = lb.geometry;
  const Tensor<float> x = lb.image.reshaped({1, 3, lb.image.size(1), lb.image.size(2)});
  const auto t1 = clock::now();
  const Tensor<float> pred = net.predict(x);
  const auto t2 = clock::now();
  const auto nms_opts = yolo::NmsOptions().conf_thres(a.conf).iou_thres(a.iou).max_det(a.max_det).agnostic(a.agnostic);
  d.found = std::move(yolo::non_max_suppression<float>(pred, nms_opts)[0]);
  yolo::scale_boxes<float>(d.found.rows, d.geometry);
  const auto t3 = clock::now();
  d.ms[0] = ms(t0, t1), d.ms[1] = ms(t1, t2), d.ms[2] = ms(t2, t3);
  return d;
}

std::string label_of(const std::vector<std::string>& names, std::int64_t cls, float conf) {
  char c[16];
  std::snprintf(c, sizeof c, " %.2f", double(conf));
  return (names.empty() ? std::to_string(cls) : names[std::size_t(cls)]) + c;
}

// Writes `path` through `write(temporary path)` and a rename, so a failure leaves no file.
template <class Write>
std::string write_temporary(const std::string& path, Write&& write) {
  const fs::path p(path);
  const fs::path tmp = p.parent_path() / (".orepa-detect-" + std::to_string(::getpid()) + "-" + p.filename().string());
  try {
    write(tmp.string());
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  }
  return tmp.string();
}

void print_benchmark(const DetectArgs& a, const Detection& d, std::vector<std::array<double, 3>> runs) {
  std::printf("orepa-detect --benchmark: %zu runs (after 1 warm-up) of %s (%lldx%lld) at %lldx%lld, %s, %d thread(s), "
              "oneDNN ISA %s\n",
              runs.size(), a.image.c_str(), (long long)d.geometry.src_width, (long long)d.geometry.src_height,
              (long long)d.geometry.width, (long long)d.geometry.height, precision_name(a.precision), max_range_threads(),
              engine::cpu_isa_name().c_str());
  std::printf("%-36s %10s %10s %10s\n", "stage", "median ms", "min ms", "max ms");
  const char* names[4] = {"pre-process (decode + letterbox)", "network", "NMS (+ boxes to the image)", "total"};
  for (int s = 0; s < 4; ++s) {
    std::vector<double> v;
    for (const auto& r : runs) v.push_back(s < 3 ? r[std::size_t(s)] : r[0] + r[1] + r[2]);
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    const double median = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
    std::printf("%-36s %10.2f %10.2f %10.2f\n", names[s], median, v.front(), v.back());
  }
}

}  // namespace

int orepa::tools::detect_main(int argc, char** argv) try {
  const DetectArgs a = parse_args({argv + 1, argv + argc});
  if (a.help) {
    std::fputs(usage(), stdout);
    return 0;
  }
  const std::vector<std::pair<std::string, std::string>> inputs = {{"--model", a.model}, {"--weights", a.weights},
                                                                   {"--image", a.image}, {"--names", a.names},
                                                                   {"--calibration", a.calibration}};
  // The files to replace (a symbolic link's target: the link stays).
  const std::string json_target = a.json_out.empty() ? "" : tools::check_output_path(a.json_out, "--output-json", inputs);
  const std::string image_target = a.image_out.empty() ? "" : tools::check_output_path(a.image_out, "--output-image", inputs);

  const auto cfg = yolo::read_model_config(a.model);
  const auto model = tools::load_weights(cfg, io::SafetensorsFile::open(a.weights));
  const std::vector<std::string> names = a.names.empty() ? std::vector<std::string>{} : read_names(a.names, model.classes());
  const auto stride = std::int64_t(*std::max_element(model.strides().begin(), model.strides().end()));
  DetectArgs run = a;
  if (run.img_size % stride) {
    run.img_size = (run.img_size / stride + 1) * stride;
    std::fprintf(stderr, "orepa-detect: --img-size %lld is not a multiple of the stride %lld; using %lld\n",
                 (long long)a.img_size, (long long)stride, (long long)run.img_size);
  }
  const yolo::DeployedModel<float> net = tools::deploy_model(model, a.precision, a.calibration);

  Detection d = detect(run, net, stride);
  if (a.benchmark > 0) {
    std::vector<std::array<double, 3>> runs;
    for (std::int64_t i = 0; i < a.benchmark; ++i) {
      d = detect(run, net, stride);
      runs.push_back({d.ms[0], d.ms[1], d.ms[2]});
    }
    print_benchmark(run, d, runs);
  }

  // Summary, e.g. "shapes.png: 200x150 at 640x480, 3 detection(s): 2 circle, 1 square (network 4.1 ms)".
  std::map<std::int64_t, int> per_class;
  for (std::int64_t k = 0; k < d.found.size(); ++k) ++per_class[std::int64_t(d.found.rows(k, 5))];
  std::string counts;
  for (const auto& [c, n] : per_class)
    counts += (counts.empty() ? ": " : ", ") + std::to_string(n) + " " + (names.empty() ? "class " + std::to_string(c) : names[std::size_t(c)]);
  std::printf("%s: %lldx%lld at %lldx%lld, %lld detection(s)%s (%s network %.1f ms)\n", a.image.c_str(),
              (long long)d.geometry.src_width, (long long)d.geometry.src_height, (long long)d.geometry.width,
              (long long)d.geometry.height, (long long)d.found.size(), counts.c_str(), precision_name(a.precision), d.ms[1]);

  // Both outputs go to temporary files first; only then are they renamed into place.
  std::vector<std::pair<std::string, std::string>> renames;  // temporary -> final
  try {
    if (!a.json_out.empty()) {
      nlohmann::ordered_json j;
      j["image"] = a.image;
      j["width"] = d.geometry.src_width;
      j["height"] = d.geometry.src_height;
      j["model"] = a.model;
      j["weights"] = a.weights;
      j["precision"] = precision_name(a.precision);
      j["input_size"] = {d.geometry.height, d.geometry.width};
      j["conf_thres"] = a.conf;
      j["iou_thres"] = a.iou;
      j["max_det"] = a.max_det;
      j["detections"] = nlohmann::ordered_json::array();
      for (std::int64_t k = 0; k < d.found.size(); ++k) {
        nlohmann::ordered_json det;
        const auto cls = std::int64_t(d.found.rows(k, 5));
        det["class"] = cls;
        if (!names.empty()) det["name"] = names[std::size_t(cls)];
        det["confidence"] = d.found.rows(k, 4);
        det["box"] = {d.found.rows(k, 0), d.found.rows(k, 1), d.found.rows(k, 2), d.found.rows(k, 3)};
        j["detections"].push_back(std::move(det));
      }
      renames.emplace_back(write_temporary(json_target, [&](const std::string& tmp) {
                             std::ofstream f(tmp, std::ios::binary);
                             f << j.dump(2) << "\n";
                             if (!f.flush()) throw format_error(a.json_out + ": cannot write");
                           }),
                           json_target);
    }
    if (!a.image_out.empty()) {
      Tensor<float> picture = d.image;
      const std::int64_t H = picture.size(1), W = picture.size(2);
      const int lw = std::max(int(std::nearbyint(double(H + W) / 2 * 0.003)), 2);  // YOLOv5's Annotator line width
      for (std::int64_t k = d.found.size(); k-- > 0;) {  // the most confident drawn last, on top
        const auto cls = std::int64_t(d.found.rows(k, 5));
        yolo::draw_labeled_box(picture, d.found.rows(k, 0), d.found.rows(k, 1), d.found.rows(k, 2), d.found.rows(k, 3),
                               label_of(names, cls, d.found.rows(k, 4)), yolo::palette_color(int(cls)), lw,
                               std::max(1, lw / 2));
      }
      renames.emplace_back(write_temporary(image_target, [&](const std::string& tmp) { yolo::write_image(tmp, picture); }),
                           image_target);
    }
    for (const auto& [tmp, final_path] : renames) fs::rename(tmp, final_path);
  } catch (...) {
    std::error_code ec;
    for (const auto& [tmp, final_path] : renames) fs::remove(tmp, ec);
    throw;
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "orepa-detect: error: %s\n", e.what());
  return 1;
}
