#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the llama.cpp sources that the pinned
# llama-cpp-python sdist vendors (the same llama.cpp the tests and `chatbot-training serve` run,
# and the build the cluster's pinned server image holds), cache it, and print its path.
#   scripts/llama-server.sh          build once (~15 min on 2 cores), then print the cached path
#   scripts/llama-server.sh --path   print where the binary is (or will be) cached; builds nothing
# Cache: ${CHATBOT_BIN_CACHE:-~/.cache/chatbot-training/bin}/llama-server-b<build>-<commit>
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_VERSION=$(sed -n 's/^llama-cpp-python==//p' constraints.txt)
# The llama.cpp commit that llama-cpp-python $LLAMA_VERSION vendors, its build number (llama.cpp
# tags builds b<N>, N = commits on master; the cluster image is server-b<N>) and the sdist's hash.
LLAMA_CPP_COMMIT=0c1e570
LLAMA_CPP_BUILD=11312
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CACHE=${CHATBOT_BIN_CACHE:-$HOME/.cache/chatbot-training/bin}
BIN="$CACHE/llama-server-b$LLAMA_CPP_BUILD-$LLAMA_CPP_COMMIT"

if [ "${1:-}" = "--path" ] || [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
for tool in cmake ninja c++; do
  command -v "$tool" >/dev/null || { echo "llama-server: needs $tool (apt-get install cmake ninja-build g++)" >&2; exit 2; }
done
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
PYTHON=${PYTHON:-python3}; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
echo "llama-server: fetching the llama-cpp-python $LLAMA_VERSION sdist" >&2
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
  -d "$work" "llama-cpp-python==$LLAMA_VERSION"
sdist=$(ls "$work"/llama_cpp_python-"$LLAMA_VERSION".tar.gz)
echo "$SDIST_SHA256  $sdist" | sha256sum -c --quiet - \
  || { echo "llama-server: the sdist's sha256 is not the pinned one" >&2; exit 1; }
tar -xzf "$sdist" -C "$work"
src="$work/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
echo "llama-server: compiling llama.cpp b$LLAMA_CPP_BUILD ($LLAMA_CPP_COMMIT), portable CPU build (~15 min on 2 cores, cached)" >&2
# Portable flags as for the wheel (the native build crashes on quantized files on some CPUs);
# no web UI download, no OpenSSL, one static binary.
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_NUMBER="$LLAMA_CPP_BUILD" -DLLAMA_BUILD_COMMIT="$LLAMA_CPP_COMMIT" \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  >"$work/configure.log" || { cat "$work/configure.log" >&2; exit 1; }
cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" \
  || { tail -40 "$work/build.log" >&2; exit 1; }
mkdir -p "$CACHE"
install -m 0755 "$work/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
