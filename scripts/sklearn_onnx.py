#!/usr/bin/env python3
"""Trains a small seeded scikit-learn classifier (a gradient-boosted tree ensemble
on 6 numeric features, 3 classes) and exports it to ONNX with skl2onnx — the ONNX
backend's non-text model — with the reference framework's own predictions for a
set of rows, to compare the backend's outputs against.

Outputs: `label` (int64, [batch]) and `probabilities` (float32, [batch, 3]); input
`features` (float32, [batch, 6]).

usage: sklearn_onnx.py OUT.onnx OUT_REFERENCE.json
"""
import json
import sys

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import make_classification
from sklearn.ensemble import GradientBoostingClassifier

X, y = make_classification(n_samples=600, n_features=6, n_informative=4, n_classes=3,
                           random_state=7)
X = X.astype(np.float32)
model = GradientBoostingClassifier(n_estimators=40, max_depth=3, random_state=7).fit(X[:500], y[:500])
onx = to_onnx(model, X[:1], options={id(model): {"zipmap": False}},
              initial_types=None, target_opset=17)
# Names a user would read: the input and both outputs.
onx.graph.input[0].name, old_in = "features", onx.graph.input[0].name
for node in onx.graph.node:
    node.input[:] = ["features" if i == old_in else i for i in node.input]
renames = {onx.graph.output[0].name: "label", onx.graph.output[1].name: "probabilities"}
for node in onx.graph.node:
    node.output[:] = [renames.get(o, o) for o in node.output]
for out in onx.graph.output:
    out.name = renames[out.name]
with open(sys.argv[1], "wb") as f:
    f.write(onx.SerializeToString())
rows = X[500:]
json.dump({
    "produced_by": "scripts/sklearn_onnx.py",
    "rows": rows.tolist(),
    "label": model.predict(rows).tolist(),
    "probabilities": model.predict_proba(rows).tolist(),
}, open(sys.argv[2], "w"))
print(f"{len(rows)} reference rows, accuracy {float((model.predict(rows) == y[500:]).mean()):.3f}")
