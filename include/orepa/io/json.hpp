#pragma once
/// @file json.hpp
/// The JSON of a safetensors header, read and written (RFC 8259): a small parser that keeps
/// object keys in document order and reports duplicate keys, and the string escaping of the
/// writer. The header format needs no more; a general JSON library would cost every
/// translation unit that includes orepa/io its parse time (nlohmann/json: about 2 s).

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "orepa/core/linkage.hpp"

#if OREPA_DEFINITIONS
#include <set>
#endif

namespace orepa::io::json {

/// Any JSON syntax error or duplicate key; what() is the whole message.
struct error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// A parsed value. Numbers, booleans and null keep their text as written; strings their
/// decoded UTF-8; arrays their elements; objects their keys and values in document order.
struct Value {
  /// What the value is.
  enum class Kind { null, boolean, number, string, array, object };
  /// What the value is.
  Kind kind = Kind::null;
  /// Decoded string, or the literal text of a number, boolean or null.
  std::string text;
  /// Array elements, or object values (in the order of `keys`).
  std::vector<Value> items;
  /// Object keys, in document order.
  std::vector<std::string> keys;

  /// Whether this is an object.
  bool is_object() const { return kind == Kind::object; }
  /// Whether this is an array.
  bool is_array() const { return kind == Kind::array; }
  /// Whether this is a string.
  bool is_string() const { return kind == Kind::string; }
  /// The value of `key` in an object, or nullptr.
  const Value* find(const std::string& key) const {
    for (std::size_t i = 0; i < keys.size(); ++i)
      if (keys[i] == key) return &items[i];
    return nullptr;
  }
  /// A number written as a non-negative integer that fits 64 bits (not 2.0, not 1e3).
  std::optional<std::uint64_t> as_count() const {
    if (kind != Kind::number || text.empty() || text[0] == '-') return std::nullopt;
    std::uint64_t v = 0;
    for (char c : text) {
      if (c < '0' || c > '9') return std::nullopt;
      const auto d = std::uint64_t(c - '0');
      if (v > (UINT64_MAX - d) / 10) return std::nullopt;
      v = v * 10 + d;
    }
    return v;
  }
  /// The value as compact JSON, for messages.
  std::string dump() const;
};

/// Length of the well-formed UTF-8 sequence at s[i] (1-4), or 0 when it is ill-formed:
/// truncated, overlong, a surrogate, or past U+10FFFF.
OREPA_INLINE std::size_t utf8_sequence(const std::string& s, std::size_t i);
/// `s` as a JSON string literal: quotes, backslash and control characters escaped, other
/// UTF-8 kept as it is. Throws json::error naming the byte when `s` is not valid UTF-8.
OREPA_INLINE std::string quote(const std::string& s);

/// Parses one JSON text (surrounding whitespace allowed, nothing else). Throws json::error:
/// "invalid JSON: <what> at byte N" for a syntax error, nesting deeper than `max_depth` or
/// more than `max_values` values (a hostile header must not exhaust the stack or memory);
/// "duplicate key 'k' in the header" (the outermost object) or "... in 'owner'" (an object
/// under key `owner`) for a repeated key.
class Parser {
 public:
  /// Nesting limit (a safetensors header needs 3).
  static constexpr int max_depth = 64;
  /// Value limit: ~8 per tensor, so 250,000 tensors.
  static constexpr std::size_t max_values = std::size_t(1) << 21;

  /// Parses `text[0, size)`.
  static Value parse(const char* text, std::size_t size);

 private:
  Parser(const char* text, std::size_t size) : text_(text), size_(size) {}

  [[noreturn]] void fail(const std::string& what) const;
  bool at_end() const { return pos_ >= size_; }
  // '\0' past the end, which no comparison with a JSON delimiter matches.
  char peek() const { return at_end() ? '\0' : text_[pos_]; }
  void skip_space() {
    while (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r') ++pos_;
  }
  void expect(char c);
  Value value(int depth, const std::string& owner);
  // An object or an array: comma-separated elements up to the closing bracket.
  Value container(int depth, const std::string& owner);
  std::string number();
  unsigned hex4();
  static void append_utf8(std::string& s, unsigned cp);
  std::string string();

  const char* text_;
  std::size_t size_;
  std::size_t pos_ = 0;
  std::size_t values_ = 0;
};

#if OREPA_DEFINITIONS
OREPA_INLINE std::size_t utf8_sequence(const std::string& s, std::size_t i) {
  const auto b = [&](std::size_t k) { return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) : 0u; };
  const unsigned c = b(0);
  const auto cont = [&](std::size_t k) { return (b(k) & 0xC0u) == 0x80u; };
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    const unsigned lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;  // no overlongs, no surrogates
    return b(1) >= lo && b(1) <= hi && cont(2) ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    const unsigned lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;  // U+10000 .. U+10FFFF
    return b(1) >= lo && b(1) <= hi && cont(2) && cont(3) ? 4 : 0;
  }
  return 0;
}

