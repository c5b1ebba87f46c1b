//! The systems compared and how each one runs on the simulated backend.

use std::sync::Arc;
use std::time::Duration;

use flumen_core::Failure;
use flumen_engine::{Engine, EngineConfig, InferExt, OperatorConfig};
use flumen_sim::{Sim, SimConfig};
use futures::{Stream, StreamExt};

use crate::baselines::{fixed_batch, ml_predict, per_record, MlPredict};
use crate::load::{drive, Run, Scheduled};

/// The systems compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// Flumen with its defaults (adaptive batching and concurrency, retries).
    Flumen,
    /// Flink Async I/O, unordered, capacity 100, one call per record.
    AsyncIo,
    /// Flink ML_PREDICT defaults: 10 concurrent, ordered, retries without budget.
    MlPredict,
    /// The proposed Flink AsyncBatchWaitOperator: 32 records or 20 ms, one batch in flight.
    AsyncBatchWait,
    /// Ray Serve `@serve.batch` defaults: 10 records or 10 ms, one batch in flight.
    RayServe,
}

impl System {
    /// All, Flumen first.
    pub const ALL: [System; 5] = [
        System::Flumen,
        System::AsyncIo,
        System::MlPredict,
        System::AsyncBatchWait,
        System::RayServe,
    ];

    /// The name in tables.
    pub fn name(self) -> &'static str {
        match self {
            System::Flumen => "Flumen (defaults)",
            System::AsyncIo => "Flink Async I/O (cap 100)",
            System::MlPredict => "Flink ML_PREDICT (10, ordered)",
            System::AsyncBatchWait => "Flink AsyncBatchWait (32, 20 ms)",
            System::RayServe => "Ray Serve batch (10, 10 ms)",
        }
    }
}

/// A fresh simulator that records its calls.
pub(super) fn sim(config: &SimConfig) -> Arc<Sim<u64>> {
    Arc::new(Sim::new(config.clone()).recording())
}

/// Flumen's operator over `input` (capacity 2,048), outcomes with their records.
pub(super) fn flumen_stream<S>(
    input: S,
    engine: &Engine<Sim<u64>>,
) -> impl Stream<Item = (Scheduled, Result<u64, Failure>)>
where
    S: Stream<Item = Scheduled> + Send + 'static,
{
    let config = OperatorConfig {
        capacity: 2_048,
        ..OperatorConfig::default()
    };
    input
        .infer(engine, config, |s| Ok(s.id))
        .map(|o| (o.record, o.result))
}

/// Runs `system` on `input` against `backend` for `limit`.
pub(super) async fn run_system<S>(
    system: System,
    input: S,
    backend: &Arc<Sim<u64>>,
    limit: Duration,
) -> Run
where
    S: Stream<Item = Scheduled> + Send + Unpin + 'static,
{
    let id = |s: &Scheduled| s.id;
    match system {
        System::Flumen => {
            let engine = Engine::from_arc(Arc::clone(backend), EngineConfig::default());
            drive(flumen_stream(input, &engine), limit).await
        }
        System::AsyncIo => drive(per_record(input, Arc::clone(backend), 100, id), limit).await,
        System::MlPredict => {
            drive(
                ml_predict(input, Arc::clone(backend), MlPredict::default(), id),
                limit,
            )
            .await
        }
        System::AsyncBatchWait | System::RayServe => {
            // 32 records or 20 ms (AsyncBatchWait), 10 records or 10 ms (Ray Serve).
            let (max_batch, wait_ms) = if system == System::AsyncBatchWait {
                (32, 20)
            } else {
                (10, 10)
            };
            drive(
                fixed_batch(
                    input,
                    Arc::clone(backend),
                    max_batch,
                    Duration::from_millis(wait_ms),
                    id,
                ),
                limit,
            )
            .await
        }
    }
}
