#pragma once
// Shared by the fuzz targets: what counts as an acceptable outcome.
//
// orepa promises that every public call either succeeds or throws one of its error
// types. A fuzz input may therefore end in one of those; anything else (another
// exception type, a crash, a sanitizer report, a failed self-check) is a finding.

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <typeinfo>

#include "orepa/core/error.hpp"

namespace orepa::fuzz {

/// True for the documented error types (shape_error, config_error, state_error,
/// format_error, engine_error, value_error).
inline bool is_orepa_error(const std::exception& e) {
  return dynamic_cast<const shape_error*>(&e) || dynamic_cast<const config_error*>(&e) ||
         dynamic_cast<const state_error*>(&e) || dynamic_cast<const format_error*>(&e) ||
         dynamic_cast<const engine_error*>(&e) || dynamic_cast<const value_error*>(&e);
}

/// Reports a broken invariant and aborts, so libFuzzer saves the input as a crash.
[[noreturn]] inline void finding(const char* what, const char* detail = "") {
  std::fprintf(stderr, "FUZZ FINDING: %s %s\n", what, detail);
  std::abort();
}

/// Runs `f`; orepa errors are an accepted outcome, any other exception is a finding.
template <class F>
void run_accepting_orepa_errors(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    if (!is_orepa_error(e)) finding(typeid(e).name(), e.what());
  } catch (...) {
    finding("an exception not derived from std::exception");
  }
}

/// Aborts with `what` unless `cond` holds (a self-check of the fuzz target).
inline void require(bool cond, const char* what) {
  if (!cond) finding("self-check failed:", what);
}

}  // namespace orepa::fuzz
