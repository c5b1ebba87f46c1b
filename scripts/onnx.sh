#!/usr/bin/env bash
# ONNX Runtime and the exporters for the ONNX backend (issue 19), from PyPI, into
# $FLUMEN_DEPS/onnx (default .deps/onnx), idempotently: onnxruntime (whose wheel
# ships libonnxruntime.so, loaded at run time by the `ort` crate), onnx (to write
# graphs), scikit-learn and skl2onnx (a small non-text model), and tokenizers (for
# `cargo bench --bench local`'s Python side). Prints the directory.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=${FLUMEN_DEPS:-$root/.deps}
dir=$deps/onnx
stamp=$dir/.installed-2
if [ ! -f "$stamp" ]; then
    rm -rf "$dir"
    echo "installing onnxruntime, onnx, scikit-learn and skl2onnx into $dir" >&2
    python3 -m pip install -q --target "$dir" "onnxruntime==1.31.1" "onnx>=1.17,<2" \
        "scikit-learn>=1.5,<2" "skl2onnx>=1.18,<2" "numpy>=1.26,<3" "tokenizers>=0.20,<1" \
        "sympy" "packaging" >&2
    touch "$stamp"
fi
echo "$dir"
