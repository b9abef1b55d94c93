// safetensors reader/writer: round trips of every written dtype, the committed fixture,
// one test per kind of corrupted file (each must be a format_error naming the culprit),
// and the atomic write.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "orepa/core/random.hpp"
#include "orepa/io/safetensors.hpp"

using namespace orepa;
using namespace orepa::io;
namespace fs = std::filesystem;

namespace {

using Bytes = std::vector<unsigned char>;

/// A file from a literal JSON header and `data` bytes; `n` overrides the header length.
Bytes make_file(const std::string& header, const Bytes& data = {}, std::uint64_t n = ~std::uint64_t(0)) {
  if (n == ~std::uint64_t(0)) n = header.size();
  Bytes b;
  for (int i = 0; i < 8; ++i) b.push_back(static_cast<unsigned char>(n >> (8 * i)));
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

/// Asserts that parsing `bytes` throws format_error whose message contains every needle.
void expect_format_error(const Bytes& bytes, const std::vector<std::string>& needles) {
  try {
    SafetensorsFile::from_bytes(bytes, "bad.safetensors");
    ADD_FAILURE() << "no exception; expected a format_error mentioning " << needles.at(0);
  } catch (const format_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("bad.safetensors"), std::string::npos) << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
  }
}

std::string fixture(const std::string& name) { return std::string(OREPA_TEST_DATA_DIR) + "/" + name; }

Bytes read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

std::uint16_t u16_at(const TensorEntry& e, std::size_t i) {
  return static_cast<std::uint16_t>(e.data[2 * i] | (e.data[2 * i + 1] << 8));
}

/// A fresh private folder per test, removed afterwards.
class SafetensorsFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "orepa_st_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::vector<std::string> tmp_leftovers() const {
    std::vector<std::string> r;
    for (const auto& e : fs::directory_iterator(dir_))
      if (e.path().filename().string().find(".tmp") != std::string::npos) r.push_back(e.path().string());
    return r;
  }
  fs::path dir_;
};

}  // namespace

TEST(Safetensors, DTypeNames) {
  for (DType d : {DType::F32, DType::F64, DType::F16, DType::BF16, DType::I64, DType::U8, DType::BOOL})
    EXPECT_EQ(parse_dtype(to_string(d), "t"), d);
  EXPECT_EQ(dtype_size(DType::F32), 4u);
  EXPECT_EQ(dtype_size(DType::F64), 8u);
  EXPECT_EQ(dtype_size(DType::F16), 2u);
  EXPECT_EQ(dtype_size(DType::BF16), 2u);
  EXPECT_EQ(dtype_size(DType::I64), 8u);
  try {
    parse_dtype("Q7", "conv.weight");
    FAIL();
  } catch (const format_error& e) {
    EXPECT_NE(std::string(e.what()).find("conv.weight"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("Q7"), std::string::npos);
  }
}

TEST(Safetensors, RoundTripF32F64Exact) {
  Tensor<double> d({2, 3}, std::vector<double>{0.1, -2.5, 1e300, -0.0, 3.0, 1.0 / 3.0});
  Tensor<float> f({3}, std::vector<float>{0.1f, -1e-40f /* subnormal */, 3.4e38f});
  SafetensorsWriter w;
  w.add("d", d, DType::F64);
  w.add("f", f);  // F32 by default
  w.add("d_as_f32", d.reshaped({6}).cast<float>(), DType::F32);
  auto r = SafetensorsFile::from_bytes(w.to_bytes());
  EXPECT_EQ(r.names(), (std::vector<std::string>{"d", "f", "d_as_f32"}));  // header order = add order
  EXPECT_EQ(r.entry("d").dtype, DType::F64);
  auto d2 = r.get<double>("d");
  EXPECT_EQ(d2.sizes(), d.sizes());
  for (std::int64_t i = 0; i < d.numel(); ++i) EXPECT_EQ(d2[i], d[i]) << i;
  EXPECT_TRUE(std::signbit(d2[3]));
  auto f2 = r.get<float>("f");
  for (std::int64_t i = 0; i < f.numel(); ++i) EXPECT_EQ(f2[i], f[i]) << i;
  auto f3 = r.get<double>("d_as_f32");
  EXPECT_EQ(f3[0], double(0.1f));
}

// The issue's case: a channels-last [1, 2, 2, 2] tensor holding 0..7 at logical (NCHW)
// positions. Its storage (NHWC) is 0 4 1 5 2 6 3 7; the file must hold 0..7.
TEST(Safetensors, ChannelsLastTensorIsWrittenInLogicalOrder) {
  Tensor<float> t({1, 2, 2, 2}, MemoryFormat::channels_last);
  for (std::int64_t c = 0; c < 2; ++c)
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t w = 0; w < 2; ++w) t(0, c, h, w) = float(c * 4 + h * 2 + w);
  const std::vector<float> storage(t.begin(), t.end());
  ASSERT_EQ(storage, (std::vector<float>{0, 4, 1, 5, 2, 6, 3, 7}));  // what used to be written
  SafetensorsWriter w;
  w.add("t", t);
  const Tensor<float> back = SafetensorsFile::from_bytes(w.to_bytes()).get<float>("t");
  EXPECT_EQ(back.sizes(), (Shape{1, 2, 2, 2}));
  EXPECT_EQ(std::vector<float>(back.begin(), back.end()), (std::vector<float>{0, 1, 2, 3, 4, 5, 6, 7}));
}

