#!/usr/bin/env bash
# Installs sentence-transformers on PyTorch (CPU is enough; PyPI's wheel brings its CUDA
# libraries too, about 6 GB) into $FLUMEN_DEPS/st (default .deps/st), idempotently.
# Used only by the reference-vector script and `cargo bench --bench embedded`, never by
# the tests. Prints the directory to put on PYTHONPATH.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=${FLUMEN_DEPS:-$root/.deps}
dir=$deps/st
stamp=$dir/.installed-1
if [ ! -f "$stamp" ]; then
    echo "installing sentence-transformers and torch into $dir (large; once)" >&2
    rm -rf "$dir"
    python3 -m pip install -q --disable-pip-version-check --target "$dir" \
        "torch>=2.2" "sentence-transformers>=3" >&2
    touch "$stamp"
fi
echo "$dir"
