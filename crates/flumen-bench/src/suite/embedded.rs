//! The embedded all-MiniLM-L6-v2 on a backlog of review texts, every call counted.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use flumen_engine::{Engine, EngineConfig, InferExt, OperatorConfig};
use futures::StreamExt;

use super::system::System;
use crate::baselines::{fixed_batch, per_record};
use crate::load::{backlog, drive, Scheduled};
use crate::report::{ms, Table};

/// Counts calls and records per call of any backend.
struct Counted<B> {
    inner: B,
    calls: std::sync::atomic::AtomicU64,
    items: std::sync::atomic::AtomicU64,
}

impl<B: flumen_core::Backend> flumen_core::Backend for Counted<B> {
    type Input = B::Input;
    type Output = B::Output;

    fn capabilities(&self) -> flumen_core::Capabilities {
        self.inner.capabilities()
    }

    fn cost(&self, input: &B::Input) -> flumen_core::ItemCost {
        self.inner.cost(input)
    }

    async fn call(&self, batch: &[B::Input]) -> flumen_core::BatchResult<B::Output> {
        use std::sync::atomic::Ordering::Relaxed;
        self.calls.fetch_add(1, Relaxed);
        self.items.fetch_add(batch.len() as u64, Relaxed);
        self.inner.call(batch).await
    }
}

/// The embedded all-MiniLM-L6-v2 on a backlog of short review texts: Flumen against
/// a per-record client (Async I/O) and fixed batching (Ray Serve's defaults).
pub(super) async fn embedded_backlog(warmup: Duration, window: Duration) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut md = String::from("## Embedded all-MiniLM-L6-v2: backlog drain\n\n");
    let model = match flumen_embed::Embedder::load(flumen_embed::EmbedConfig::default()).await {
        Ok(m) => Arc::new(Counted {
            inner: m,
            calls: Default::default(),
            items: Default::default(),
        }),
        Err(e) => {
            let _ = writeln!(md, "Not measured: the model could not be loaded: {e}\n");
            return md;
        }
    };
    let texts: Arc<Vec<String>> = Arc::new(
        include_str!("../../../../examples/data/reviews.jsonl")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["text"].as_str().map(str::to_owned))
            .collect(),
    );
    let text = {
        let texts = Arc::clone(&texts);
        move |s: &Scheduled| texts[s.id as usize % texts.len()].clone()
    };
    let mut table = Table::new(&[
        "system",
        "sentences/s",
        "p99 from hand-over",
        "calls/record",
        "batch mean",
        "failed",
        "Flumen ×",
    ]);
    let mut rows = Vec::new();
    for system in [System::Flumen, System::AsyncIo, System::RayServe] {
        let (c0, i0) = (model.calls.load(Relaxed), model.items.load(Relaxed));
        let input = backlog(10_000_000);
        let run = match system {
            System::Flumen => {
                let engine = Engine::from_arc(Arc::clone(&model), EngineConfig::default());
                let t = text.clone();
                let out = input
                    .infer(&engine, OperatorConfig::default(), move |s| Ok(t(s)))
                    .map(|o| (o.record, o.result.map(|_| ())));
                drive(out, warmup + window).await
            }
            System::AsyncIo => {
                let out = per_record(input, Arc::clone(&model), 100, text.clone())
                    .map(|(r, res)| (r, res.map(|_| ())));
                drive(out, warmup + window).await
            }
            _ => {
                let out = fixed_batch(
                    input,
                    Arc::clone(&model),
                    10,
                    Duration::from_millis(10),
                    text.clone(),
                )
                .map(|(r, res)| (r, res.map(|_| ())));
                drive(out, warmup + window).await
            }
        };
        let (calls, items) = (
            model.calls.load(Relaxed) - c0,
            model.items.load(Relaxed) - i0,
        );
        let from = run.start + warmup;
        let rate = run.completions.rate(from, from + window);
        rows.push((
            system,
            rate,
            run.emission_summary().p99,
            calls,
            items,
            run.failed,
        ));
    }
    let flumen = rows[0].1;
    for (system, rate, p99, calls, items, failed) in rows {
        table.row(vec![
            system.name().into(),
            format!("{rate:.0}/s"),
            ms(p99),
            format!("{:.3}", calls as f64 / items.max(1) as f64),
            format!("{:.1}", items as f64 / calls.max(1) as f64),
            failed.to_string(),
            format!("{:.2}", flumen / rate.max(1e-9)),
        ]);
    }
    md.push_str(&table.render());
    md.push_str("\nThe model runs in this process on all cores (a ragged batch split across its threads), so batching buys less than against a remote server: no per-call network or framework overhead to amortise, only GEMM efficiency and thread hand-offs.\n\n");
    md
}
