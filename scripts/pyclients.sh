#!/usr/bin/env bash
# Installs the real clients the gateway tests use — the official `openai` package and
# `tritonclient[http,grpc]` — from PyPI into $FLUMEN_DEPS/py (default .deps/py), idempotently.
# Prints the directory to put on PYTHONPATH.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=${FLUMEN_DEPS:-$root/.deps}
dir=$deps/py
stamp=$dir/.installed-2
if [ ! -f "$stamp" ]; then
    echo "installing openai and tritonclient[http] into $dir" >&2
    rm -rf "$dir"
    python3 -m pip install -q --target "$dir" "openai>=1.40,<3" "tritonclient[http,grpc]>=2.40" >&2
    touch "$stamp"
fi
echo "$dir"
