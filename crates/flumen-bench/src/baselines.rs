//! What users run today, implemented faithfully on any Flumen [`Backend`], so that
//! a benchmark can drive them with the same load against the same backend.
//!
//! - [`per_record`]: Flink Async I/O `unorderedWait` (and `ML_PREDICT` with
//!   `ALLOW_UNORDERED`): one call per record, at most `capacity` in flight; the
//!   operator stops taking input when full.
//! - [`fixed_batch`]: Ray Serve `@serve.batch` (and the proposed Flink
//!   `AsyncBatchWaitOperator`): collect up to `max_batch` records, waiting at most
//!   `wait` from the first one, then call; one batch in flight.
//! - [`ml_predict`]: Flink SQL `ML_PREDICT` at its defaults: one call per record,
//!   `max-concurrent-operations` 10, output ORDERED, error strategy RETRY with
//!   `retry-num` retries after a fixed delay (no budget, no `Retry-After`), and a
//!   timeout that fails the record.

use std::sync::Arc;
use std::time::Duration;

use flumen_core::{Backend, Failure};
use futures::{Stream, StreamExt};
use tokio::time::{sleep_until, Instant};

/// A baseline's outcome: the record and its result.
pub type BaselineOutcome<R, O> = (R, Result<O, Failure>);

fn outcomes<B: Backend, R>(
    records: Vec<R>,
    result: flumen_core::BatchResult<B::Output>,
) -> Vec<BaselineOutcome<R, B::Output>> {
    match result {
        Ok(results) => records
            .into_iter()
            .zip(results)
            .map(|(r, o)| (r, o.map_err(|e| Failure::from_backend(e, 1))))
            .collect(),
        Err(e) => records
            .into_iter()
            .map(|r| (r, Err(Failure::from_backend(e.clone(), 1))))
            .collect(),
    }
}

/// The one result of a one-record call.
fn single<O>(result: flumen_core::BatchResult<O>) -> Result<O, flumen_core::BackendError> {
    let mut results = result?;
    match (results.pop(), results.is_empty()) {
        (Some(one), true) => one,
        _ => Err(flumen_core::BackendError::permanent(
            "backend returned a wrong result count",
        )),
    }
}

/// Flink Async I/O semantics: one backend call per record, `capacity` in flight,
/// outcomes as they complete.
pub fn per_record<S, B, F>(
    input: S,
    backend: Arc<B>,
    capacity: usize,
    extract: F,
) -> impl Stream<Item = BaselineOutcome<S::Item, B::Output>>
where
    S: Stream,
    B: Backend,
    F: Fn(&S::Item) -> B::Input,
{
    input
        .map(move |record| {
            let backend = Arc::clone(&backend);
            let one = [extract(&record)];
            async move {
                let result = single(backend.call(&one).await);
                (record, result.map_err(|e| Failure::from_backend(e, 1)))
            }
        })
        .buffer_unordered(capacity.max(1))
}

/// Ray Serve `@serve.batch` semantics: a batch closes at `max_batch` records or
/// `wait` after its first record, whichever is first; one batch in flight.
pub fn fixed_batch<S, B, F>(
    input: S,
    backend: Arc<B>,
    max_batch: usize,
    wait: Duration,
    extract: F,
) -> impl Stream<Item = BaselineOutcome<S::Item, B::Output>>
where
    S: Stream + Unpin,
    B: Backend,
    F: Fn(&S::Item) -> B::Input,
{
    let state = (input.fuse(), backend, extract);
    futures::stream::unfold(state, move |(mut input, backend, extract)| async move {
        let first = input.next().await?;
        let mut batch = vec![first];
        let close = Instant::now() + wait;
        while batch.len() < max_batch {
            tokio::select! {
                next = input.next() => match next {
                    Some(r) => batch.push(r),
                    None => break,
                },
                () = sleep_until(close) => break,
            }
        }
        let inputs: Vec<_> = batch.iter().map(&extract).collect();
        let result = backend.call(&inputs).await;
        let done = outcomes::<B, _>(batch, result);
        Some((futures::stream::iter(done), (input, backend, extract)))
    })
    .flatten()
}

/// Settings of [`ml_predict`].
#[derive(Debug, Clone, Copy)]
pub struct MlPredict {
    /// `max-concurrent-operations` (Flink's default: 10).
    pub concurrency: usize,
    /// `retry-num` (the OpenAI provider's default: 100).
    pub retries: u32,
    /// The fixed delay between attempts (Flink has no jitter and ignores `Retry-After`).
    pub retry_delay: Duration,
    /// `timeout` per record, all attempts included (default: 3 min).
    pub timeout: Duration,
}

impl Default for MlPredict {
    fn default() -> Self {
        MlPredict {
            concurrency: 10,
            retries: 100,
            retry_delay: Duration::from_millis(100),
            timeout: Duration::from_secs(180),
        }
    }
}