namespace {

// Storage index of row-major (logical) element `i` of a tensor of shape `s` held in
// `format`, written out here from the definition of NHWC (independent of offset4).
std::int64_t storage_of(const Shape& s, MemoryFormat format, std::int64_t i) {
  if (format == MemoryFormat::contiguous) return i;
  const std::int64_t C = s[1], H = s[2], W = s[3];
  const std::int64_t n = i / (C * H * W), c = i / (H * W) % C, h = i / W % H, w = i % W;
  return ((n * H + h) * W + w) * C + c;
}

// Writes a tensor of `shape` in `format` through holder 0 (Tensor), 1 (TensorView) or 2
// (ConstTensorView) as `dtype`, reads it back, and checks every element at its logical
// index. Values are distinct small integers (exact in every dtype, BF16's 8 bits included).
template <class S>
void check_round_trip(const Shape& shape, MemoryFormat format, int holder, DType dtype, Rng& rng) {
  std::int64_t numel = 1;
  for (auto d : shape) numel *= d;
  const std::int64_t offset = std::int64_t(rng.below(64));
  auto value = [&](std::int64_t i) { return S((i + offset) % 256 - 128); };  // logical element i
  std::vector<S> storage(static_cast<std::size_t>(numel));
  for (std::int64_t i = 0; i < numel; ++i) storage[std::size_t(storage_of(shape, format, i))] = value(i);
  SafetensorsWriter w;
  if (holder == 0) {
    Tensor<S> owned(shape, format);
    std::copy(storage.begin(), storage.end(), owned.data());
    w.add("x", owned, dtype);
  } else if (holder == 1) {
    w.add("x", view(storage.data(), shape, format), dtype);
  } else {
    w.add("x", ConstTensorView<S>(storage.data(), shape, format), dtype);
  }
  const auto f = SafetensorsFile::from_bytes(w.to_bytes());
  ASSERT_EQ(f.entry("x").shape, shape);
  ASSERT_EQ(f.entry("x").dtype, dtype);
  const Tensor<double> back = f.get<double>("x");
  for (std::int64_t i = 0; i < numel; ++i)
    ASSERT_EQ(back[i], double(value(i))) << "logical index " << i << " of " << shape_str(shape);
}

}  // namespace

// Property: every holder (Tensor, TensorView, ConstTensorView), memory format, scalar and
// dtype writes the logical row-major order, for random shapes (zero extents included).
TEST(Safetensors, EveryTensorKindRoundTripsByLogicalIndex) {
  Rng rng(22);
  for (int trial = 0; trial < 40; ++trial) {
    Shape four{std::int64_t(rng.below(4)), std::int64_t(rng.below(6)), std::int64_t(rng.below(5)),
               std::int64_t(rng.below(7))};
    if (trial % 4 == 0) four = {1 + std::int64_t(rng.below(3)), 1 + std::int64_t(rng.below(5)),
                                1 + std::int64_t(rng.below(4)), 1 + std::int64_t(rng.below(4))};
    Shape other(rng.below(4), 0);  // ranks 0..3 (contiguous only)
    for (auto& d : other) d = std::int64_t(rng.below(5));
    for (int holder = 0; holder < 3; ++holder)
      for (DType dtype : {DType::F32, DType::F64, DType::F16, DType::BF16}) {
        SCOPED_TRACE(::testing::Message() << "holder " << holder << ", " << to_string(dtype));
        for (MemoryFormat format : {MemoryFormat::contiguous, MemoryFormat::channels_last}) {
          check_round_trip<float>(four, format, holder, dtype, rng);
          check_round_trip<double>(four, format, holder, dtype, rng);
        }
        check_round_trip<float>(other, MemoryFormat::contiguous, holder, dtype, rng);
      }
  }
}

