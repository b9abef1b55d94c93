#!/usr/bin/env bash
# What including orepa costs a user's compile (issue 23, item 7). Compiles small programs
# with the project's flags (those of its own targets: -std=gnu++17 -DNDEBUG, -Wall -Wextra
# -Wpedantic, -fopenmp, Eigen as a system header; at -O2, as a user's build) and prints,
# for each, the CPU seconds (user + sys: on a busy machine the honest figure; on an idle
# one it is the wall time), the wall seconds, and the ratio to the same compile of Eigen +
# dnnl.hpp alone, which no header work in orepa can make faster:
#   parse      `#include <orepa/orepa.hpp>`, -fsyntax-only
#              vs `#include <Eigen/Core>` + `<oneapi/dnnl/dnnl.hpp>`, -fsyntax-only
#   one block  tests/install_consumer/main.cpp at -O2 (an OREPA block: eval, deploy, compare)
#              vs Eigen + dnnl.hpp and a main that creates a oneDNN engine, at -O2
#   both again with OREPA_PRECOMPILED, as a program linking orepa::precompiled compiles
#   (include/orepa/precompiled.hpp: the float instantiations are compiled in the library)
# Limits (issue 23, on an idle 2-core machine): parse <= 2.5 s, one block -O2 <= 5 s.
#
# Usage: bash benchmarks/compile_time.sh [--repeat N] [--headers]
#   --repeat N  compile each program N times and keep the fastest (default 1)
#   --headers   also parse each public header alone (where its own cost is, include order aside)
# Environment: CXX (default g++).
set -euo pipefail
cd "$(dirname "$0")/.."

repeat=1 headers=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --repeat) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || { echo "compile_time.sh: --repeat needs a positive integer" >&2; exit 2; }
              repeat=$2; shift ;;
    --headers) headers=1 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "compile_time.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cxx=${CXX:-g++}
eigen=$(pkg-config --variable=includedir eigen3 2>/dev/null || true)
eigen=${eigen:-/usr/include/eigen3}
flags=(-std=gnu++17 -O2 -DNDEBUG -Wall -Wextra -Wpedantic -fopenmp -Iinclude -isystem "$eigen")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat >"$work/orepa_parse.cpp" <<'EOF'
#include <orepa/orepa.hpp>
EOF
cat >"$work/yardstick_parse.cpp" <<'EOF'
#include <Eigen/Core>
#include <oneapi/dnnl/dnnl.hpp>
EOF
cat >"$work/yardstick_program.cpp" <<'EOF'
#include <Eigen/Core>
#include <oneapi/dnnl/dnnl.hpp>

#include <cstdio>

int main() {
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  Eigen::MatrixXf m = Eigen::MatrixXf::Random(4, 4);
  std::printf("%d %g\n", static_cast<int>(engine.get_kind()), static_cast<double>((m * m).sum()));
}
EOF

# Sets cpu and wall (seconds) to those of the fastest (by CPU) of `repeat` runs of the command.
measure() {
  local i user sys w c
  local TIMEFORMAT='%3U %3S %3R'
  cpu="" wall=""
  for ((i = 0; i < repeat; i++)); do
    if ! { time "$@" >"$work/log" 2>&1; } 2>"$work/time"; then
      cat "$work/log" >&2
      echo "compile_time.sh: the compile failed: $*" >&2
      exit 1
    fi
    read -r user sys w <"$work/time"
    c=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
    if [[ -z $cpu ]] || awk -v a="$c" -v b="$cpu" 'BEGIN { exit !(a < b) }'; then
      cpu=$c wall=$w
    fi
  done
}

row() { # name limit cpu wall yardstick_cpu
  awk -v n="$1" -v l="$2" -v c="$3" -v w="$4" -v y="$5" \
    'BEGIN { printf "%-40s %8.2f %8.2f %9.2f %7.2fx %8s\n", n, c, w, y, c / y, l }'
}

echo "compile_time.sh: $($cxx --version | head -n 1); load average $(cut -d' ' -f1-3 /proc/loadavg)" \
     "on $(nproc) cores; best of $repeat"
printf '%-40s %8s %8s %9s %8s %8s\n' "program" "CPU s" "wall s" "Eigen+dnnl" "ratio" "limit"

measure "$cxx" "${flags[@]}" -fsyntax-only "$work/yardstick_parse.cpp"
parse_cpu=$cpu
row "Eigen + dnnl.hpp, parse" "" "$cpu" "$wall" "$parse_cpu"
measure "$cxx" "${flags[@]}" -fsyntax-only "$work/orepa_parse.cpp"
row "<orepa/orepa.hpp>, parse" "2.5 s" "$cpu" "$wall" "$parse_cpu"

measure "$cxx" "${flags[@]}" -c "$work/yardstick_program.cpp" -o "$work/y.o"
program_cpu=$cpu
row "Eigen + dnnl.hpp program, -O2" "" "$cpu" "$wall" "$program_cpu"
measure "$cxx" "${flags[@]}" -c tests/install_consumer/main.cpp -o "$work/o.o"
row "one-block program, -O2" "5 s" "$cpu" "$wall" "$program_cpu"
# The same two with orepa::precompiled linked (OREPA_PRECOMPILED: the float instantiations
# are extern, compiled once in the library).
measure "$cxx" "${flags[@]}" -DOREPA_PRECOMPILED -fsyntax-only "$work/orepa_parse.cpp"
row "<orepa/orepa.hpp>, parse, precompiled" "2.5 s" "$cpu" "$wall" "$parse_cpu"
measure "$cxx" "${flags[@]}" -DOREPA_PRECOMPILED -c tests/install_consumer/main.cpp -o "$work/o.o"
row "one-block program, -O2, precompiled" "5 s" "$cpu" "$wall" "$program_cpu"

if [[ $headers == 1 ]]; then
  echo "each public header alone, parse (ratio to Eigen + dnnl.hpp parse):"
  for h in include/orepa/*.hpp include/orepa/{core,engine,branches,deploy,blocks,io,nn}/*.hpp; do
    printf '#include <%s>\n' "${h#include/}" >"$work/header.cpp"
    measure "$cxx" "${flags[@]}" -fsyntax-only "$work/header.cpp"
    row "${h#include/}" "" "$cpu" "$wall" "$parse_cpu"
  done
fi
