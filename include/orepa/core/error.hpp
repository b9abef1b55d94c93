#pragma once
/// @file error.hpp
/// The exception types every public entry point of orepa throws. Messages name the
/// argument or tensor at fault and give the expected and the actual value.

#include <sstream>
#include <stdexcept>
#include <string>
#include <typeinfo>

#include "orepa/core/linkage.hpp"

#if OREPA_DEFINITIONS
#include <cxxabi.h>

#include <cstdlib>
#include <memory>
#endif

namespace orepa {

/// A tensor handed to a public call has the wrong shape (or rank).
struct shape_error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

/// A block, layer or tool was given an invalid configuration value
/// (kernel size, groups, stride, dilation, padding, channels, option).
struct config_error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

/// A call was made in the wrong state (backward without a training forward,
/// batch too small for batch statistics).
struct state_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// A file (safetensors checkpoint) is malformed or a state dict does not fit a block.
struct format_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// oneDNN refused or failed an operation; the message carries the shapes involved.
struct engine_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// A value (not a shape) is unusable: a NaN / Inf where finite numbers are needed (the
/// tensors of a block being deployed, a calibration batch), a BN variance that makes the
/// fold divide by zero, an int8 range or scale no float can hold. The message names the
/// tensor or layer and the first bad index or the value.
struct value_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
// Each argument goes through cat_piece, so the choice among the stream's many operator<<
// overloads is made once per argument type, not once per argument list of cat: messages
// are built in hundreds of places with different lists. String literals and C strings
// share the const char* one.
inline void cat_piece(std::ostream& os, const char* s) { os << s; }
template <class T>
void cat_piece(std::ostream& os, const T& v) {
  os << v;
}

/// Concatenates any streamable values into one message string.
template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (cat_piece(os, args), ...);
  return os.str();
}
}  // namespace detail

/// The C++ name of type `t` as written in source ("orepa::OREPA<float, orepa::SiLU>"),
/// for messages (typeid's own name is mangled with GCC and clang).
OREPA_INLINE std::string readable_type_name(const std::type_info& t);
#if OREPA_DEFINITIONS
OREPA_INLINE std::string readable_type_name(const std::type_info& t) {
  int status = 0;
  const std::unique_ptr<char, void (*)(void*)> name(abi::__cxa_demangle(t.name(), nullptr, nullptr, &status),
                                                   std::free);
  return status == 0 && name ? std::string(name.get()) : std::string(t.name());
}
#endif  // OREPA_DEFINITIONS

}  // namespace orepa
