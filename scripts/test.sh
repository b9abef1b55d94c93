#!/usr/bin/env bash
# Installs what is missing (Debian packages), configures, builds and runs the whole test
# suite through ctest (Release, in build/), then
#   - the same suite under ASan + UBSan + LSan (RelWithDebInfo, clang-14, in build-asan/), and
#   - each libFuzzer target of that build for a bounded time.
# Any test failure, sanitizer report or fuzzer finding fails the script.
#
# The two builds and their tests run as two pipelines at the same time (each build -j$(nproc)):
#   release:   Release build -> Release tests -> packaging tests
#   sanitizer: sanitizer build -> sanitizer tests, with the fuzz targets fuzzed beside them
# One build alone leaves a core idle at its end (its last large translation units), and the
# tests use little more than one core, so together they finish in about their CPU time / 2.
# Each pipeline's output goes to a log (build/test.log, build-asan/test.log); this script
# prints each stage's times as it ends, and a failing pipeline's log tail. The MPI tests
# (label mpi) of both builds run last, with nothing beside them: their fault cases bound how
# fast Open MPI ends a job after MPI_Abort, and on 2 cores saturated by the other pipeline
# Open MPI twice left such a job running until the 70 s watchdog (mpi_fault_finish, whose
# aborting rank's peer sits in MPI_Finalize). A failed MPI test is run once more.
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
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "scripts/test.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

jobs=$(nproc)
# Stage times: wall seconds and CPU seconds (user + sys of every finished child process of
# the pipeline's shell, from /proc: compilers, tests, fuzzers), so a busy machine's wall time
# can be judged. Each stage prints its times as it ends; the last lines sum them all up.
tick=$(getconf CLK_TCK)
shell_pid=$$  # the shell whose finished children count: this one, or a pipeline's subshell
cpu_now() { awk -v t="$tick" '{ printf "%d", ($16 + $17) / t }' "/proc/$shell_pid/stat"; }
pipeline="" stage_name="" stage_start=$SECONDS stage_cpu=0 summary=() run_start=$SECONDS
stage() { # ends the current stage (prints its times), then starts the one named "$*"
  local wall=$((SECONDS - stage_start)) cpu=$(( $(cpu_now) - stage_cpu ))
  if [[ -n $stage_name ]]; then
    echo "== test.sh: ${pipeline}${stage_name} took ${wall} s wall, ${cpu} s CPU"
    [[ -z $pipeline ]] || echo "== test.sh: ${pipeline}${stage_name} took ${wall} s wall, ${cpu} s CPU" >&3
    summary+=("$(printf '%6d s wall %6d s CPU  %s' "$wall" "$cpu" "${pipeline}${stage_name}")")
  fi
  stage_name="$*" stage_start=$SECONDS stage_cpu=$(cpu_now)
  [[ -n $stage_name ]] && echo "== test.sh: now: ${pipeline}${stage_name}"
  return 0
}
exec 3>&1  # a pipeline's stage times reach the terminal too; the rest of its output, its log
summarize() { # on exit, successful or not
  local status=$?
  stage ""
  echo "== test.sh: stage times (load average at the end: $(cut -d' ' -f1-3 /proc/loadavg))"
  printf '%s\n' "${summary[@]}"
  cat build/test.stages build-asan/test.stages 2>/dev/null || true
  printf '%6d s wall %6d s CPU  total (%s)\n' "$((SECONDS - run_start))" "$(cpu_now)" \
    "$([[ $status == 0 ]] && echo passed || echo "FAILED, status $status")"
}
rm -f build/test.stages build-asan/test.stages
trap summarize EXIT

stage "install packages"
if [[ $quick == 1 ]]; then
  bash cmake/install_deps.sh
else
  OREPA_WITH_CLANG=1 bash cmake/install_deps.sh  # clang-14 and libFuzzer for the fuzz stage
fi

# ---- release: the whole ctest suite, Release ------------------------------------------------
# The packaging and compile-error tests configure and build separate projects or run the
# compiler alone: single-threaded compiles, run $jobs at a time. The rest run one at a time:
# most use 2 OpenMP threads, and two OpenMP programs on 2 cores slow each other down far
# more than 2x.
packaging='^(install_|cmake_|pkgconfig_|docs_|readme_|compile_error_)'
release_pipeline() {
  shell_pid=$BASHPID
  [[ -z $pipeline ]] || summary=()  # a pipeline reports its own stages
  stage "Release build (build/)"
  cmake --build build -j"$jobs"
  stage "Release tests"
  ctest --test-dir build --output-on-failure --no-tests=error -j1 -LE mpi -E "$packaging"
  stage "packaging tests ($jobs at a time)"
  ctest --test-dir build --output-on-failure --no-tests=error -j"$jobs" -R "$packaging"
  stage ""
  [[ -z $pipeline ]] || printf '%s\n' "${summary[@]}" >build/test.stages
}