TEST(Safetensors, RoundTripF16KnownValues) {
  const double inf = std::numeric_limits<double>::infinity();
  // value written -> exact value read back (IEEE half, round to nearest even).
  const std::vector<std::pair<double, double>> cases = {
      {0.0, 0.0}, {1.0, 1.0}, {-2.0, -2.0}, {0.5, 0.5}, {65504.0, 65504.0},  // max finite
      {std::ldexp(1.0, -14), std::ldexp(1.0, -14)},                             // min normal
      {std::ldexp(1.0, -24), std::ldexp(1.0, -24)},                             // min subnormal
      {std::ldexp(3.0, -24), std::ldexp(3.0, -24)},                             // subnormal
      {0.1, 0.0999755859375}, {2049.0, 2048.0} /* tie -> even */, {2051.0, 2052.0},
      {std::ldexp(1.0, -25), 0.0} /* tie -> 0 */, {std::ldexp(3.0, -25), std::ldexp(1.0, -23)},
      {65519.0, 65504.0}, {65520.0, inf} /* rounds past max */, {1e6, inf}, {-inf, -inf}, {inf, inf}};
  std::vector<double> in;
  for (auto& c : cases) in.push_back(c.first);
  in.push_back(std::nan(""));
  SafetensorsWriter w;
  w.add("h", Tensor<double>({std::int64_t(in.size())}, in), DType::F16);
  auto r = SafetensorsFile::from_bytes(w.to_bytes());
  auto t = r.get<double>("h");
  for (std::size_t i = 0; i < cases.size(); ++i) EXPECT_EQ(t[std::int64_t(i)], cases[i].second) << cases[i].first;
  EXPECT_TRUE(std::isnan(t[std::int64_t(cases.size())]));
  const auto& e = r.entry("h");
  EXPECT_EQ(e.nbytes, 2 * in.size());
  EXPECT_EQ(u16_at(e, 1), 0x3C00);  // 1.0
  EXPECT_EQ(u16_at(e, 4), 0x7BFF);  // 65504
  EXPECT_EQ(u16_at(e, 6), 0x0001);  // 2^-24
  EXPECT_EQ(u16_at(e, 17), 0x7C00);  // +inf
  EXPECT_EQ(u16_at(e, cases.size()) & 0x7C00, 0x7C00);  // NaN: exponent all ones...
  EXPECT_NE(u16_at(e, cases.size()) & 0x03FF, 0);       // ...and a non-zero mantissa
  // Random values in [-4, 4]: relative error at most 2^-11 (10 stored mantissa bits).
  std::vector<float> vals;
  for (int i = 0; i < 1000; ++i) vals.push_back(float(std::sin(i * 1.7) * 4.0));
  SafetensorsWriter w2;
  w2.add("v", Tensor<float>({10, 100}, vals), DType::F16);
  auto v = SafetensorsFile::from_bytes(w2.to_bytes()).get<float>("v");
  for (int i = 0; i < 1000; ++i) EXPECT_LE(std::fabs(v[i] - vals[i]), std::fabs(vals[i]) * std::ldexp(1.0, -11) + 1e-7);
}

TEST(Safetensors, RoundTripBF16KnownValues) {
  const std::vector<std::pair<double, double>> cases = {
      {1.0, 1.0}, {-3.140625, -3.140625}, {3.14159265358979, 3.140625},
      {1.0 + std::ldexp(1.0, -8), 1.0} /* tie -> even */,
      {1.0 + 3 * std::ldexp(1.0, -8), 1.0 + std::ldexp(1.0, -6)} /* tie -> even */,
      // Just above a tie: rounding via float first would give 1.0 (double rounding).
      {1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40), 1.0 + std::ldexp(1.0, -7)},
      {std::ldexp(1.0, -133), std::ldexp(1.0, -133)} /* min subnormal */, {1e39, HUGE_VAL}};
  std::vector<double> in;
  for (auto& c : cases) in.push_back(c.first);
  SafetensorsWriter w;
  w.add("b", Tensor<double>({std::int64_t(in.size())}, in), DType::BF16);
  auto r = SafetensorsFile::from_bytes(w.to_bytes());
  auto t = r.get<double>("b");
  for (std::size_t i = 0; i < cases.size(); ++i) EXPECT_EQ(t[std::int64_t(i)], cases[i].second) << i;
  EXPECT_EQ(u16_at(r.entry("b"), 0), 0x3F80);
  // Random values: relative error at most 2^-8 (7 stored mantissa bits).
  std::vector<double> vals;
  for (int i = 0; i < 1000; ++i) vals.push_back(std::cos(i * 0.37) * 100.0);
  SafetensorsWriter w2;
  w2.add("v", Tensor<double>({1000}, vals), DType::BF16);
  auto v = SafetensorsFile::from_bytes(w2.to_bytes()).get<double>("v");
  for (int i = 0; i < 1000; ++i) EXPECT_LE(std::fabs(v[i] - vals[i]), std::fabs(vals[i]) * std::ldexp(1.0, -8)) << i;
}

