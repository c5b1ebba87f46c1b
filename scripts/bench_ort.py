#!/usr/bin/env python3
"""The ONNX Runtime side of `cargo bench --bench local`: the exported encoder run by
ONNX Runtime from Python on the same corpus at each batch size, tokenization (the
`tokenizers` package, the model's tokenizer.json), padding, mean pooling and
normalisation included, with `threads` intra-op threads; as exported ("plain"),
through onnxruntime's transformer optimizer's Python fusions (attention, LayerNorm,
GELU; `opt_level=0`, which needs no PyTorch: "optimized"), and as exported on the
corpus sorted by length ("plain, sorted"). Prints one JSON line per graph and batch
size.

usage: bench_ort.py MODEL.onnx TOKENIZER_JSON CORPUS_JSONL THREADS BATCH [BATCH ...]
"""
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def session(path, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def optimized(path, hidden, heads):
    from onnxruntime.transformers.optimizer import optimize_model

    out = os.path.join(tempfile.mkdtemp(), "optimized.onnx")
    optimize_model(path, model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0).save_model_to_file(out)
    return out


def embed(sess, tokenizer, texts):
    encodings = tokenizer.encode_batch(texts)
    seq = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(texts), seq), dtype=np.int64)
    mask = np.zeros((len(texts), seq), dtype=np.int64)
    for i, e in enumerate(encodings):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    hidden = sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def main():
    model, tokenizer_file, corpus, threads = sys.argv[1:5]
    threads = int(threads)
    batches = [int(b) for b in sys.argv[5:]]
    tokenizer = Tokenizer.from_file(tokenizer_file)
    tokenizer.no_padding()
    tokenizer.enable_truncation(256)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    # The corpus as it comes, and sorted by length first (what sentence-transformers'
    # encode does, and what a stream cannot: it pads each batch far less).
    by_length = sorted(texts, key=lambda t: len(tokenizer.encode(t).ids))
    graphs = [("plain", model, texts), ("optimized", optimized(model, 384, 12), texts),
              ("plain, sorted", model, by_length)]
    for name, path, corpus in graphs:
        sess = session(path, threads)
        embed(sess, tokenizer, corpus[:32])  # warm-up
        for batch in batches:
            start = time.perf_counter()
            done = 0
            for i in range(0, len(corpus), batch):
                done += len(embed(sess, tokenizer, corpus[i : i + batch]))
            seconds = time.perf_counter() - start
            print(json.dumps({"graph": name, "batch": batch, "per_s": done / seconds,
                              "onnxruntime": ort.__version__, "threads": threads}), flush=True)


if __name__ == "__main__":
    main()
