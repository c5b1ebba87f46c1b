//! `cargo bench --bench local`: all-MiniLM-L6-v2 on this machine's CPU three ways, on
//! the same 1,024 seeded sentences of 4–128 words, at batch 1, 8, 32 and 128, two
//! threads each, tokenization, pooling and normalisation included everywhere:
//!
//! - the embedded backend (`flumen-embed`: ragged batches, no padding, its own
//!   kernels), calls of B sentences one after another;
//! - the ONNX backend (`flumen-onnx`) on the encoder that `scripts/bert_onnx.py`
//!   writes from the same safetensors, calls of B sentences (sorted by length
//!   within the call and run in groups, each padded to its own longest);
//! - ONNX Runtime called directly from Python on the same file (`scripts/bench_ort.py`),
//!   as exported ("plain"), through onnxruntime's transformer optimizer
//!   ("optimized"), and as exported on the corpus sorted by length ("sorted").
//!
//! `RESULT embedded_vs_ort_b32=… ort_backend_vs_ort_python_b32=… embedded_b1_vs_ort_b1=…`
//! (goals ≥ 1.2, ≥ 1.0, ≥ 1.0): the embedded backend against ORT at its best of the
//! three; the ONNX backend against ORT from Python on the same unsorted stream (the
//! cost of the binding, the tokenizer and the pooling).

use std::path::Path;
use std::process::Command;

use flumen_bench::corpus::corpus;
use flumen_bench::report::{result_line, Table};
use flumen_core::Backend;
use flumen_embed::{EmbedConfig, Embedder};
use flumen_onnx::{Onnx, OnnxConfig, Pooling, TextConfig};
use serde_json::Value;
use tokio::time::Instant;

const SENTENCES: usize = 1_024;
const BATCHES: [usize; 4] = [1, 8, 32, 128];
const THREADS: usize = 2;

fn root() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../..")
}

/// `scripts/onnx.sh`'s directory.
fn deps() -> String {
    let out = Command::new("bash")
        .arg(format!("{}/scripts/onnx.sh", root()))
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "scripts/onnx.sh failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn embedded(model: &Embedder, texts: &[String], batch: usize) -> f64 {
    let start = Instant::now();
    let mut done = 0;
    for chunk in texts.chunks(batch) {
        done += model.embed(chunk.to_vec()).await.expect("embeds").len();
    }
    done as f64 / start.elapsed().as_secs_f64()
}

async fn ort_backend(model: &Onnx, texts: &[String], batch: usize) -> f64 {
    let start = Instant::now();
    let mut done = 0;
    for chunk in texts.chunks(batch) {
        let records: Vec<Value> = chunk.iter().map(|t| Value::String(t.clone())).collect();
        done += model
            .call(&records)
            .await
            .expect("the call")
            .into_iter()
            .filter(Result::is_ok)
            .count();
    }
    done as f64 / start.elapsed().as_secs_f64()
}

