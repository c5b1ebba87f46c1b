//! `cargo bench --bench embedded`: all-MiniLM-L6-v2 on this machine's CPU, Flumen's
//! embedded backend against sentence-transformers (PyTorch) on the same corpus, in the
//! same run.
//!
//! The corpus: 1,024 English-like sentences of 4–128 words (seeded). For each batch
//! size B (1, 8, 32, 128):
//! - Flumen direct: calls of B sentences, one after another (each call split across
//!   the model's threads) — what PyTorch's `encode(batch_size=B)` does;
//! - Flumen engine: the whole corpus through the engine with batches of at most B and
//!   adaptive concurrency (what a pipeline gets);
//! - PyTorch: `SentenceTransformer.encode(corpus, batch_size=B)` on the CPU with
//!   torch's default threads (`scripts/bench_st.py`), when `scripts/sentence-transformers.sh`
//!   can install it (skip with `FLUMEN_BENCH_NO_PYTORCH=1`).
//!
//! Results match the reference within cosine 0.9999 (see flumen-embed's tests), so
//! this compares equal work.

use std::process::Command;
use std::sync::Arc;

use flumen_bench::corpus::corpus;
use flumen_bench::report::{result_line, Table};
use flumen_embed::{EmbedConfig, Embedder};
use flumen_engine::{BatchConfig, Engine, EngineConfig, InferExt, OperatorConfig};
use futures::StreamExt;
use tokio::time::Instant;

const SENTENCES: usize = 1_024;
const BATCHES: [usize; 4] = [1, 8, 32, 128];

async fn direct(model: &Embedder, texts: &[String], batch: usize) -> f64 {
    let start = Instant::now();
    let mut done = 0;
    for chunk in texts.chunks(batch) {
        done += model.embed(chunk.to_vec()).await.expect("embeds").len();
    }
    done as f64 / start.elapsed().as_secs_f64()
}

async fn through_engine(model: &Arc<Embedder>, texts: &[String], batch: usize) -> (f64, usize) {
    let engine = Engine::from_arc(
        Arc::clone(model),
        EngineConfig {
            batch: BatchConfig {
                max_items: Some(batch),
                ..BatchConfig::default()
            },
            ..EngineConfig::default()
        },
    );
    let start = Instant::now();
    let outcomes: Vec<_> = futures::stream::iter(texts.to_vec())
        .infer(&engine, OperatorConfig::default(), |t| Ok(t.clone()))
        .collect()
        .await;
    let secs = start.elapsed().as_secs_f64();
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    (outcomes.len() as f64 / secs, failed)
}

/// sentences/s per batch size from sentence-transformers, or why there are none.
fn pytorch(
    model_dir: &std::path::Path,
    texts: &[String],
) -> Result<Vec<(usize, f64, String)>, String> {
    if std::env::var("FLUMEN_BENCH_NO_PYTORCH").is_ok_and(|v| v == "1") {
        return Err("skipped (FLUMEN_BENCH_NO_PYTORCH=1)".into());
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let install = Command::new("bash")
        .arg(format!("{root}/scripts/sentence-transformers.sh"))
        .output()
        .map_err(|e| format!("cannot run the installer: {e}"))?;
    if !install.status.success() {
        return Err(format!(
            "install failed: {}",
            String::from_utf8_lossy(&install.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    let pythonpath = String::from_utf8_lossy(&install.stdout).trim().to_owned();
    let corpus_file =
        std::env::temp_dir().join(format!("flumen-embed-corpus-{}.jsonl", std::process::id()));
    let lines: String = texts
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
        .collect();
    std::fs::write(&corpus_file, lines).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("python3");
    cmd.arg(format!("{root}/scripts/bench_st.py"))
        .arg(model_dir)
        .arg(&corpus_file)
        .args(BATCHES.iter().map(usize::to_string))
        .env("PYTHONPATH", pythonpath)
        .env("TOKENIZERS_PARALLELISM", "false");
    let out = cmd.output().map_err(|e| format!("python3: {e}"))?;
    let _ = std::fs::remove_file(&corpus_file);
    if !out.status.success() {
        return Err(format!(
            "bench_st.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            (
                v["batch"].as_u64().unwrap_or(0) as usize,
                v["per_s"].as_f64().unwrap_or(f64::NAN),
                format!(
                    "torch {} with {} threads",
                    v["torch"].as_str().unwrap_or("?"),
                    v["threads"]
                ),
            )
        })
        .collect())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let config = EmbedConfig {
        max_batch_items: *BATCHES.iter().max().expect("batches"),
        max_batch_tokens: None,
        ..EmbedConfig::default()
    };
    let dir = config
        .model
        .resolve()
        .await
        .expect("all-MiniLM-L6-v2 is available");
    let model = Arc::new(Embedder::load(config).await.expect("the model loads"));
    let texts = corpus(SENTENCES, 7);
    let pieces: usize = texts.iter().map(|t| model.tokenize(t).len()).sum();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "embedded benchmark: all-MiniLM-L6-v2, {SENTENCES} sentences of 4–128 words ({:.0} word pieces on average), {cores} cores, {:?}\n",
        pieces as f64 / SENTENCES as f64,
        model
    );
    // Warm-up: page the weights in, settle the CPU's clocks.
    let _ = direct(&model, &texts[..64], 32).await;

    let mut flumen = Vec::new();
    for &b in &BATCHES {
        let d = direct(&model, &texts, b).await;
        let (e, failed) = through_engine(&model, &texts, b).await;
        assert_eq!(failed, 0, "no record may fail");
        flumen.push((b, d, e));
    }
    let torch = pytorch(&dir, &texts);

    let mut table = Table::new(&[
        "batch",
        "Flumen direct",
        "Flumen engine",
        "PyTorch (sentence-transformers)",
        "direct / PyTorch",
        "engine / PyTorch",
    ]);
    let torch_at = |b: usize| match &torch {
        Ok(rows) => rows.iter().find(|r| r.0 == b).map(|r| r.1),
        Err(_) => None,
    };
    for &(b, d, e) in &flumen {
        let t = torch_at(b);
        table.row(vec![
            b.to_string(),
            format!("{d:.0}/s"),
            format!("{e:.0}/s"),
            t.map_or("n/a".into(), |t| format!("{t:.0}/s")),
            t.map_or("n/a".into(), |t| format!("{:.2}×", d / t)),
            t.map_or("n/a".into(), |t| format!("{:.2}×", e / t)),
        ]);
    }
    print!("{}", table.render());
    match &torch {
        Ok(rows) => println!(
            "\nPyTorch: {}",
            rows.first().map_or("no rows", |r| r.2.as_str())
        ),
        Err(why) => println!("\nPyTorch: not measured: {why}"),
    }
    let b32 = flumen.iter().find(|r| r.0 == 32).expect("batch 32");
    let ratio = torch_at(32).map_or("na".into(), |t| format!("{:.2}", b32.1 / t));
    println!(
        "{}",
        result_line(&[
            ("st_per_s_b32", format!("{:.0}", b32.1)),
            ("engine_per_s_b32", format!("{:.0}", b32.2)),
            (
                "pytorch_per_s_b32",
                torch_at(32).map_or("na".into(), |t| format!("{t:.0}"))
            ),
            ("ratio_vs_pytorch_b32", ratio),
        ])
    );
}