TEST(Safetensors, Int64ScalarMetadataEmptyAndRank0) {
  SafetensorsWriter w;
  w.add_int64("bn.num_batches_tracked", {}, {1234567890123LL});
  w.add_int64("ints", {3}, {-1, 0, std::numeric_limits<std::int64_t>::max()});
  w.add("empty", Tensor<float>({0, 3}), DType::F32);
  w.add("scalar", Tensor<double>(Shape{}, 2.5), DType::F64);
  w.add("empty16", Tensor<float>({4, 0}), DType::F16);
  w.set_metadata({{"format", "pt"}, {"note", "héllo \"quoted\""}});
  const Bytes bytes = w.to_bytes();
  const std::uint64_t n = bytes[0] | (std::uint64_t(bytes[1]) << 8);
  EXPECT_EQ(n % 8, 0u);  // header padded so the data is 8-aligned
  auto r = SafetensorsFile::from_bytes(bytes);
  EXPECT_EQ(r.metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"note", "héllo \"quoted\""}}));
  const auto& e = r.entry("bn.num_batches_tracked");
  EXPECT_EQ(e.dtype, DType::I64);
  EXPECT_TRUE(e.shape.empty());
  EXPECT_EQ(e.nbytes, 8u);
  EXPECT_EQ(r.get_int("bn.num_batches_tracked"), 1234567890123LL);
  EXPECT_EQ(r.get<double>("bn.num_batches_tracked")[0], 1234567890123.0);
  auto ints = r.get<double>("ints");
  EXPECT_EQ(ints[0], -1.0);
  EXPECT_THROW(r.get_int("ints"), format_error);  // not a single element
  auto empty = r.get<float>("empty");
  EXPECT_EQ(empty.sizes(), (Shape{0, 3}));
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_EQ(r.entry("empty").nbytes, 0u);
  EXPECT_EQ(r.get<float>("empty16").sizes(), (Shape{4, 0}));
  auto s = r.get<float>("scalar");
  EXPECT_EQ(s.dim(), 0);
  EXPECT_EQ(s.numel(), 1);
  EXPECT_EQ(s[0], 2.5f);
  EXPECT_THROW(r.get_int("scalar"), format_error);  // 2.5 is not an integer
}

TEST(Safetensors, GetIntRules) {
  SafetensorsWriter w;
  w.add("three", Tensor<float>(Shape{}, 3.0f));
  w.add("half", Tensor<float>(Shape{}, 2.5f));
  auto r = SafetensorsFile::from_bytes(w.to_bytes());
  EXPECT_EQ(r.get_int("three"), 3);
  EXPECT_THROW(r.get_int("half"), format_error);
}

TEST(Safetensors, LookupErrorsAndWriterErrors) {
  SafetensorsWriter w;
  w.add("a", Tensor<float>({2}));
  EXPECT_THROW(w.add("a", Tensor<float>({2})), config_error);
  EXPECT_THROW(w.add_int64("a", {}, {1}), config_error);
  EXPECT_THROW(w.add("__metadata__", Tensor<float>({2})), config_error);
  EXPECT_THROW(w.add("i", Tensor<float>({2}), DType::I64), config_error);
  EXPECT_THROW(w.add_int64("n", {2}, {1}), shape_error);
  auto r = SafetensorsFile::from_bytes(w.to_bytes(), "mem.st");
  EXPECT_TRUE(r.contains("a"));
  EXPECT_FALSE(r.contains("b"));
  try {
    r.entry("b");
    FAIL();
  } catch (const format_error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("mem.st"), std::string::npos) << m;
    EXPECT_NE(m.find("'b'"), std::string::npos) << m;
    EXPECT_NE(m.find("a"), std::string::npos) << m;  // lists what is there
  }
  EXPECT_THROW(r.get<double>("b"), format_error);
}

