//! The step change: open-loop load stepping from 20 % to 90 % of the limit, and
//! how fast Flumen's batcher and concurrency limiter follow it.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use flumen_engine::{Engine, EngineConfig};
use futures::{Stream, StreamExt};
use tokio::time::Instant;

use super::system::{flumen_stream, sim};
use super::Plan;
use crate::load::{drive, open_loop, Scheduled};
use crate::svg::{line_chart, Series};

/// Runs the step change on Flumen: the Markdown section and its two plots (limit
/// and mean batch size over time).
pub(super) async fn step_change(plan: &Plan) -> (String, Vec<(String, String)>) {
    let Plan {
        ref base,
        limit,
        run_for,
        grace,
        seed,
        ..
    } = *plan;
    let mut md = String::new();
    // Step change: 20 % → 90 % of the limit; how fast the batcher and limiter follow.
    let _ = writeln!(md, "## Step change: 20 % → 90 % of the limit (Flumen)\n");
    let backend = sim(base);
    let engine = Engine::from_arc(Arc::clone(&backend), EngineConfig::default());
    let half = run_for;
    let step_input = open_loop(limit * 0.2, half, Some(seed)).chain(open_loop_after(
        limit * 0.9,
        half,
        half,
        seed,
    ));
    let sampler = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut samples = Vec::new();
            let mut last = engine.stats();
            while t0.elapsed() < half * 2 + grace {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let s = engine.stats();
                let calls = s.calls - last.calls;
                let batch = if calls == 0 {
                    0.0
                } else {
                    (s.records_sent - last.records_sent) as f64 / calls as f64
                };
                samples.push((t0.elapsed().as_secs_f64(), s.limit as f64, batch));
                last = s;
            }
            samples
        })
    };
    let step_run = drive(
        flumen_stream(Box::pin(step_input), &engine),
        half * 2 + grace,
    )
    .await;
    let samples = sampler.await.unwrap_or_default();
    let step_at = step_run.start + half;
    let target = limit * 0.9;
    let converged = (0..40)
        .map(|i| step_at + Duration::from_millis(250 * i))
        .find(|t| {
            step_run
                .completions
                .rate(*t, *t + Duration::from_millis(500))
                >= 0.9 * target
        })
        .map(|t| t.duration_since(step_at));
    let step_secs = half.as_secs_f64();
    let batch_grown = samples
        .iter()
        .find(|s| s.0 > step_secs && s.2 >= 0.6 * base.max_batch as f64)
        .map(|s| s.0 - step_secs);
    let _ = writeln!(
        md,
        "The load steps up at {step_secs:.0} s. Flumen's throughput reached 90 % of the new load ({:.0}/s) {}; its mean batch size passed 60 % of the maximum {}. Limit and mean batch size, sampled every 100 ms:\n\n![limit over time](step_limit.svg)\n\n![batch size over time](step_batch.svg)\n",
        target,
        match converged {
            Some(d) => format!("within {} ms of the step (first 500 ms slice at ≥ 90 %)", d.as_millis()),
            None => "not within 10 s".into(),
        },
        match batch_grown {
            Some(d) => format!("{:.0} ms after it", d * 1e3),
            None => "not at all".into(),
        }
    );
    let limit_series = Series {
        name: "concurrency limit".into(),
        points: samples.iter().map(|s| (s.0, s.1)).collect(),
    };
    let batch_series = Series {
        name: "mean batch size".into(),
        points: samples.iter().map(|s| (s.0, s.2)).collect(),
    };
    let plots = vec![
        (
            "step_limit.svg".to_string(),
            line_chart(
                "Concurrency limit after a 20 % → 90 % step",
                "seconds",
                "calls in flight allowed",
                &[limit_series],
            ),
        ),
        (
            "step_batch.svg".to_string(),
            line_chart(
                "Mean batch size after a 20 % → 90 % step",
                "seconds",
                "records per call",
                &[batch_series],
            ),
        ),
    ];
    (md, plots)
}

/// Open-loop arrivals that start after `delay`.
fn open_loop_after(
    rate: f64,
    duration: Duration,
    delay: Duration,
    seed: u64,
) -> impl Stream<Item = Scheduled> + Send + 'static {
    futures::stream::once(tokio::time::sleep(delay))
        .map(move |()| open_loop(rate, duration, Some(seed + 1)))
        .flatten()
}
