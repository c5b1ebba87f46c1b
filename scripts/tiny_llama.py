"""Writes a tiny random-weight llama model as GGUF, for llama.cpp's llama-server in
the LLM pipeline tests: no weights can be downloaded here, and the tests need a
real server, not a good model. 2 blocks, width 64, 4 heads, a SentencePiece-style
vocabulary with every byte token and ChatML's control tokens, a ChatML chat
template. Seeded: the same file every time. Usage: tiny_llama.py OUT.gguf
"""

import sys

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

N_EMBD, N_BLOCKS, N_FF, N_HEAD, CTX = 64, 2, 128, 4, 8192

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def vocabulary():
    tokens, scores, types = [], [], []

    def add(text, score, kind):
        tokens.append(text)
        scores.append(score)
        types.append(kind)

    add("<unk>", 0.0, TokenType.UNKNOWN)
    add("<s>", 0.0, TokenType.CONTROL)
    add("</s>", 0.0, TokenType.CONTROL)
    add("<|im_start|>", 0.0, TokenType.CONTROL)
    add("<|im_end|>", 0.0, TokenType.CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, TokenType.BYTE)
    # Printable characters, then a few words with SentencePiece's word marker.
    pieces = [chr(c) for c in range(33, 127)] + ["\u2581"]
    words = "the a of and to in is it that for on with as was yes no good bad ok json".split()
    pieces += ["\u2581" + w for w in words]
    for i, p in enumerate(pieces):
        add(p, -float(i + 1), TokenType.NORMAL)
    return tokens, scores, types


def main(out):
    rng = np.random.default_rng(17)
    tokens, scores, types = vocabulary()
    w = GGUFWriter(out, "llama")
    w.add_context_length(CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_BLOCKS)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(4)  # <|im_end|> ends a ChatML turn
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def weight(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    vocab = len(tokens)
    w.add_tensor("token_embd.weight", weight(vocab, N_EMBD))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", weight(vocab, N_EMBD))
    for i in range(N_BLOCKS):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"{b}.{name}.weight", weight(N_EMBD, N_EMBD))
        w.add_tensor(f"{b}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"{b}.ffn_gate.weight", weight(N_FF, N_EMBD))
        w.add_tensor(f"{b}.ffn_up.weight", weight(N_FF, N_EMBD))
        w.add_tensor(f"{b}.ffn_down.weight", weight(N_EMBD, N_FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1])
