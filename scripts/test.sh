#!/usr/bin/env bash
# Installs what is missing (Debian packages), configures, builds and runs the whole test
# suite through ctest (Release, in build/), then
#   - the same suite under ASan + UBSan + LSan (RelWithDebInfo, clang-14, in build-asan/), and
#   - each libFuzzer target of that build for a bounded time.
# Any test failure, sanitizer report or fuzzer finding fails the script.
#
# Usage: bash scripts/test.sh [--quick]
#   --quick   the Release build and its tests only (for development); CI runs everything.
# Environment: OREPA_FUZZ_SECONDS   seconds per fuzz target (default 30).
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
# Stage times: wall seconds and CPU seconds (user + sys of every finished child process,
# from /proc: compilers, tests, fuzzers), so a busy machine's wall time can be judged.
# Each stage prints its times as it ends; the last lines sum them all up.
tick=$(getconf CLK_TCK)
cpu_now() { awk -v t="$tick" '{ printf "%d", ($16 + $17) / t }' "/proc/$$/stat"; }
stage_name="" stage_start=$SECONDS stage_cpu=0 summary=() run_start=$SECONDS
stage() { # ends the current stage (prints its times), then starts the one named "$*"
  local wall=$((SECONDS - stage_start)) cpu=$(( $(cpu_now) - stage_cpu ))
  if [[ -n $stage_name ]]; then
    echo "== test.sh: $stage_name took ${wall} s wall, ${cpu} s CPU"
    summary+=("$(printf '%6d s wall %6d s CPU  %s' "$wall" "$cpu" "$stage_name")")
  fi
  stage_name="$*" stage_start=$SECONDS stage_cpu=$(cpu_now)
  [[ -n $stage_name ]] && echo "== test.sh: now: $stage_name"
  return 0
}
summarize() { # on exit, successful or not
  local status=$?
  stage ""
  echo "== test.sh: stage times (load average at the end: $(cut -d' ' -f1-3 /proc/loadavg))"
  printf '%s\n' "${summary[@]}"
  printf '%6d s wall %6d s CPU  total (%s)\n' "$((SECONDS - run_start))" "$(cpu_now)" \
    "$([[ $status == 0 ]] && echo passed || echo "FAILED, status $status")"
}
trap summarize EXIT

stage "install packages"
if [[ $quick == 1 ]]; then
  bash cmake/install_deps.sh
else
  OREPA_WITH_CLANG=1 bash cmake/install_deps.sh  # clang-14 and libFuzzer for the fuzz stage
fi

stage "Release build (build/)"
bash scripts/configure.sh test build
cmake --build build -j"$jobs"
# The packaging and compile-error tests configure and build separate projects or run the
# compiler alone: single-threaded compiles, run $jobs at a time. The rest run one at a time: most use 2 OpenMP threads, and two
# OpenMP programs on 2 cores slow each other down far more than 2x.
packaging='^(install_|cmake_|pkgconfig_|docs_|readme_|compile_error_)'
stage "Release tests"
ctest --test-dir build --output-on-failure --no-tests=error -j1 -E "$packaging"
stage "packaging tests ($jobs at a time)"
ctest --test-dir build --output-on-failure --no-tests=error -j"$jobs" -R "$packaging"
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
stage "sanitizer and fuzz build (build-asan/, clang-14)"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
bash scripts/configure.sh asan build-asan
cmake --build build-asan -j"$jobs"
stage "sanitizer tests"
# The packaging and compile-error tests run without sanitizers; they ran in build/ already.
ctest --test-dir build-asan --output-on-failure --no-tests=error -j1 -E "$packaging"

# ---- fuzzing: each libFuzzer target (built in build-asan/) for a bounded time --------------
seconds=${OREPA_FUZZ_SECONDS:-30}
# Every libFuzzer target in fuzz/ (a source defining LLVMFuzzerTestOneInput), $jobs at a
# time: each runs on one thread, so the cores are used without slowing each other.
mapfile -t targets < <(grep -l LLVMFuzzerTestOneInput fuzz/*.cpp | xargs -n 1 basename | sed 's/\.cpp$//')
fuzz_one() { # runs target $1 for $seconds s; its output goes to build-asan/fuzz/$1.log
  local target=$1
  # New inputs go to the first (scratch) corpus folder; the committed seeds stay untouched.
  local work="build-asan/fuzz/corpus/$target"
  mkdir -p "$work" build-asan/fuzz/artifacts
  local args=(-max_total_time="$seconds" -timeout=30 -print_final_stats=1 -artifact_prefix="build-asan/fuzz/artifacts/$target-")
  [[ -f fuzz/$target.dict ]] && args+=(-dict="fuzz/$target.dict")
  [[ $target == fuzz_block_config ]] && args+=(-max_len=64)  # the configuration needs ~24 bytes
  [[ $target == fuzz_checkpoint ]] && args+=(-max_len=4096)  # the largest seed is ~2.9 KB
  [[ $target == fuzz_model_yaml ]] && args+=(-max_len=4096)  # the shipped yamls without comments: ~1.7 KB
  # One OpenMP thread: the inputs are tiny convolutions, where more threads only add overhead.
  OMP_NUM_THREADS=1 "build-asan/fuzz/$target" "${args[@]}" "$work" "fuzz/corpus/$target" >"build-asan/fuzz/$target.log" 2>&1
}
stage "fuzzing ${#targets[@]} targets, $seconds s each, $jobs at a time"
for ((first = 0; first < ${#targets[@]}; first += jobs)); do
  batch=("${targets[@]:first:jobs}") pids=()
  for target in "${batch[@]}"; do
    fuzz_one "$target" &
    pids+=($!)
  done
  found=0
  for k in "${!batch[@]}"; do
    target=${batch[k]} log="build-asan/fuzz/${batch[k]}.log"
    if wait "${pids[k]}"; then
      echo "$target:"
      grep -E '^#[0-9]+[[:space:]]+DONE|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
    else
      tail -n 60 "$log"
      echo "scripts/test.sh: $target found a problem (log: $log); the input is saved as" \
           "build-asan/fuzz/artifacts/$target-*; reproduce with: build-asan/fuzz/$target <input>" >&2
      found=1
    fi
  done
  [[ $found == 0 ]] || exit 1
done