TEST(Safetensors, MoveKeepsEntriesValid) {
  SafetensorsWriter w;
  w.add("x", Tensor<float>({3}, std::vector<float>{1, 2, 3}));
  auto a = SafetensorsFile::from_bytes(w.to_bytes());
  SafetensorsFile b = std::move(a);
  auto c = SafetensorsFile::open(fixture("orepa_k3_basic.safetensors"));
  c = std::move(b);
  EXPECT_EQ(c.get<float>("x")[2], 3.0f);
}

// Values below were read with the independent stdlib-only Python reader
// /work/shared/tools/st_io.py (python3; float32 values printed as exact doubles).
TEST(Safetensors, ReadsCommittedFixture) {
  auto f = SafetensorsFile::open(fixture("orepa_k3_basic.safetensors"));
  EXPECT_EQ(f.label(), fixture("orepa_k3_basic.safetensors"));
  EXPECT_EQ(f.names().size(), 19u);
  EXPECT_EQ(f.names().front(), "weight_orepa_origin");  // header order
  EXPECT_EQ(f.metadata().at("format"), "pt");
  const auto& e = f.entry("weight_orepa_origin");
  EXPECT_EQ(e.dtype, DType::F32);
  EXPECT_EQ(e.shape, (Shape{16, 8, 3, 3}));
  auto w = f.get<float>("weight_orepa_origin");
  EXPECT_EQ(w[0], -0.26973995566368103f);
  EXPECT_EQ(w[1], -0.11503373831510544f);
  EXPECT_EQ(w(1, 2, 1, 2), 0.2482844740152359f);
  EXPECT_EQ(w[w.numel() - 1], 0.39841702580451965f);
  double sum = 0;
  for (float v : w) sum += v;  // same order and precision as the Python sum
  EXPECT_DOUBLE_EQ(sum, -5.104283211872826);
  auto g = f.get<double>("grad_output");
  EXPECT_EQ(g.sizes(), (Shape{2, 16, 10, 10}));
  sum = 0;
  for (double v : g) sum += v;
  EXPECT_DOUBLE_EQ(sum, -66.12176559737418);
  EXPECT_EQ(f.get<double>("bn.running_var")[15], double(1.9140431880950928f));
  EXPECT_EQ(f.get<float>("weight_orepa_avg_avg")[0], 0.1111111119389534f);
  const auto& nbt = f.entry("bn.num_batches_tracked");
  EXPECT_EQ(nbt.dtype, DType::I64);
  EXPECT_EQ(nbt.shape, Shape{});
  EXPECT_EQ(f.get_int("bn.num_batches_tracked"), 0);
}

TEST(Safetensors, PassThroughReproducesFixtureByteForByte) {
  const std::string path = fixture("orepa_k3_basic.safetensors");
  auto f = SafetensorsFile::open(path);
  SafetensorsWriter w;
  for (const auto& n : f.names()) w.add_raw(f.entry(n));
  w.set_metadata(f.metadata());
  EXPECT_EQ(w.to_bytes(), read_all(path));  // same compact JSON and padding as the Python writer
}

// ---- corrupted files: one test per kind of damage -------------------------------------

TEST(SafetensorsCorrupt, TooShortFile) {
  expect_format_error({1, 2, 3, 4, 5}, {"too short"});
  expect_format_error({}, {"too short"});
}

TEST(SafetensorsCorrupt, HeaderLength) {
  expect_format_error(make_file("{}", {}, 3), {"header length 3", "past the end"});
  expect_format_error(make_file("{}", {}, 200000000), {"header length 200000000", "exceeds"});
  expect_format_error(make_file("{}", {}, ~std::uint64_t(0) - 1), {"header length"});  // no 8+N wrap-around
}

TEST(SafetensorsCorrupt, TruncatedData) {
  Bytes b = read_all(fixture("orepa_k3_basic.safetensors"));
  ASSERT_GT(b.size(), 100u);
  b.resize(b.size() - 4);
  expect_format_error(b, {"grad_output", "out of range"});  // the last tensor's bytes are cut off
}

TEST(SafetensorsCorrupt, InvalidJson) {
  expect_format_error(make_file("{\"a\": {"), {"invalid JSON"});
  expect_format_error(make_file("{\"a\xff\": 1}"), {"invalid JSON"});  // invalid UTF-8
  expect_format_error(make_file("[1, 2]"), {"not a JSON object"});
  expect_format_error(make_file("{\"w\": 5}"), {"'w'", "not an object"});
}

