#!/usr/bin/env bash
# Installs the Debian packages orepa needs, only those that are missing.
# Idempotent and silent when everything is present. Run as root (or via sudo).
set -euo pipefail
packages=(cmake g++ make libeigen3-dev libdnnl-dev ocl-icd-opencl-dev libgtest-dev libgmock-dev
          libbenchmark-dev nlohmann-json3-dev pkgconf doxygen
          libopenmpi-dev openmpi-bin   # MPI: orepa::dist (data-parallel training) and its tests
          libyaml-cpp-dev libstb-dev   # orepa::yolo: model yaml files, images
          ccache)                      # scripts/configure.sh: quick rebuilds of unchanged sources
# Extra packages for the sanitizer/fuzz configuration (clang + its runtime).
if [[ "${OREPA_WITH_CLANG:-0}" == 1 ]]; then
  packages+=(clang-14 libclang-rt-14-dev)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
echo "install_deps: installing ${missing[*]}"
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
