#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the llama.cpp source vendored in the llama-cpp-python that
# uv.lock pins, with the CMake flags pyproject.toml gives that build: the baseline that
# `scripts/bench.py --against llama-server=URL` compares the appliance with, on the same code and flags.
#
#   scripts/build-llama-server.sh [OUT_DIR]      (default: build/llama-server; ~14 min on 2 cores)
#
# Needs cmake and a C++ compiler; fetches the sdist with `uv` (or reuses uv's cache) when online.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-build/llama-server}")"
jobs="${JOBS:-$(nproc)}"

version="$(awk '/^name = "llama-cpp-python"$/ {getline; gsub(/[^0-9.]/, "", $0); print; exit}' uv.lock)"
[ -n "$version" ] || { echo "llama-cpp-python is not in uv.lock" >&2; exit 1; }
# The CMAKE_ARGS string from [tool.uv.extra-build-variables], so both builds use the same flags.
cmake_args="$(python3 - <<'EOF'
import tomllib
cfg = tomllib.load(open("pyproject.toml", "rb"))
print(cfg["tool"]["uv"]["extra-build-variables"]["llama-cpp-python"]["CMAKE_ARGS"])
EOF
)"

src=""
for d in "${UV_CACHE_DIR:-$HOME/.cache/uv}"/sdists-v*/pypi/llama-cpp-python/"$version"/*/src/vendor/llama.cpp; do
  [ -f "$d/CMakeLists.txt" ] && src="$d" && break
done
if [ -z "$src" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching the llama-cpp-python $version sdist" >&2
  uv run --no-project --with pip python -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$version" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-"$version".tar.gz -C "$tmp"
  src="$tmp/llama_cpp_python-$version/vendor/llama.cpp"
fi

echo "llama.cpp from llama-cpp-python $version: $src" >&2
echo "flags: $cmake_args" >&2
# shellcheck disable=SC2086  # the flags are a space-separated list, as CMAKE_ARGS is for the wheel build
cmake -S "$src" -B "$out/cmake" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON $cmake_args >&2
cmake --build "$out/cmake" --target llama-server -j "$jobs" >&2
cp "$out/cmake/bin/llama-server" "$out/llama-server"
echo "$out/llama-server"