// The header's JSON (orepa/io/json.hpp) against RFC 8259, case by case.
TEST(SafetensorsJson, GrammarCases) {
  const auto parse = [](const std::string& t) { return json::Parser::parse(t.data(), t.size()); };
  const auto rejects = [&](const std::string& t, const std::string& needle) {
    try {
      parse(t);
      ADD_FAILURE() << "accepted: " << t;
    } catch (const json::error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << t << " -> " << e.what();
    }
  };
  const json::Value v = parse(" {\"b\" : [1, -2.5e+3, 0, true, false, null, \"s\"], \"a\": {}}\r\n\t");
  ASSERT_TRUE(v.is_object());
  EXPECT_EQ(v.keys, (std::vector<std::string>{"b", "a"}));  // document order, not sorted
  ASSERT_EQ(v.items[0].items.size(), 7u);
  EXPECT_EQ(v.items[0].items[1].text, "-2.5e+3");
  EXPECT_EQ(v.items[0].items[3].kind, json::Value::Kind::boolean);
  EXPECT_EQ(v.items[0].items[5].kind, json::Value::Kind::null);
  EXPECT_EQ(v.dump(), R"({"b":[1,-2.5e+3,0,true,false,null,"s"],"a":{}})");
  // Counts: non-negative integers written as such, up to 2^64 - 1.
  EXPECT_EQ(parse("18446744073709551615").as_count(), std::optional<std::uint64_t>(UINT64_MAX));
  EXPECT_FALSE(parse("18446744073709551616").as_count());
  EXPECT_FALSE(parse("2.0").as_count());
  EXPECT_FALSE(parse("1e3").as_count());
  EXPECT_FALSE(parse("-0").as_count());
  EXPECT_EQ(parse("0").as_count(), std::optional<std::uint64_t>(0));
  // Escapes decode to UTF-8; a surrogate pair is one code point.
  EXPECT_EQ(parse(R"("\"\\\/\b\f\n\r\t\u00e9\u20AC\ud83d\ude00")").text,
            "\"\\/\b\f\n\r\t\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80");
  EXPECT_EQ(parse("\"\xc3\xa9\xf0\x9f\x98\x80\"").text, "\xc3\xa9\xf0\x9f\x98\x80");  // raw UTF-8 kept
  rejects("", "end of the text");
  rejects("{\"a\":1} x", "after the value");
  rejects("{\"a\" 1}", "expected ':'");
  rejects("{\"a\":1,}", "expected a string key");
  rejects("[1,]", "unexpected character ']'");
  rejects("[1 2]", "expected ']'");
  rejects("01", "after the value");
  rejects("-", "expected a digit");
  rejects("1.", "after '.'");
  rejects("1e", "exponent");
  rejects("tru", "unexpected character 't'");
  rejects("\"abc", "unterminated string");
  rejects("\"a\tb\"", "control character");
  rejects(R"("\x")", "invalid escape");
  rejects(R"("\u12g4")", "hex digit");
  rejects(R"("\ud83d")", "without its low half");
  rejects(R"("\ude00")", "lone low surrogate");
  rejects("\"\xc0\xaf\"", "UTF-8");      // overlong '/'
  rejects("\"\xed\xa0\x80\"", "UTF-8");  // a surrogate encoded as UTF-8
  rejects("\"\xf4\x90\x80\x80\"", "UTF-8");  // past U+10FFFF
  rejects("\"\xe2\x82\"", "UTF-8");      // truncated
  rejects(std::string(65, '[') + std::string(65, ']'), "nesting deeper than 64");
  EXPECT_NO_THROW(parse(std::string(64, '[') + std::string(64, ']')));
  rejects(R"({"a": {"b": 1, "b": 2}})", "duplicate key 'b' in 'a'");
  rejects(R"({"a": 1, "a": 2})", "duplicate key 'a' in the header");
  // The writer's escaping parses back to the same bytes.
  std::string all;
  for (int c = 1; c < 0x80; ++c) all += char(c);
  all += "\xc3\xa9\xf0\x9f\x98\x80";
  EXPECT_EQ(parse(json::quote(all)).text, all);
  EXPECT_EQ(json::quote("a\"\\\n\x01"), R"("a\"\\\n\u0001")");
  EXPECT_THROW(json::quote("bad\xff"), json::error);
}

