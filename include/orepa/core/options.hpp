#pragma once
/// @file options.hpp
/// OREPA_OPTION: a chainable option field in the style of the PyTorch C++ frontend
/// (`OrepaOptions(16, 32, 3).stride(2).groups(2)`): setter returns *this, getter has the
/// same name, the default is written after the macro.

/// Declares option `name` of type `T`: `opts.name(v)` sets it, `opts.name()` reads it.
#define OREPA_OPTION(T, name)                 \
 public:                                      \
  auto& name(const T& value) {                \
    name##_ = value;                          \
    return *this;                             \
  }                                           \
  const T& name() const { return name##_; }   \
                                              \
 private:                                     \
  T name##_
