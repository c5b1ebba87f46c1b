#!/usr/bin/env bash
# Installs a second real OpenAI client for the gateway's tests — the official
# `openai` npm package, run under Node (Debian's nodejs, scripts/system.sh) — into
# $FLUMEN_DEPS/node (default .deps/node), idempotently. Prints the directory whose
# node_modules holds it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=${FLUMEN_DEPS:-$root/.deps}
dir=$deps/node
version=6.49.0
stamp=$dir/.installed-$version
if [ ! -f "$stamp" ]; then
    echo "installing the openai npm package $version into $dir" >&2
    rm -rf "$dir"
    mkdir -p "$dir"
    (cd "$dir" && npm install --silent --no-audit --no-fund --prefix "$dir" "openai@$version" >&2)
    touch "$stamp"
fi
echo "$dir"
