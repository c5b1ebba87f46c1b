//! What users run today, implemented faithfully on any Flumen [`Backend`], so that
//! a benchmark can drive them with the same load against the same backend.
//!
//! - [`per_record`]: Flink Async I/O `unorderedWait` (and `ML_PREDICT` with
//!   `ALLOW_UNORDERED`): one call per record, at most `capacity` in flight; the
//!   operator stops taking input when full.
//! - [`fixed_batch`]: Ray Serve `@serve.batch` (and the proposed Flink
//!   `AsyncBatchWaitOperator`): collect up to `max_batch` records, waiting at most
//!   `wait` from the first one, then call; one batch in flight.

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
                let result = backend.call(&one).await;
                outcomes::<B, _>(vec![record], result)
                    .pop()
                    .expect("one record in, one out")
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
}
