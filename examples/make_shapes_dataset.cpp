// make_shapes_dataset: writes the synthetic shapes detection set (circles, squares,
// triangles on textured noisy backgrounds) in YOLO format, with its data.yaml, and can
// time reading it back through the training loader.
//
//   make_shapes_dataset --out shapes --train 1000 --val 200 --seed 1
//   make_shapes_dataset --out shapes --train 1000 --format jpg --overwrite --bench-load
#include <orepa/yolo/dataset.hpp>
#include <orepa/yolo/synthetic_data.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

namespace {

const char* usage() {
  return R"(usage: make_shapes_dataset --out DIR [--train N] [--val N] [--size S] [--seed N]
                           [--min-objects N] [--max-objects N] [--min-size PX] [--max-size PX]
                           [--noise A] [--any-colors] [--format png|jpg|bmp] [--quality Q]
                           [--threads N] [--overwrite] [--bench-load]

Writes DIR/images/{train,val}, DIR/labels/{train,val} and DIR/data.yaml (classes circle,
square, triangle). Defaults: 512 train and 128 val images of 256x256, 1-4 objects of
16-120 px, noise 0.04, hue bands by class, png, seed 0, one thread per core.
  --any-colors  any hue for any class (harder: shape alone tells the class)
  --overwrite   replace the images/, labels/ and data.yaml already in DIR
  --bench-load  then read the train split through the loader (batches of 16, one worker)
                and print images per second: one epoch without augmentation, two with it
                (the second from the data set's memory cache)
Exit status 0 on success, 1 with a message on stderr on any error.
)";
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Value of flag `name` at args[i + 1], as a number in [lo, hi]; exits with status 2 otherwise.
double number(int argc, char** argv, int& i, double lo, double hi) {
  const std::string flag = argv[i];
  if (i + 1 >= argc) {
    std::fprintf(stderr, "make_shapes_dataset: %s needs a value\n", flag.c_str());
    std::exit(2);
  }
  const std::string v = argv[++i];
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !(x >= lo && x <= hi)) {
    std::fprintf(stderr, "make_shapes_dataset: %s: expected a number in [%g, %g], got '%s'\n", flag.c_str(), lo, hi,
                 v.c_str());
    std::exit(2);
  }
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace orepa::yolo;
  ShapesOptions o;
  std::string out;
  bool bench = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(usage(), stdout);
      return 0;
    } else if (a == "--out" && i + 1 < argc) {
      out = argv[++i];
    } else if (a == "--train") {
      o.train_images(int(number(argc, argv, i, 0, 1e7)));
    } else if (a == "--val") {
      o.val_images(int(number(argc, argv, i, 0, 1e7)));
    } else if (a == "--size") {
      o.image_size(int(number(argc, argv, i, 16, 8192)));
    } else if (a == "--seed") {
      o.seed(std::uint64_t(number(argc, argv, i, 0, 9e15)));
    } else if (a == "--min-objects") {
      o.min_objects(int(number(argc, argv, i, 0, 1000)));
    } else if (a == "--max-objects") {
      o.max_objects(int(number(argc, argv, i, 0, 1000)));
    } else if (a == "--min-size") {
      o.min_size(int(number(argc, argv, i, 4, 8192)));
    } else if (a == "--max-size") {
      o.max_size(int(number(argc, argv, i, 4, 8192)));
    } else if (a == "--noise") {
      o.noise(number(argc, argv, i, 0, 0.5));
    } else if (a == "--quality") {
      o.jpeg_quality(int(number(argc, argv, i, 1, 100)));
    } else if (a == "--threads") {
      o.threads(int(number(argc, argv, i, 0, 1024)));
    } else if (a == "--format" && i + 1 < argc) {
      o.format(argv[++i]);
    } else if (a == "--any-colors") {
      o.class_colors(false);
    } else if (a == "--overwrite") {
      o.overwrite(true);
    } else if (a == "--bench-load") {
      bench = true;
    } else {
      std::fprintf(stderr, "make_shapes_dataset: unknown or incomplete argument '%s'\n%s", a.c_str(), usage());
      return 2;
    }
  }
  if (out.empty()) {
    std::fprintf(stderr, "make_shapes_dataset: --out DIR is required\n%s", usage());
    return 2;
  }
  try {
    const auto t0 = std::chrono::steady_clock::now();
    const ShapesDatasetInfo info = write_shapes_dataset(out, o);
    const double dt = seconds_since(t0), n = double(info.train_images + info.val_images);
    std::printf("wrote %lld train + %lld val images (%lld boxes) of %dx%d %s to %s in %.2f s (%.0f images/s)\n",
                static_cast<long long>(info.train_images), static_cast<long long>(info.val_images),
                static_cast<long long>(info.boxes), o.image_size(), o.image_size(), o.format().c_str(),
                info.root.c_str(), dt, n / dt);
    std::printf("data yaml: %s\n", info.yaml.c_str());
    if (bench && info.train_images > 0) {
      auto train = YoloDataset::from_config(read_data_config(info.yaml), "train");
      for (bool augment : {false, true}) {
        const auto lo = LoaderOptions().image_size(o.image_size()).batch_size(16).augment(augment).seed(o.seed());
        DataLoader loader(train, lo);
        for (int epoch = 0; epoch < (augment ? 2 : 1); ++epoch) {  // epoch 1: from the memory cache
          const auto t1 = std::chrono::steady_clock::now();
          std::int64_t images = 0;
          for (std::int64_t b = 0; b < loader.batches_per_epoch(); ++b) images += loader.next().images.size(0);
          std::printf("loader, augment %s%s: %.0f images/s (one worker, batches of 16)\n", augment ? "on" : "off",
                      epoch ? ", cached images" : "", double(images) / seconds_since(t1));
        }
        train.cache_images();  // the augmented loader's copy shares it
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make_shapes_dataset: %s\n", e.what());
    return 1;
  }
  return 0;
}
