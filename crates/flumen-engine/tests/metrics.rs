//! The engine reports through the `metrics` facade, with the names and labels of
//! `flumen_engine::telemetry`.

use std::sync::Arc;

use flumen_engine::{telemetry, Engine, EngineConfig, InferExt, OperatorConfig};
use flumen_sim::{Faults, Sim, SimConfig};
use futures::{stream, StreamExt};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;

#[test]
fn batches_latencies_and_outcomes_are_reported() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        // A current-thread runtime runs every task on this thread, where the
        // local recorder is installed.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let sim = Arc::new(Sim::new(SimConfig {
                faults: Faults {
                    item_error_rate: 0.25,
                    ..Faults::default()
                },
                seed: 3,
                ..SimConfig::default()
            }));
            let engine = Engine::from_arc(
                sim,
                EngineConfig {
                    name: "m".into(),
                    ..EngineConfig::default()
                },
            );
            let outcomes: Vec<_> = stream::iter(0..1_000u64)
                .infer(&engine, OperatorConfig::default(), |&i| {
                    if i == 7 {
                        Err("bad".into())
                    } else {
                        Ok(i)
                    }
                })
                .collect()
                .await;
            assert_eq!(outcomes.len(), 1_000);
        });
    });

    let mut counters = std::collections::HashMap::new();
    let mut histograms = std::collections::HashMap::new();
    for (key, _unit, _desc, value) in snapshotter.snapshot().into_vec() {
        let name = key.key().name().to_owned();
        let labels: Vec<String> = key
            .key()
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        assert!(labels.contains(&"engine=m".to_owned()), "{name} {labels:?}");
        match (key.kind(), value) {
            (MetricKind::Counter, DebugValue::Counter(n)) => {
                counters.insert(labels.join(","), n);
            }
            (MetricKind::Histogram, DebugValue::Histogram(v)) => {
                histograms.insert(name, v.len());
            }
            _ => {}
        }
    }
    let ok = counters["engine=m,outcome=ok"];
    let transient = counters["engine=m,outcome=transient"];
    let invalid = counters["engine=m,outcome=invalid_input"];
    assert_eq!(ok + transient + invalid, 1_000, "{counters:?}");
    assert_eq!(invalid, 1);
    // A quarter of the items fail once; retries rescue nearly all of them.
    let retried = counters["engine=m,kind=transient"];
    assert!((150..400).contains(&retried), "{retried} retries");
    assert!(transient < 30, "{transient} still failed after retries");
    // One end-to-end and queue-time sample per record sent; one batch size and
    // latency per call.
    assert_eq!(histograms[telemetry::END_TO_END_LATENCY], 1_000);
    assert_eq!(histograms[telemetry::QUEUE_TIME], 999);
    assert_eq!(
        histograms[telemetry::ATTEMPTS],
        999,
        "one per record the engine answered"
    );
    assert_eq!(
        histograms[telemetry::BATCH_SIZE],
        histograms[telemetry::BACKEND_LATENCY]
    );
}
