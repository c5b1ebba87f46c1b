#!/usr/bin/env bash
# Installs a real Triton Inference Server (CPU) for the integration tests, idempotently:
# the tritonserver binary and its Python backend from PyPI's nvidia-pytriton wheel,
# and numpy (< 2, which the Python backend's utilities expect) for the models.
#
#   bash scripts/triton.sh      # prints the install directory
#
# Everything goes under $FLUMEN_DEPS (default: .deps/ in the repository). Tests
# find it there, generate their model repositories and start servers themselves.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=${FLUMEN_DEPS:-$root/.deps}
dir=$deps/triton
version=0.7.0
stamp=$dir/.installed-$version

if [ ! -f "$stamp" ]; then
    echo "installing Triton (nvidia-pytriton $version) into $dir" >&2
    rm -rf "$dir"
    mkdir -p "$dir"
    # The Python backend's stub embeds the system's Python 3.11.
    if [ ! -e /lib/x86_64-linux-gnu/libpython3.11.so.1.0 ] && [ ! -e /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0 ]; then
        apt-get update -qq && apt-get install -y -qq libpython3.11 >&2
    fi
    python3 -m pip download -q --no-deps "nvidia-pytriton==$version" -d "$dir/wheel" >&2
    python3 -m zipfile -e "$dir"/wheel/nvidia_pytriton-*.whl "$dir/pkg"
    python3 -m pip install -q --target "$dir/pylib" "numpy<2" >&2
    server=$dir/pkg/pytriton/tritonserver
    cp "$server/python_backend_stubs/3.11/triton_python_backend_stub" "$server/backends/python/"
    chmod +x "$server/bin/tritonserver" "$server/backends/python/triton_python_backend_stub"
    rm -rf "$dir/wheel"
    touch "$stamp"
fi
echo "$dir"
