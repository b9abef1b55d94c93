#pragma once
/// @file options.hpp
/// OREPA_OPTION: a chainable option field in the style of the PyTorch C++ frontend
/// (`OrepaOptions(16, 32, 3).stride(2).groups(2)`): the setter returns the options object
/// (`self()`, so setters declared in a base of the options type chain too), the getter has
/// the same name, the default is written after the macro.
///
/// An options type using the macro provides `self()`: `auto& self() { return *this; }`, or,
/// in a base shared by several options types, a cast to the derived type (ConvOptionsBase).

// Documenting an option: Doxygen sees the getter and then the setter (PREDEFINED in
// docs/Doxyfile.in). A `///` comment before the macro documents the getter; document the
// setter with an `@fn name(const T&)` block placed before the first option of the struct
// (after an option's `= default`, Doxygen would show that default on the setter).

/// Declares option `name` of type `T`: `opts.name(v)` sets it and returns `self()`,
/// `opts.name()` reads it.
#define OREPA_OPTION(T, name)                 \
 public:                                      \
  auto& name(const T& value) {                \
    name##_ = value;                          \
    return this->self();                      \
  }                                           \
  const T& name() const { return name##_; }   \
                                              \
 private:                                     \
  T name##_