/// (graph, batch) → sentences/s from ONNX Runtime in Python.
fn ort_python(
    deps: &str,
    model: &Path,
    tokenizer: &Path,
    texts: &[String],
) -> Vec<(String, usize, f64)> {
    let corpus_file =
        std::env::temp_dir().join(format!("flumen-local-corpus-{}.jsonl", std::process::id()));
    let lines: String = texts
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
        .collect();
    std::fs::write(&corpus_file, lines).expect("the corpus file");
    let out = Command::new("python3")
        .arg(format!("{}/scripts/bench_ort.py", root()))
        .arg(model)
        .arg(tokenizer)
        .arg(&corpus_file)
        .arg(THREADS.to_string())
        .args(BATCHES.iter().map(usize::to_string))
        .env("PYTHONPATH", deps)
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_file(&corpus_file);
    assert!(
        out.status.success(),
        "bench_ort.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            (
                v["graph"].as_str().unwrap_or("?").to_owned(),
                v["batch"].as_u64().unwrap_or(0) as usize,
                v["per_s"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let deps = deps();
    let config = EmbedConfig {
        threads: THREADS,
        max_batch_items: 128,
        max_batch_tokens: None,
        ..EmbedConfig::default()
    };
    let dir = config
        .model
        .resolve()
        .await
        .expect("all-MiniLM-L6-v2 is available");
    let embedder = Embedder::load(config).await.expect("the model loads");
    let onnx_file = std::env::temp_dir().join(format!("flumen-local-{}.onnx", std::process::id()));
    let out = Command::new("python3")
        .arg(format!("{}/scripts/bert_onnx.py", root()))
        .arg(&dir)
        .arg(&onnx_file)
        .env("PYTHONPATH", &deps)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "bert_onnx.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runtime =
        flumen_onnx::runtime_in(Path::new(&deps)).expect("libonnxruntime.so in the wheel");
    let tokenizer = dir.join("tokenizer.json");
    let onnx = Onnx::load(&OnnxConfig {
        model: onnx_file.clone(),
        runtime,
        threads: THREADS,
        max_batch_items: 128,
        text: Some(TextConfig {
            tokenizer: tokenizer.clone(),
            pooling: Pooling::Mean,
            normalize: true,
            max_tokens: 256,
        }),
    })
    .expect("the exported model loads");
    let texts = corpus(SENTENCES, 7);
    println!(
        "local benchmark: all-MiniLM-L6-v2, {SENTENCES} sentences of 4–128 words, {THREADS} threads everywhere\n"
    );
    // Warm-up.
    embedder.embed(texts[..32].to_vec()).await.expect("embeds");
    ort_backend(&onnx, &texts[..32], 32).await;
    let mut rows = Vec::new();
    for &b in &BATCHES {
        let e = embedded(&embedder, &texts, b).await;
        let o = ort_backend(&onnx, &texts, b).await;
        rows.push((b, e, o));
    }
    let python = ort_python(&deps, &onnx_file, &tokenizer, &texts);
    let _ = std::fs::remove_file(&onnx_file);
    let py = |graph: &str, b: usize| {
        python
            .iter()
            .find(|(g, pb, _)| g == graph && *pb == b)
            .map_or(f64::NAN, |(_, _, v)| *v)
    };
    // ORT at its best, whichever way: as exported, optimized, or on a corpus
    // sorted by length (less padding; a stream cannot sort, but the bar is ORT's).
    let best = |b: usize| {
        py("plain", b)
            .max(py("optimized", b))
            .max(py("plain, sorted", b))
    };
    let mut table = Table::new(&[
        "batch",
        "embedded /s",
        "ORT backend /s",
        "ORT Python plain /s",
        "ORT Python optimized /s",
        "ORT Python sorted /s",
        "embedded ÷ best ORT",
        "ORT backend ÷ ORT Python plain",
    ]);
    for &(b, e, o) in &rows {
        table.row(vec![
            b.to_string(),
            format!("{e:.1}"),
            format!("{o:.1}"),
            format!("{:.1}", py("plain", b)),
            format!("{:.1}", py("optimized", b)),
            format!("{:.1}", py("plain, sorted", b)),
            format!("{:.2}", e / best(b)),
            format!("{:.2}", o / py("plain", b)),
        ]);
    }
    println!("{}", table.render());
    let at = |b: usize| rows.iter().find(|r| r.0 == b).copied().expect("measured");
    let (_, e32, o32) = at(32);
    let (_, e1, _) = at(1);
    println!(
        "{}",
        result_line(&[
            ("embedded_vs_ort_b32", format!("{:.2}", e32 / best(32))),
            (
                "ort_backend_vs_ort_python_b32",
                format!("{:.2}", o32 / py("plain", 32))
            ),
            ("embedded_b1_vs_ort_b1", format!("{:.2}", e1 / best(1))),
        ])
    );
}