OREPA_INLINE std::string quote(const std::string& s) {
  static const char hex[] = "0123456789abcdef";
  std::string out = "\"";
  for (std::size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const std::size_t n = utf8_sequence(s, i);
    if (n == 0)
      throw error("invalid UTF-8 byte 0x" + std::string{hex[c >> 4], hex[c & 15]} + " at index " + std::to_string(i));
    if (c == '"' || c == '\\') {
      out += '\\', out += char(c);
    } else if (c < 0x20) {
      const char* named = c == '\b' ? "\\b" : c == '\f' ? "\\f" : c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t" : nullptr;
      if (named) out += named;
      else out += std::string("\\u00") + hex[c >> 4] + hex[c & 15];
    } else {
      out.append(s, i, n);
    }
    i += n;
  }
  return out + '"';
}

OREPA_INLINE std::string Value::dump() const {
  switch (kind) {
    case Kind::string: return quote(text);
    case Kind::array: {
      std::string s = "[";
      for (std::size_t i = 0; i < items.size(); ++i) s += (i ? "," : "") + items[i].dump();
      return s + "]";
    }
    case Kind::object: {
      std::string s = "{";
      for (std::size_t i = 0; i < items.size(); ++i) s += (i ? "," : "") + quote(keys[i]) + ":" + items[i].dump();
      return s + "}";
    }
    default: return text;
  }
}

OREPA_INLINE Value Parser::parse(const char* text, std::size_t size) {
  Parser p(text, size);
  p.skip_space();
  Value v = p.value(0, "");
  p.skip_space();
  if (p.pos_ != p.size_) p.fail("unexpected text after the value");
  return v;
}

OREPA_INLINE void Parser::fail(const std::string& what) const {
  throw error("invalid JSON: " + what + " at byte " + std::to_string(pos_));
}

OREPA_INLINE void Parser::expect(char c) {
  if (peek() != c) fail(std::string("expected '") + c + "'");
  ++pos_;
}

OREPA_INLINE Value Parser::value(int depth, const std::string& owner) {
  if (++values_ > max_values) fail("more than " + std::to_string(max_values) + " values");
  if (at_end()) fail("unexpected end of the text");
  const char c = peek();
  if (c == '{' || c == '[') {
    if (depth >= max_depth) fail("nesting deeper than " + std::to_string(max_depth) + " levels");
    return container(depth, owner);
  }
  Value v;
  if (c == '"') {
    v.kind = Value::Kind::string;
    v.text = string();
  } else if (c == '-' || (c >= '0' && c <= '9')) {
    v.kind = Value::Kind::number;
    v.text = number();
  } else {
    for (const char* word : {"true", "false", "null"}) {
      const std::string w = word;
      if (pos_ + w.size() <= size_ && std::string(text_ + pos_, w.size()) == w) {
        v.kind = w == "null" ? Value::Kind::null : Value::Kind::boolean;
        v.text = w;
        pos_ += w.size();
        return v;
      }
    }
    fail(std::string("unexpected character '") + c + "'");
  }
  return v;
}

OREPA_INLINE Value Parser::container(int depth, const std::string& owner) {
  const bool is_object = peek() == '{';
  const char close = is_object ? '}' : ']';
  Value v;
  v.kind = is_object ? Value::Kind::object : Value::Kind::array;
  std::set<std::string> seen;
  ++pos_;
  skip_space();
  if (peek() == close) return ++pos_, v;
  for (;;) {
    skip_space();
    if (is_object) {
      if (peek() != '"') fail("expected a string key");
      std::string key = string();
      if (!seen.insert(key).second)
        throw error("duplicate key '" + key + "' in " + (depth == 0 ? std::string("the header") : "'" + owner + "'"));
      skip_space();
      expect(':');
      skip_space();
      v.items.push_back(value(depth + 1, key));
      v.keys.push_back(std::move(key));
    } else {
      v.items.push_back(value(depth + 1, owner));  // array elements belong to the array's owner
    }
    skip_space();
    if (peek() != ',') break;
    ++pos_;
  }
  expect(close);
  return v;
}

