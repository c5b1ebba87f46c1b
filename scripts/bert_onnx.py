#!/usr/bin/env python3
"""Exports a BERT-family encoder (all-MiniLM-L6-v2 and its kin) to ONNX from its
`config.json` and `model.safetensors`, with no framework: the graph is written op by
op with `onnx.helper`, the weights read straight from the safetensors file (numpy).
No model hub, no PyTorch: what the ONNX backend's tests need from PyPI alone.

Inputs `input_ids`, `attention_mask`, `token_type_ids` (int64, [batch, seq]); output
`last_hidden_state` (float32, [batch, seq, hidden]) — what Hugging Face's exports
give, so pooling and normalisation stay the runtime's (declared in its config).

usage: bert_onnx.py MODEL_DIR OUT.onnx [--check REFERENCE_JSON]
  --check runs the exported graph with ONNX Runtime on the reference's token ids,
  mean-pools and normalises, and prints the worst cosine against its embeddings.
"""
import json
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # LayerNormalization


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        dtype = {"F32": np.float32, "F16": np.float16, "I64": np.int64}[meta["dtype"]]
        out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(meta["shape"]).astype(
            np.float32 if dtype != np.int64 else np.int64
        )
    return out


def export(model_dir, out_path):
    config = json.load(open(f"{model_dir}/config.json"))
    w = read_safetensors(f"{model_dir}/model.safetensors")
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in w else ""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head = hidden // heads
    eps = config.get("layer_norm_eps", 1e-12)
    if config.get("hidden_act", "gelu") != "gelu":
        raise SystemExit(f"hidden_act {config['hidden_act']} is not supported (gelu only)")
    nodes, inits = [], []

    named = set()

    def const(name, array):
        if name not in named:
            named.add(name)
            inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(name):
        return const(name, w[prefix + name])

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(x, layer_name, out):
        # y = x · Wᵀ + b, with Wᵀ stored once.
        wt = const(f"{layer_name}.weight.T", w[prefix + layer_name + ".weight"].T.copy())
        return node("Add", [node("MatMul", [x, wt], out + ".mm"), weight(layer_name + ".bias")], out)

    def layer_norm(x, name, out):
        return node("LayerNormalization", [x, weight(name + ".weight"), weight(name + ".bias")],
                    out, axis=-1, epsilon=eps)

    # Embeddings: words + positions + token types, normalised.
    seq = node("Gather", [node("Shape", ["input_ids"], "shape"), const("one_i", np.array(1))], "seq")
    positions = node("Range", [const("zero_i", np.array(0)), seq, const("step_i", np.array(1))], "positions")
    words = node("Gather", [weight("embeddings.word_embeddings.weight"), "input_ids"], "emb.words")
    pos = node("Gather", [weight("embeddings.position_embeddings.weight"), positions], "emb.pos")
    types = node("Gather", [weight("embeddings.token_type_embeddings.weight"), "token_type_ids"], "emb.types")
    x = node("Add", [node("Add", [words, pos], "emb.wp"), types], "emb.sum")
    x = layer_norm(x, "embeddings.LayerNorm", "emb.out")

    # The attention mask as an additive bias: [batch, 1, 1, seq], 0 or -10000.
    mask = node("Cast", ["attention_mask"], "mask.f", to=TensorProto.FLOAT)
    mask = node("Unsqueeze", [mask, const("axes_12", np.array([1, 2]))], "mask.4d")
    bias = node("Mul", [node("Sub", [const("one_f", np.array(1.0, np.float32)), mask], "mask.inv"),
                        const("neg", np.array(-10000.0, np.float32))], "mask.bias")
    split_shape = const("split_shape", np.array([0, 0, heads, head]))
    merge_shape = const("merge_shape", np.array([0, 0, hidden]))
    scale = const("scale", np.array(1.0 / np.sqrt(head), np.float32))

    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"

        def heads_of(name, perm):
            t = linear(x, f"{p}.attention.self.{name}", f"{p}.{name}")
            t = node("Reshape", [t, split_shape], f"{p}.{name}.split")
            return node("Transpose", [t], f"{p}.{name}.t", perm=perm)

        q = heads_of("query", [0, 2, 1, 3])
        k = heads_of("key", [0, 2, 3, 1])
        v = heads_of("value", [0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [q, k], f"{p}.qk"), scale], f"{p}.scaled")
        probs = node("Softmax", [node("Add", [scores, bias], f"{p}.masked")], f"{p}.probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], f"{p}.ctx")], f"{p}.ctx.t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge_shape], f"{p}.ctx.merged")
        attn = linear(ctx, f"{p}.attention.output.dense", f"{p}.attn")
        x1 = layer_norm(node("Add", [attn, x], f"{p}.attn.res"), f"{p}.attention.output.LayerNorm", f"{p}.x1")
        inter = linear(x1, f"{p}.intermediate.dense", f"{p}.inter")
        # GELU, exact: 0.5 · x · (1 + erf(x / √2)).
        erf = node("Erf", [node("Div", [inter, const("sqrt2", np.array(np.sqrt(2.0), np.float32))], f"{p}.gelu.div")], f"{p}.gelu.erf")
        gelu = node("Mul", [node("Mul", [inter, node("Add", [erf, "one_f"], f"{p}.gelu.add")], f"{p}.gelu.mul"),
                            const("half", np.array(0.5, np.float32))], f"{p}.gelu")
        out = linear(gelu, f"{p}.output.dense", f"{p}.out")
        x = layer_norm(node("Add", [out, x1], f"{p}.out.res"), f"{p}.output.LayerNorm", f"{p}.x2")

    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="last_hidden_state"))
    ints = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
    graph = helper.make_graph(
        nodes, "bert",
        [ints("input_ids"), ints("attention_mask"), ints("token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="flumen scripts/bert_onnx.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out_path)


def check(out_path, reference_path):
    import onnxruntime as ort

    session = ort.InferenceSession(out_path, providers=["CPUExecutionProvider"])
    cases = json.load(open(reference_path))["cases"]
    worst = 1.0
    for case in cases:
        ids = np.array([case["token_ids"]], dtype=np.int64)
        mask = np.ones_like(ids)
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                    "token_type_ids": np.zeros_like(ids)})[0]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        ref = np.array(case["embedding"], dtype=np.float64)
        cos = float(pooled[0].astype(np.float64) @ ref / np.linalg.norm(ref))
        worst = min(worst, cos)
    print(f"{len(cases)} cases, worst cosine {worst:.9f}")
    return worst


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    export(sys.argv[1], sys.argv[2])
    if len(sys.argv) == 5 and sys.argv[3] == "--check":
        if check(sys.argv[2], sys.argv[4]) < 0.99999:
            raise SystemExit("the export does not match the reference")
