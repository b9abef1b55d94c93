#!/usr/bin/env bash
# Builds the install-consumer main.cpp with plain g++ and `pkg-config orepa` against the
# staged install tree STAGE (argument 1), then runs it.
set -euo pipefail
stage=$1 src=$2 out=$3
export PKG_CONFIG_PATH="$stage/share/pkgconfig:${PKG_CONFIG_PATH:-}"
${CXX:-c++} -std=c++17 -O1 "$src/install_consumer/main.cpp" $(pkg-config --cflags --libs orepa) -o "$out"
"$out"
