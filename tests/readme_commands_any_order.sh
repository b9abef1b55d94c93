#!/usr/bin/env bash
# README's two commands share build/: the demo command configures it with tests off, the
# test command with tests on. Each must get its own configuration whatever ran before, so
# the test command never finds zero tests (ctest would print "No tests were found" and
# pass). Checked here on a scratch folder with the scripts' own configure step.
# Usage: readme_commands_any_order.sh SOURCE_DIR SCRATCH_BUILD_DIR
set -euo pipefail
src=$1 dir=$2
rm -rf "$dir"
cached() { sed -n "s/^$1:BOOL=//p" "$dir/CMakeCache.txt"; }
bash "$src/scripts/configure.sh" demo "$dir"
[[ $(cached OREPA_BUILD_TESTS) == OFF ]] || { echo "demo configure left OREPA_BUILD_TESTS on"; exit 1; }
bash "$src/scripts/configure.sh" test "$dir"
[[ $(cached OREPA_BUILD_TESTS) == ON && $(cached OREPA_BUILD_BENCHMARKS) == ON ]] ||
  { echo "test configure after demo configure kept the demo's options"; exit 1; }
n=$(ctest --test-dir "$dir" -N | sed -n 's/^Total Tests: //p')
[[ ${n:-0} -gt 0 ]] || { echo "test configure after demo configure registers no tests"; exit 1; }
bash "$src/scripts/configure.sh" demo "$dir"
[[ $(cached OREPA_BUILD_TESTS) == OFF && $(cached OREPA_BUILD_EXAMPLES) == ON ]] ||
  { echo "demo configure after test configure kept the test's options"; exit 1; }
echo "demo -> test -> demo configure in one folder: $n tests registered by the test configure"
rm -rf "$dir"
