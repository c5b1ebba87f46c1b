#!/usr/bin/env python3
"""Writes a tiny random BERT sentence model and its reference vectors, so the tests
check a shape other than all-MiniLM-L6-v2's (2 layers, 48 wide, 4 heads, CLS pooling,
no normalisation, 40 positions) against an independent implementation
(transformers + sentence-transformers on PyTorch).

Run by scripts/embed_reference.sh; writes crates/flumen-embed/tests/data/tiny-bert/.
usage: tiny_bert.py MINILM_DIR OUT_DIR
"""
import json
import os
import sys

import torch
from sentence_transformers import SentenceTransformer, models
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast


def main():
    minilm, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    # A 1,205-piece vocabulary: the five specials, then MiniLM's pieces 999..2199
    # (single characters, their ## forms, the most common words), in MiniLM's
    # normaliser, pre-tokeniser and post-processor.
    with open(f"{minilm}/tokenizer.json", encoding="utf-8") as f:
        spec = json.load(f)
    old = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = specials + [t for t, i in old if 999 <= i < 2200 and t not in specials]
    vocab = {t: i for i, t in enumerate(pieces)}
    spec["model"]["vocab"] = vocab
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    for name, special in spec["post_processor"]["special_tokens"].items():
        special["ids"] = [vocab[name]]
    spec["truncation"] = None
    spec["padding"] = None
    work = f"{out}/.work"
    os.makedirs(work, exist_ok=True)
    with open(f"{work}/tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=f"{work}/tokenizer.json",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_max_length=40,
    )

    torch.manual_seed(1234)
    config = BertConfig(
        vocab_size=len(pieces),
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=40,
        type_vocab_size=2,
    )
    bert = BertModel(config, add_pooling_layer=False)
    # Larger weights than the default init so every layer matters to the output.
    with torch.no_grad():
        for p in bert.parameters():
            p.normal_(0.0, 0.2)
    bert.save_pretrained(work, safe_serialization=True)
    tokenizer.save_pretrained(work)

    transformer = models.Transformer(work, max_seq_length=40)
    pooling = models.Pooling(48, pooling_mode="cls")
    model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    model.save(out)

    texts = [
        "",
        "the of and",
        "a b c d e f g",
        "THE QUICK",
        " ".join(["the"] * 60),  # past the 40 positions: truncated
        "été",
    ]
    with torch.no_grad():
        vectors = model.encode(texts, batch_size=1, convert_to_numpy=True)
    ids = [model.tokenizer(t, truncation=True, max_length=40)["input_ids"] for t in texts]
    with open(f"{out}/reference.json", "w", encoding="utf-8") as f:
        json.dump(
            {
                "produced_by": "scripts/tiny_bert.py",
                "cases": [
                    {"text": t, "token_ids": i, "embedding": [float(x) for x in v]}
                    for t, i, v in zip(texts, ids, vectors)
                ],
            },
            f,
            ensure_ascii=False,
        )
    for name in os.listdir(work):
        os.remove(f"{work}/{name}")
    os.rmdir(work)
    print(f"wrote a tiny BERT sentence model to {out}")


if __name__ == "__main__":
    main()