TEST(SafetensorsCorrupt, MissingOrWrongFields) {
  expect_format_error(make_file(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", Bytes(4)), {"'w'", "dtype"});
  expect_format_error(make_file(R"({"w": {"dtype": 3, "shape": [1], "data_offsets": [0, 4]}})", Bytes(4)),
                      {"'w'", "dtype"});
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}})", Bytes(4)),
                      {"'w'", "shape"});
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [1]}})", Bytes(4)), {"'w'", "data_offsets"});
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}})", Bytes(4)),
                      {"'w'", "data_offsets"});
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}})", Bytes(4)),
                      {"'w'", "data_offsets"});
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 4]}})", Bytes(4)),
                      {"'w'", "data_offsets"});
}

TEST(SafetensorsCorrupt, DuplicateKey) {
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                                R"( "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                                Bytes(8)),
                      {"duplicate key 'w'"});
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "dtype": "F64", "shape": [1], "data_offsets": [0, 4]}})",
                                Bytes(4)),
                      {"duplicate key 'dtype'", "'w'"});
  expect_format_error(make_file(R"({"__metadata__": {"a": "1", "a": "2"}})"), {"duplicate key 'a'", "__metadata__"});
}

TEST(SafetensorsCorrupt, BadShapeEntries) {
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 0]}})"),
                      {"'w'", "shape", "-1"});
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 0]}})"),
                      {"'w'", "shape", "2.5"});
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}})", Bytes(8)),
                      {"'w'", "shape"});
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}})", Bytes(8)),
                      {"'w'", "shape"});
}

TEST(SafetensorsCorrupt, HugeShape) {
  // 2^64 elements (and 2^62 * 4 bytes) overflow 64 bits: rejected without allocating anything.
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})"),
                      {"'w'", "overflows"});
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 0]}})"),
                      {"'w'", "overflows"});
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [18446744073709551615], "data_offsets": [0, 0]}})"),
                      {"'w'", "shape"});
  expect_format_error(make_file(R"({"w": {"dtype": "F64", "shape": [1000000, 1000000], "data_offsets": [0, 8]}})",
                                Bytes(8)),
                      {"'w'", "needs 8000000000000 bytes"});
}

TEST(SafetensorsCorrupt, OffsetsEndBeforeBegin) {
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", Bytes(4)),
                      {"'w'", "end before begin"});
}

TEST(SafetensorsCorrupt, OffsetsOutOfRange) {
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", Bytes(4)),
                      {"'w'", "out of range"});
  expect_format_error(
      make_file(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [18446744073709551612, 18446744073709551616]}})",
                Bytes(4)),
      {"'w'", "data_offsets"});  // 2^64 does not fit: parsed as a float, rejected
}

TEST(SafetensorsCorrupt, OverlappingOffsets) {
  expect_format_error(make_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                                R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                                Bytes(12)),
                      {"'b' overlaps tensor 'a'"});
  expect_format_error(make_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                                R"( "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})",
                                Bytes(4)),
                      {"overlaps"});
}

TEST(SafetensorsCorrupt, HoleInData) {
  expect_format_error(make_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                                R"( "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
                                Bytes(12)),
                      {"'b'", "hole"});
  expect_format_error(make_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", Bytes(8)),
                      {"'a'", "hole"});  // must start at 0
  expect_format_error(make_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", Bytes(6)),
                      {"2 unused bytes", "'a'"});  // must end at the buffer end
  expect_format_error(make_file("{}", Bytes(3)), {"3 unused bytes"});
}

TEST(SafetensorsCorrupt, ByteCountMismatch) {
  expect_format_error(make_file(R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})", Bytes(12)),
                      {"'w'", "needs 16 bytes", "span 12"});
  expect_format_error(make_file(R"({"w": {"dtype": "I64", "shape": [], "data_offsets": [0, 4]}})", Bytes(4)),
                      {"'w'", "needs 8 bytes"});  // rank 0 is one element
}

TEST(SafetensorsCorrupt, UnknownDtype) {
  expect_format_error(make_file(R"({"conv.w": {"dtype": "F12", "shape": [1], "data_offsets": [0, 4]}})", Bytes(4)),
                      {"'conv.w'", "unknown dtype 'F12'"});
}

TEST(SafetensorsCorrupt, BadMetadata) {
  expect_format_error(make_file(R"({"__metadata__": {"format": 1}})"), {"__metadata__", "format"});
  expect_format_error(make_file(R"({"__metadata__": ["pt"]})"), {"__metadata__"});
  expect_format_error(make_file(R"({"__metadata__": {"a": {"b": "c"}}})"), {"__metadata__", "'a'"});
}

