//! Load generators and latency summaries.

use std::time::Duration;

use futures::Stream;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;

/// A generated record: its id and when it was scheduled to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    /// Sequence number from 0.
    pub id: u64,
    /// When the generator meant to send it; latency is measured from here, so time
    /// spent waiting behind backpressure counts (no coordinated omission).
    pub at: Instant,
    /// When the generator actually handed it over: later than `at` by the timer's
    /// resolution (about 1 ms) even with no backpressure, or by the backpressure.
    pub emitted: Instant,
}

/// Open-loop arrivals at `rate` records/s for `duration`: evenly spaced, or Poisson
/// (exponential gaps from a seeded generator). A record is yielded at its scheduled
/// time or, if the consumer is behind, as soon as it is polled.
pub fn open_loop(
    rate: f64,
    duration: Duration,
    poisson: Option<u64>,
) -> impl Stream<Item = Scheduled> + Send + 'static {
    let start = Instant::now();
    let end = start + duration;
    let mut rng = poisson.map(ChaCha8Rng::seed_from_u64);
    let mut next = start;
    futures::stream::unfold(0u64, move |id| {
        let at = next;
        let gap = match rng.as_mut() {
            Some(rng) => -(1.0 - rng.random::<f64>()).ln() / rate,
            None => 1.0 / rate,
        };
        next += Duration::from_secs_f64(gap);
        async move {
            if at >= end {
                return None;
            }
            tokio::time::sleep_until(at).await;
            let emitted = Instant::now();
            Some((Scheduled { id, at, emitted }, id + 1))
        }
    })
}

/// A backlog of `n` records, all scheduled now; each is handed over when the
/// consumer takes it (so latency "from hand-over" excludes time in the backlog).
pub fn backlog(n: u64) -> impl Stream<Item = Scheduled> + Send + 'static {
    let at = Instant::now();
    futures::stream::iter((0..n).map(move |id| Scheduled {
        id,
        at,
        emitted: Instant::now(),
    }))
}

/// Percentiles of a set of latencies.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    /// How many samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

impl Summary {
    /// Summarises `samples` (nearest-rank percentiles).
    pub fn of(mut samples: Vec<Duration>) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1]
        };
        Summary {
            count: samples.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
        }
    }
}

/// Completion times of a run, for throughput over a window.
#[derive(Debug, Clone, Default)]
pub struct Completions {
    times: Vec<Instant>,
}

impl Completions {
    /// Records one completion now.
    pub fn push(&mut self, at: Instant) {
        self.times.push(at);
    }

    /// How many completions so far.
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// Completions per second within `[from, to)`.
    pub fn rate(&self, from: Instant, to: Instant) -> f64 {
        let n = self
            .times
            .iter()
            .filter(|t| **t >= from && **t < to)
            .count();
        n as f64 / to.duration_since(from).as_secs_f64()
    }
}

/// What one system did with one load.
#[derive(Debug, Clone)]
pub struct Run {
    /// When each outcome arrived.
    pub completions: Completions,
    /// Latency of each outcome from its scheduled send time.
    pub latencies: Vec<Duration>,
    /// Latency of each outcome from the moment the generator handed it over.
    pub from_emission: Vec<Duration>,
    /// Successful outcomes, with their latency from the scheduled send time.
    pub succeeded: Vec<Duration>,
    /// Failed outcomes.
    pub failed: usize,
    /// When the run started.
    pub start: Instant,
}

impl Run {
    /// Percentiles of the latency from the scheduled send time.
    pub fn summary(&self) -> Summary {
        Summary::of(self.latencies.clone())
    }

    /// Percentiles of the latency from the hand-over.
    pub fn emission_summary(&self) -> Summary {
        Summary::of(self.from_emission.clone())
    }

    /// Successes within `slo` per second of `window`.
    pub fn goodput(&self, slo: Duration, window: Duration) -> f64 {
        let good = self.succeeded.iter().filter(|l| **l <= slo).count();
        good as f64 / window.as_secs_f64()
    }
}

/// Drains `outcomes` until the stream ends or `limit` passes.
pub async fn drive<T, E>(
    outcomes: impl Stream<Item = (Scheduled, Result<T, E>)>,
    limit: Duration,
) -> Run {
    use futures::StreamExt;
    let start = Instant::now();
    let mut run = Run {
        completions: Completions::default(),
        latencies: Vec::new(),
        from_emission: Vec::new(),
        succeeded: Vec::new(),
        failed: 0,
        start,
    };
    let outcomes = outcomes.take_until(tokio::time::sleep(limit));
    futures::pin_mut!(outcomes);
    while let Some((s, result)) = outcomes.next().await {
        let now = Instant::now();
        let latency = now.duration_since(s.at);
        run.completions.push(now);
        run.latencies.push(latency);
        run.from_emission.push(now.duration_since(s.emitted));
        match result {
            Ok(_) => run.succeeded.push(latency),
            Err(_) => run.failed += 1,
        }
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Summary::of((1..=100).map(Duration::from_millis).collect());
        assert_eq!(
            (s.p50, s.p90, s.p99),
            (
                Duration::from_millis(50),
                Duration::from_millis(90),
                Duration::from_millis(99)
            )
        );
        assert_eq!(Summary::of(vec![]).count, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_keeps_its_schedule() {
        use futures::StreamExt;
        let t0 = Instant::now();
        let items: Vec<_> = open_loop(100.0, Duration::from_secs(1), None)
            .collect()
            .await;
        assert_eq!(items.len(), 100);
        assert_eq!(items[10].at - t0, Duration::from_millis(100));
        let poisson: Vec<_> = open_loop(100.0, Duration::from_secs(10), Some(1))
            .collect()
            .await;
        assert!((900..1100).contains(&poisson.len()), "{}", poisson.len());
    }
}