/// Flink `ML_PREDICT` semantics: one call per record, ordered output, `concurrency`
/// in flight, every error retried after a fixed delay up to `retries` times, and a
/// per-record timeout that fails the record.
pub fn ml_predict<S, B, F>(
    input: S,
    backend: Arc<B>,
    settings: MlPredict,
    extract: F,
) -> impl Stream<Item = BaselineOutcome<S::Item, B::Output>>
where
    S: Stream,
    B: Backend,
    F: Fn(&S::Item) -> B::Input,
{
    input
        .map(move |record| {
            let backend = Arc::clone(&backend);
            let one = [extract(&record)];
            async move {
                let attempts = async {
                    let mut n = 0;
                    loop {
                        n += 1;
                        match single(backend.call(&one).await) {
                            Ok(output) => return Ok(output),
                            Err(e) if n > settings.retries => {
                                return Err(Failure::from_backend(e, n))
                            }
                            Err(_) => tokio::time::sleep(settings.retry_delay).await,
                        }
                    }
                };
                let result = match tokio::time::timeout(settings.timeout, attempts).await {
                    Ok(r) => r,
                    Err(_) => Err(Failure::new(
                        flumen_core::ErrorKind::Timeout,
                        "ML_PREDICT timeout",
                        0,
                    )),
                };
                (record, result)
            }
        })
        .buffered(settings.concurrency.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flumen_sim::{Sim, SimConfig};

    #[tokio::test(start_paused = true)]
    async fn per_record_makes_one_call_per_record_with_capacity_in_flight() {
        let sim = Arc::new(Sim::new(SimConfig::default()));
        let t0 = Instant::now();
        let out: Vec<_> = per_record(
            futures::stream::iter(0..10u64),
            Arc::clone(&sim),
            100,
            |x| *x,
        )
        .collect()
        .await;
        assert_eq!(out.len(), 10);
        assert_eq!((sim.stats().calls, sim.stats().max_batch), (10, 1));
        // Two slots, 20.5 ms each: five rounds.
        assert_eq!(t0.elapsed(), Duration::from_millis(105));
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_batch_waits_from_the_first_record_and_keeps_one_batch_in_flight() {
        let sim = Arc::new(Sim::new(SimConfig::default()).recording());
        let t0 = Instant::now();
        let out: Vec<_> = fixed_batch(
            futures::stream::iter(0..25u64),
            Arc::clone(&sim),
            10,
            Duration::from_millis(10),
            |x| *x,
        )
        .collect()
        .await;
        assert_eq!(out.len(), 25);
        let sizes: Vec<_> = sim.calls().iter().map(|c| c.items).collect();
        assert_eq!(sizes, vec![10, 10, 5]);
        assert_eq!(sim.stats().max_busy, 1);
        // Two full batches go at once (25 ms each); the input then ends, so the last
        // five go at once too (22.5 ms, rounded up by the timer).
        assert_eq!(t0.elapsed(), Duration::from_millis(25 + 25 + 23));

        // A lone record waits the full timeout even with an idle backend.
        let t1 = Instant::now();
        let one: Vec<_> = fixed_batch(
            futures::stream::iter(0..1u64).chain(futures::stream::pending()),
            Arc::clone(&sim),
            10,
            Duration::from_millis(10),
            |x| *x,
        )
        .take(1)
        .collect()
        .await;
        assert_eq!(one.len(), 1);
        assert_eq!(t1.elapsed(), Duration::from_millis(31));
    }

    #[tokio::test(start_paused = true)]
    async fn ml_predict_retries_after_a_fixed_delay_and_keeps_order() {
        use flumen_core::ErrorKind;
        use flumen_sim::{Faults, Outage};
        // Down for the first 250 ms: every record retries every 100 ms until then.
        let sim = Arc::new(Sim::new(SimConfig {
            faults: Faults {
                outages: vec![Outage {
                    from: Duration::ZERO,
                    until: Duration::from_millis(250),
                    kind: ErrorKind::Overloaded,
                }],
                ..Faults::default()
            },
            ..SimConfig::default()
        }));
        let out: Vec<_> = ml_predict(
            futures::stream::iter(0..20u64),
            Arc::clone(&sim),
            MlPredict::default(),
            |x| *x,
        )
        .collect()
        .await;
        let ids: Vec<u64> = out.iter().map(|o| o.0).collect();
        assert_eq!(ids, (0..20).collect::<Vec<_>>());
        assert!(out.iter().all(|o| o.1.is_ok()));
        // 10 in flight, three rejected tries each (0, 100, 200 ms), then success.
        assert!(sim.stats().overloaded >= 30, "{:?}", sim.stats());
        let failed: Vec<_> = ml_predict(
            futures::stream::iter(0..3u64),
            Arc::new(Sim::new(SimConfig {
                faults: Faults {
                    call_error_rate: 1.0,
                    ..Faults::default()
                },
                ..SimConfig::default()
            })),
            MlPredict {
                retries: 2,
                ..MlPredict::default()
            },
            |x| *x,
        )
        .collect()
        .await;
        assert!(failed
            .iter()
            .all(|o| o.1.as_ref().unwrap_err().attempts == 3));
    }
}
