#!/usr/bin/env bash
# Installs, from Debian's archive, what building and running the test suite needs and this
# machine lacks: CMake, Ninja, g++, GoogleTest, nlohmann-json, OpenMPI (the SyncBatchNorm tests). Installs nothing when all are
# there. Needs root (or sudo) only when something is missing.
#
# The library itself needs none of this beyond CMake and a C++17 compiler; nlohmann-json is
# needed by the tests (PyTorch fixtures are JSON) and by <batchnorm/io/safetensors.hpp>.
# Usage: tools/install-deps.sh [extra Debian packages...]
set -euo pipefail
missing=()
# Tools count as present when they are on PATH, however they were installed.
for tool in cmake:cmake ninja:ninja-build g++:g++; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
packages=(libgtest-dev nlohmann-json3-dev libopenmpi-dev openmpi-bin "$@")
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
packages=(cmake ninja-build g++ "${packages[@]}")
if ((${#missing[@]} == 0)); then
  echo "install-deps: all present (${packages[*]})"
  exit 0
fi
if ((EUID == 0)); then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "install-deps: missing ${missing[*]}; as root run: apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: installed ${missing[*]}"
