#!/usr/bin/env bash
# Installs llama-cpp-python, the llama.cpp peer of the tests and benchmarks, into PYTHON's environment:
#   scripts/install_llama_cpp.sh [PYTHON]      (default: python3; `make test` passes the venv's)
#   scripts/install_llama_cpp.sh --print-flags  (the CMAKE_ARGS it would build with, and nothing else)
#
# Why not a plain `pip install llama-cpp-python`: PyPI has only its source, and a native build
# (-DGGML_NATIVE=ON, the default) on an Intel CPU with AMX compiles llama.cpp's AMX kernels, which
# segfault on the first Q8_0 / Q4_0 / Q4_1 matrix (F32 and F16 run). On x86_64 this script builds
# with GGML_NATIVE=OFF and each instruction set /proc/cpuinfo lists switched on, the AMX ones always
# off: the same speed on an AVX2-only CPU, the AVX-512 (VNNI, BF16) kernels on an AMX one.
#
# pip caches a wheel built from source by name and version, not by CMAKE_ARGS: a native wheel cached
# earlier would be reused silently. So the build bypasses pip's cache (--no-cache-dir) and keeps its
# wheel in a cache of its own, keyed by version, Python and the CMake flags.
# Set CMAKE_ARGS yourself to build with other flags (they become part of the key).
set -euo pipefail

PYTHON=${1:-python3}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
CPUINFO=${CPUINFO:-/proc/cpuinfo}  # another file for the tests: the flags of the other kind of CPU

has() { grep -qw "$1" "$CPUINFO" 2>/dev/null; }
flag() { if has "$2"; then echo "-D$1=ON"; else echo "-D$1=OFF"; fi; }

if [[ -z "${CMAKE_ARGS:-}" && "$(uname -m)" == "x86_64" ]]; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF $(flag GGML_SSE42 sse4_2) $(flag GGML_AVX avx) $(flag GGML_AVX2 avx2)"
    CMAKE_ARGS+=" $(flag GGML_BMI2 bmi2) $(flag GGML_FMA fma) $(flag GGML_F16C f16c) $(flag GGML_AVX_VNNI avx_vnni)"
    CMAKE_ARGS+=" $(flag GGML_AVX512 avx512f) $(flag GGML_AVX512_VBMI avx512vbmi)"
    CMAKE_ARGS+=" $(flag GGML_AVX512_VNNI avx512_vnni) $(flag GGML_AVX512_BF16 avx512_bf16)"
    CMAKE_ARGS+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
export CMAKE_ARGS=${CMAKE_ARGS:-}
if [[ "$PYTHON" == "--print-flags" ]]; then
    echo "$CMAKE_ARGS"
    exit 0
fi

pytag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
key=$(printf '%s|%s|%s|%s' "$VERSION" "$pytag" "$(uname -m)" "$CMAKE_ARGS" | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/lit_llama/wheels/llama-cpp-python-$VERSION-$key

if ! ls "$cache"/*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION for this CPU (several minutes, once per machine): CMAKE_ARGS=$CMAKE_ARGS" >&2
    mkdir -p "$(dirname "$cache")"
    tmp=$(mktemp -d "$cache.tmp.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PYTHON" -m pip wheel --quiet --no-deps --no-cache-dir \
        --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$tmp"
    rm -rf "$cache"
    mv "$tmp" "$cache"  # the cache folder appears only with a whole wheel in it
    trap - EXIT
fi
wheel=$(ls "$cache"/*.whl | head -1)
# --force-reinstall replaces a natively built copy already in the environment; the second call adds
# its dependencies (numpy, diskcache, jinja2) without touching the ones that are there
"$PYTHON" -m pip install --quiet --no-deps --force-reinstall "$wheel"
"$PYTHON" -m pip install --quiet "$wheel"
echo "llama-cpp-python $VERSION installed from $wheel" >&2