OREPA_INLINE std::string Parser::number() {
  const std::size_t begin = pos_;
  const auto digits = [&] {
    const std::size_t d = pos_;
    while (peek() >= '0' && peek() <= '9') ++pos_;
    return pos_ - d;
  };
  if (peek() == '-') ++pos_;
  if (peek() == '0') ++pos_;
  else if (digits() == 0) fail("expected a digit");
  if (peek() == '.') {
    ++pos_;
    if (digits() == 0) fail("expected a digit after '.'");
  }
  if (peek() == 'e' || peek() == 'E') {
    ++pos_;
    if (peek() == '+' || peek() == '-') ++pos_;
    if (digits() == 0) fail("expected a digit in the exponent");
  }
  return std::string(text_ + begin, pos_ - begin);
}

OREPA_INLINE unsigned Parser::hex4() {
  unsigned u = 0;
  for (int i = 0; i < 4; ++i, ++pos_) {
    const char c = peek();
    if (at_end()) fail("unexpected end in a \\u escape");
    const unsigned d = c >= '0' && c <= '9' ? unsigned(c - '0')
                       : c >= 'a' && c <= 'f' ? unsigned(c - 'a' + 10)
                       : c >= 'A' && c <= 'F' ? unsigned(c - 'A' + 10)
                                              : 16u;
    if (d == 16) fail("expected a hex digit in a \\u escape");
    u = u * 16 + d;
  }
  return u;
}

OREPA_INLINE void Parser::append_utf8(std::string& s, unsigned cp) {
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6)), s += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += char(0xE0 | (cp >> 12)), s += char(0x80 | ((cp >> 6) & 0x3F)), s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xF0 | (cp >> 18)), s += char(0x80 | ((cp >> 12) & 0x3F));
    s += char(0x80 | ((cp >> 6) & 0x3F)), s += char(0x80 | (cp & 0x3F));
  }
}

OREPA_INLINE std::string Parser::string() {
  ++pos_;  // '"'
  std::string s;
  for (;;) {
    if (at_end()) fail("unterminated string");
    const auto c = static_cast<unsigned char>(peek());
    if (c == '"') {
      ++pos_;
      return s;
    }
    if (c < 0x20) fail("unescaped control character in a string");
    if (c < 0x80 && c != '\\') {
      s += char(c);
      ++pos_;
      continue;
    }
    if (c != '\\') {
      const std::string rest(text_ + pos_, size_ - pos_ < 4 ? size_ - pos_ : 4);
      const std::size_t n = utf8_sequence(rest, 0);
      if (n == 0) fail("ill-formed UTF-8 in a string");
      s.append(text_ + pos_, n);
      pos_ += n;
      continue;
    }
    ++pos_;
    const char e = peek();
    if (at_end()) fail("unterminated escape");
    ++pos_;
    switch (e) {
      case '"': s += '"'; break;
      case '\\': s += '\\'; break;
      case '/': s += '/'; break;
      case 'b': s += '\b'; break;
      case 'f': s += '\f'; break;
      case 'n': s += '\n'; break;
      case 'r': s += '\r'; break;
      case 't': s += '\t'; break;
      case 'u': {
        unsigned cp = hex4();
        if (cp >= 0xDC00 && cp <= 0xDFFF) fail("a lone low surrogate in a \\u escape");
        if (cp >= 0xD800 && cp <= 0xDBFF) {  // a high surrogate needs its low half next
          if (peek() != '\\' || pos_ + 1 >= size_ || text_[pos_ + 1] != 'u')
            fail("a high surrogate without its low half");
          pos_ += 2;
          const unsigned lo = hex4();
          if (lo < 0xDC00 || lo > 0xDFFF) fail("a high surrogate without its low half");
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        append_utf8(s, cp);
        break;
      }
      default: --pos_, fail(std::string("invalid escape '\\") + e + "'");
    }
  }
}
#endif  // OREPA_DEFINITIONS

}  // namespace orepa::io::json