# ---- sanitizer: ASan + UBSan + LSan over the whole ctest suite, and fuzzing ----------------
# UBSan findings already abort (-fno-sanitize-recover=undefined); ASan aborts on its first
# error; LSan reports leaks at exit with a non-zero status. The options make that explicit.
# They are set for the build too (gtest_discover_tests runs the instrumented binary) and
# stay set for the fuzz stage. No suppressions are needed: oneDNN 2.6 (JIT) and libgomp
# run clean. Should a third-party false positive appear, add tests/sanitizers/lsan.supp or
# ubsan.supp (one reason per entry) and append ":suppressions=<file>" here.
# The MPI tests (label mpi) run with leak detection off, ASan and UBSan on: Open MPI's
# leaks at exit sit in plugins it has unloaded, which no suppression can name
# (cmake/mpi_test.cmake).
seconds=${OREPA_FUZZ_SECONDS:-30}
# Every libFuzzer target in fuzz/ (a source defining LLVMFuzzerTestOneInput).
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
  if OMP_NUM_THREADS=1 "build-asan/fuzz/$target" "${args[@]}" "$work" "fuzz/corpus/$target" >"build-asan/fuzz/$target.log" 2>&1; then
    echo "$target:"
    grep -E '^#[0-9]+[[:space:]]+DONE|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "build-asan/fuzz/$target.log" || true
  else
    tail -n 60 "build-asan/fuzz/$target.log"
    echo "scripts/test.sh: $target found a problem (log: build-asan/fuzz/$target.log); the input is saved as" \
         "build-asan/fuzz/artifacts/$target-*; reproduce with: build-asan/fuzz/$target <input>" >&2
    return 1
  fi
}
fuzz_all() { # one target at a time (each runs on one thread), beside the sanitizer tests
  local target found=0
  for target in "${targets[@]}"; do fuzz_one "$target" || found=1; done
  return $found
}
# The sanitizers' settings, for every run of build-asan/'s tests.
sanitizer_env() {
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
  export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
}
sanitizer_pipeline() {
  shell_pid=$BASHPID
  [[ -z $pipeline ]] || summary=()  # a pipeline reports its own stages
  sanitizer_env
  stage "sanitizer and fuzz build (build-asan/, clang-14)"
  cmake --build build-asan -j"$jobs"
  stage "sanitizer tests, and fuzzing ${#targets[@]} targets for $seconds s each beside them"
  fuzz_all >build-asan/fuzz.log 2>&1 &
  local fuzz_pid=$! status=0
  # The packaging and compile-error tests run without sanitizers; they ran in build/ already.
  ctest --test-dir build-asan --output-on-failure --no-tests=error -j1 -LE mpi -E "$packaging" || status=1
  wait "$fuzz_pid" || status=1
  cat build-asan/fuzz.log
  stage ""
  printf '%s\n' "${summary[@]}" >build-asan/test.stages
  return $status
}

if [[ $quick == 1 ]]; then
  stage "configure build/"
  bash scripts/configure.sh test build
else
  stage "configure build/ and build-asan/"
  bash scripts/configure.sh test build
  bash scripts/configure.sh asan build-asan
fi
stage ""
if [[ $quick == 1 ]]; then
  release_pipeline
else
  pipeline="release: " release_pipeline >build/test.log 2>&1 &
  release_pid=$!
  pipeline="sanitizer: " sanitizer_pipeline >build-asan/test.log 2>&1 &
  sanitizer_pid=$!
  failed=()
  wait "$release_pid" || failed+=(build/test.log)
  wait "$sanitizer_pid" || failed+=(build-asan/test.log)
  for log in "${failed[@]}"; do
    echo "== test.sh: FAILED, the last 200 lines of $log:"
    tail -n 200 "$log"
  done
  [[ ${#failed[@]} == 0 ]] || exit 1
fi

# ---- MPI tests of both builds, alone --------------------------------------------------------
stage "MPI tests (label mpi), nothing else running"
mpi_status=0
ctest --test-dir build --output-on-failure --no-tests=error -j1 -L mpi --repeat until-pass:2 || mpi_status=1
if [[ $quick == 0 ]]; then
  (sanitizer_env && ctest --test-dir build-asan --output-on-failure --no-tests=error -j1 -L mpi --repeat until-pass:2) ||
    mpi_status=1
fi
exit $mpi_status
