//! The ONNX backend on real models exported by the project's scripts from PyPI
//! packages (`scripts/onnx.sh`): a scikit-learn gradient-boosted classifier through
//! skl2onnx, compared with scikit-learn's own predictions; and the models it must
//! refuse at start — missing, corrupt, without a batch dimension — each named.

use std::path::{Path, PathBuf};
use std::process::Command;

use flumen_core::Backend;
use flumen_onnx::{Onnx, OnnxConfig, OnnxError};
use serde_json::{json, Value};

/// Where `scripts/onnx.sh` installed ONNX Runtime and the exporters.
fn deps() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/onnx.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "scripts/onnx.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// ONNX Runtime's library in the wheel.
fn runtime(deps: &Path) -> PathBuf {
    let capi = deps.join("onnxruntime/capi");
    std::fs::read_dir(&capi)
        .expect("the onnxruntime wheel")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .expect("libonnxruntime.so in the wheel")
}

fn python(deps: &Path, args: &[&str]) {
    let out = Command::new("python3")
        .args(args)
        .env("PYTHONPATH", deps)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn config(model: &Path, runtime: PathBuf) -> OnnxConfig {
    OnnxConfig {
        model: model.to_owned(),
        runtime,
        threads: 2,
        max_batch_items: 64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scikit_learn_classifier_answers_as_scikit_learn_does_and_bad_models_are_named() {
    let deps = deps();
    let dir = tempfile::tempdir().unwrap();
    let (model, reference) = (dir.path().join("gbc.onnx"), dir.path().join("gbc.json"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/sklearn_onnx.py");
    python(
        &deps,
        &[script, model.to_str().unwrap(), reference.to_str().unwrap()],
    );
    let onnx = Onnx::load(&config(&model, runtime(&deps))).expect("the model loads");
    assert_eq!(
        onnx.signature(),
        json!({"inputs": [{"name": "features", "datatype": "F32", "shape": [-1, 6]}],
               "outputs": [{"name": "label", "datatype": "I64", "shape": [-1]},
                           {"name": "probabilities", "datatype": "F32", "shape": [-1, 3]}]})
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
    let rows: Vec<Value> = r["rows"].as_array().unwrap().clone();
    // A bad row among them fails alone, naming the input.
    let mut batch = rows.clone();
    batch.insert(3, json!([1, 2, 3]));
    let answers = onnx.call(&batch).await.unwrap();
    let bad = answers[3].as_ref().unwrap_err();
    assert!(
        bad.message.contains("input `features`") && bad.message.contains("[3]"),
        "{}",
        bad.message
    );
    let answers: Vec<Value> = answers
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, a)| a.unwrap())
        .collect();
    let mut worst: f64 = 0.0;
    for (k, a) in answers.iter().enumerate() {
        assert_eq!(a["label"], r["label"][k], "row {k}");
        for (p, q) in a["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .zip(r["probabilities"][k].as_array().unwrap())
        {
            worst = worst.max((p.as_f64().unwrap() - q.as_f64().unwrap()).abs());
        }
    }
    assert!(worst < 1e-5, "probabilities differ by {worst}");

    // Refused at start, each saying why.
    let missing = dir.path().join("missing.onnx");
    assert!(matches!(
        Onnx::load(&config(&missing, runtime(&deps))),
        Err(OnnxError::Missing(p)) if p.ends_with("missing.onnx")
    ));
    let corrupt = dir.path().join("corrupt.onnx");
    std::fs::write(&corrupt, b"not a model at all").unwrap();
    let e = Onnx::load(&config(&corrupt, runtime(&deps))).err().unwrap();
    assert!(matches!(e, OnnxError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("corrupt.onnx"), "{e}");
    let fixed = dir.path().join("fixed.onnx");
    python(
        &deps,
        &[
            "-c",
            "import sys, onnx; from onnx import helper as h, TensorProto as T; \
             g = h.make_graph([h.make_node('Identity', ['x'], ['y'])], 'fixed', \
             [h.make_tensor_value_info('x', T.FLOAT, [2, 3])], [h.make_tensor_value_info('y', T.FLOAT, [2, 3])]); \
             m = h.make_model(g, opset_imports=[h.make_opsetid('', 17)]); m.ir_version = 8; onnx.save(m, sys.argv[1])",
            fixed.to_str().unwrap(),
        ],
    );
    let e = Onnx::load(&config(&fixed, runtime(&deps))).err().unwrap();
    assert_eq!(
        e,
        OnnxError::NoBatch {
            what: "input",
            name: "x".into(),
            shape: vec![2, 3]
        }
    );
    assert!(e.to_string().contains("no batch dimension"), "{e}");
}
