#!/usr/bin/env bash
# Installs what is missing (Debian packages), configures, builds and runs the whole test
# suite through ctest (Release, in build/), then
#   - the same suite under ASan + UBSan + LSan (RelWithDebInfo, in build-asan/), and
#   - each libFuzzer target for a bounded time (clang-14, in build-fuzz/).
# Any test failure, sanitizer report or fuzzer finding fails the script.
#
# Usage: bash scripts/test.sh [--quick]
#   --quick   the Release build and its tests only (for development); CI runs everything.
# Environment: OREPA_FUZZ_SECONDS   seconds per fuzz target (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "scripts/test.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

jobs=$(nproc)
stage_start=$SECONDS
stage() { # prints the time the previous stage took, then the new stage's name
  echo "== test.sh: previous stage took $((SECONDS - stage_start)) s; now: $*"
  stage_start=$SECONDS
}

if [[ $quick == 1 ]]; then
  bash cmake/install_deps.sh
else
  OREPA_WITH_CLANG=1 bash cmake/install_deps.sh  # clang-14 and libFuzzer for the fuzz stage
fi

stage "Release build and tests (build/)"
bash scripts/configure.sh test build
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure --no-tests=error -j1
[[ $quick == 1 ]] && exit 0

# ---- sanitizers: ASan + UBSan + LSan over the whole ctest suite ---------------------------
# UBSan findings already abort (-fno-sanitize-recover=undefined); ASan aborts on its first
# error; LSan reports leaks at exit with a non-zero status. The options make that explicit.
# They are set for the build too (gtest_discover_tests runs the instrumented binary) and
# stay set for the fuzz stage. No suppressions are needed: oneDNN 2.6 (JIT) and libgomp
# run clean. Should a third-party false positive appear, add tests/sanitizers/lsan.supp or
# ubsan.supp (one reason per entry) and append ":suppressions=<file>" here.
# The MPI tests (label mpi) run with leak detection off, ASan and UBSan on: Open MPI's
# leaks at exit sit in plugins it has unloaded, which no suppression can name
# (cmake/mpi_test.cmake).
stage "sanitizer build and tests (build-asan/)"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
bash scripts/configure.sh asan build-asan
cmake --build build-asan -j"$jobs"
# The packaging and compile-error tests build separate projects or run the compiler alone
# without sanitizers; they ran in build/ already.
ctest --test-dir build-asan --output-on-failure --no-tests=error -j1 -E '^(install_|cmake_|pkgconfig_|docs_|readme_|compile_error_)'

# ---- fuzzing: each libFuzzer target for a bounded time ------------------------------------
stage "fuzz build (build-fuzz/, clang-14)"
bash scripts/configure.sh fuzz build-fuzz
cmake --build build-fuzz -j"$jobs"
seconds=${OREPA_FUZZ_SECONDS:-60}
for target in fuzz_safetensors fuzz_block_config fuzz_tool_args fuzz_checkpoint fuzz_model_yaml; do
  stage "fuzzing $target for $seconds s"
  # New inputs go to the first (scratch) corpus folder; the committed seeds stay untouched.
  work="build-fuzz/corpus/$target" log="build-fuzz/$target.log"
  mkdir -p "$work" build-fuzz/artifacts
  args=(-max_total_time="$seconds" -timeout=30 -print_final_stats=1 -artifact_prefix="build-fuzz/artifacts/$target-")
  [[ -f fuzz/$target.dict ]] && args+=(-dict="fuzz/$target.dict")
  [[ $target == fuzz_block_config ]] && args+=(-max_len=64)  # the configuration needs ~24 bytes
  [[ $target == fuzz_checkpoint ]] && args+=(-max_len=4096)  # the largest seed is ~2.9 KB
  [[ $target == fuzz_model_yaml ]] && args+=(-max_len=4096)  # the shipped yamls without comments: ~1.7 KB
  # One OpenMP thread: the inputs are tiny convolutions, where more threads only add overhead.
  if ! OMP_NUM_THREADS=1 "build-fuzz/fuzz/$target" "${args[@]}" "$work" "fuzz/corpus/$target" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "scripts/test.sh: $target found a problem (log: $log); the input is saved as" \
         "build-fuzz/artifacts/$target-*; reproduce with: build-fuzz/fuzz/$target <input>" >&2
    exit 1
  fi
  grep -E '^#[0-9]+[[:space:]]+DONE|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
done
stage "done"
