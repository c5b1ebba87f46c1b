#!/usr/bin/env python3
"""The PyTorch side of `cargo bench --bench embedded`: sentence-transformers encodes the
same corpus at each batch size on the CPU, and prints one JSON line per batch size.

usage: bench_st.py MODEL_DIR CORPUS_JSONL BATCH [BATCH ...]
"""
import json
import sys
import time

import torch
from sentence_transformers import SentenceTransformer


def main():
    model_dir, corpus = sys.argv[1], sys.argv[2]
    batches = [int(b) for b in sys.argv[3:]]
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    model = SentenceTransformer(model_dir, device="cpu")
    with torch.inference_mode():
        model.encode(texts[:64], batch_size=32)  # warm-up
        for batch in batches:
            start = time.perf_counter()
            vectors = model.encode(texts, batch_size=batch, convert_to_numpy=True)
            seconds = time.perf_counter() - start
            assert len(vectors) == len(texts)
            print(
                json.dumps(
                    {
                        "batch": batch,
                        "sentences": len(texts),
                        "seconds": seconds,
                        "per_s": len(texts) / seconds,
                        "threads": torch.get_num_threads(),
                        "torch": torch.__version__,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
