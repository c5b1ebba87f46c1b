#!/usr/bin/env bash
# A real OpenAI-compatible LLM server for the LLM pipeline tests (issue 17), built
# once into $FLUMEN_DEPS/llama (default .deps/llama), idempotently:
#   bin/llama-server — llama.cpp's server, built from the llama.cpp sources inside
#                      PyPI's llama-cpp-python sdist (cmake, about 13 minutes on 2
#                      cores, then cached);
#   tiny.gguf        — a tiny random-weight llama model (2 blocks, width 64, ChatML
#                      template) written by scripts/tiny_llama.py with PyPI's `gguf`:
#                      no weights can be downloaded here. Its text is gibberish, but
#                      deterministic at temperature 0.
# Prints the directory. Run: bin/llama-server -m tiny.gguf --host 127.0.0.1
# --port P -np 4 -c 8192 -t 2 --alias tiny --no-webui
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=${FLUMEN_DEPS:-$root/.deps}
dir=$deps/llama
version=0.3.16
mkdir -p "$dir/bin"
if [ ! -x "$dir/bin/llama-server" ]; then
    if ! command -v cmake >/dev/null; then
        echo "installing Debian's cmake" >&2
        sudo=""
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        $sudo apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq cmake >/dev/null
    fi
    src=$dir/src
    rm -rf "$src"
    mkdir -p "$src"
    echo "building llama-server from llama-cpp-python $version's sources (about 13 minutes)" >&2
    python3 -m pip download -q --no-binary :all: --no-deps --dest "$src" "llama-cpp-python==$version" >&2
    tar -xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
    cpp=$(echo "$src"/llama_cpp_python-*/vendor/llama.cpp)
    cmake -S "$cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
        -DBUILD_SHARED_LIBS=OFF >/dev/null
    cmake --build "$src/build" --target llama-server -j2 >/dev/null
    cp "$src/build/bin/llama-server" "$dir/bin/llama-server.tmp"
    mv "$dir/bin/llama-server.tmp" "$dir/bin/llama-server"
    rm -rf "$src"
fi
if [ ! -f "$dir/tiny.gguf" ]; then
    if [ ! -f "$dir/py/.installed" ]; then
        rm -rf "$dir/py"
        python3 -m pip install -q --target "$dir/py" "gguf==0.19.0" "numpy>=1.26,<3" >&2
        touch "$dir/py/.installed"
    fi
    PYTHONPATH=$dir/py python3 "$root/scripts/tiny_llama.py" "$dir/tiny.gguf.tmp"
    mv "$dir/tiny.gguf.tmp" "$dir/tiny.gguf"
fi
echo "$dir"