TEST(SafetensorsCorrupt, UnreadableDtypesAreRecognisedButRejectedOnGet) {
  auto r = SafetensorsFile::from_bytes(
      make_file(R"({"f8": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]},)"
                R"( "u8": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}})",
                Bytes{1, 2, 200, 7}),
      "x.st");
  EXPECT_EQ(r.entry("f8").dtype, DType::F8_E4M3);
  try {
    r.get<float>("f8");
    FAIL();
  } catch (const format_error& e) {
    EXPECT_NE(std::string(e.what()).find("'f8'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("F8_E4M3"), std::string::npos) << e.what();
  }
  EXPECT_EQ(r.get<double>("u8")[0], 200.0);
}

// Every truncation and every single-byte change of a small valid file is either accepted
// or a format_error: no crash, no other exception (run under ASan/UBSan to check reads).
TEST(SafetensorsCorrupt, TruncationsAndByteFlipsNeverCrash) {
  SafetensorsWriter w;
  w.add("a", Tensor<float>({2, 2}, 1.5f));
  w.add_int64("n", {}, {7});
  w.add("h", Tensor<float>({3}, 0.25f), DType::F16);
  w.set_metadata({{"k", "v"}});
  const Bytes good = w.to_bytes();
  int accepted = 0, rejected = 0;
  auto check = [&](const Bytes& b) {
    try {
      auto f = SafetensorsFile::from_bytes(b);
      for (const auto& n : f.names()) {
        try { (void)f.get<double>(n); } catch (const format_error&) {}
      }
      ++accepted;
    } catch (const format_error&) {
      ++rejected;
    }
  };
  for (std::size_t n = 0; n < good.size(); ++n) check(Bytes(good.begin(), good.begin() + std::ptrdiff_t(n)));
  for (std::size_t i = 0; i < good.size(); ++i)
    for (unsigned char v : {0x00, 0x22, 0x2C, 0x31, 0x5D, 0x7D, 0xFF}) {
      Bytes b = good;
      b[i] = v;
      check(b);
    }
  EXPECT_GT(accepted, 0);
  EXPECT_GT(rejected, int(good.size()));
}

// ---- files on disk ---------------------------------------------------------------------

TEST_F(SafetensorsFiles, OpenErrorsNameThePath) {
  const std::string missing = (dir_ / "missing.safetensors").string();
  try {
    SafetensorsFile::open(missing);
    FAIL();
  } catch (const format_error& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
  }
  EXPECT_THROW(SafetensorsFile::open(dir_.string()), format_error);  // a directory
  const std::string empty = (dir_ / "empty.safetensors").string();
  std::ofstream(empty).close();
  EXPECT_THROW(SafetensorsFile::open(empty), format_error);  // 0 bytes: never mmapped
}

TEST_F(SafetensorsFiles, WriteThenOpenAndAtomicReplace) {
  const std::string path = (dir_ / "model.safetensors").string();
  SafetensorsWriter w1;
  w1.add("x", Tensor<float>({2}, std::vector<float>{1, 2}));
  w1.write(path);
  SafetensorsWriter w2;
  w2.add("y", Tensor<double>({3}, std::vector<double>{4, 5, 6}), DType::F64);
  w2.write(path);  // replaces the old file in one rename
  EXPECT_EQ(read_all(path), w2.to_bytes());
  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.names(), std::vector<std::string>{"y"});
  EXPECT_EQ(f.get<double>("y")[2], 6.0);
  EXPECT_TRUE(tmp_leftovers().empty());
}

TEST_F(SafetensorsFiles, FailedWriteLeavesOldFileAndNoTemporaries) {
  SafetensorsWriter good;
  good.add("x", Tensor<float>({2}, 3.0f));
  // Folder does not exist: fails before anything is created.
  EXPECT_THROW(good.write((dir_ / "no_such_dir" / "m.safetensors").string()), format_error);
  // Target is a directory: refused before a temporary file is created (output_target).
  const fs::path sub = dir_ / "occupied.safetensors";
  fs::create_directory(sub);
  EXPECT_THROW(good.write(sub.string()), config_error);
  EXPECT_TRUE(fs::is_directory(sub));
  EXPECT_TRUE(tmp_leftovers().empty());
  // A writer that cannot encode its header (invalid UTF-8 name) leaves the old file intact.
  const std::string path = (dir_ / "m.safetensors").string();
  good.write(path);
  const Bytes before = read_all(path);
  SafetensorsWriter bad;
  bad.add("bad\xff", Tensor<float>({1}));
  EXPECT_THROW(bad.write(path), config_error);
  EXPECT_EQ(read_all(path), before);
  EXPECT_TRUE(tmp_leftovers().empty());
}
