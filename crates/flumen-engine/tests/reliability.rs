//! Fault scenarios on a paused clock with the seeded simulator: each asserts exactly
//! one outcome per record and zero loss, and what the faults must not cause.

use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{assert_exactly_once, ms};
use flumen_core::ErrorKind;
use flumen_engine::{
    AimdConfig, BreakerConfig, BreakerState, BreakerWindow, ConcurrencyConfig, Engine,
    EngineConfig, Fallback, InferExt, OperatorConfig, Outcome, RetryConfig, Served,
};
use flumen_sim::{Faults, Outage, Sim, SimConfig};
use futures::{stream, Stream, StreamExt};
use tokio::time::{sleep, Instant};

fn secs(v: u64) -> Duration {
    Duration::from_secs(v)
}

fn outage(from: Duration, until: Duration, kind: ErrorKind) -> Outage {
    Outage { from, until, kind }
}

fn engine(sim: &Arc<Sim<u64>>, config: EngineConfig) -> Engine<Sim<u64>> {
    Engine::from_arc(Arc::clone(sim), config)
}

async fn run<B: flumen_core::Backend<Input = u64, Output = u64>>(
    input: impl Stream<Item = u64>,
    engine: &Engine<B>,
    capacity: usize,
    timeout: Duration,
) -> Vec<Outcome<u64, u64>> {
    let config = OperatorConfig {
        capacity,
        timeout: Some(timeout),
        ..OperatorConfig::default()
    };
    input.infer(engine, config, |&i| Ok(i)).collect().await
}

fn failures(outcomes: &[Outcome<u64, u64>]) -> Vec<(u64, String)> {
    outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err().map(|f| (o.record, f.to_string())))
        .collect()
}

/// One record every `every`, `n` of them.
fn trickle(n: u64, every: Duration) -> impl Stream<Item = u64> {
    stream::iter(0..n).then(move |i| async move {
        sleep(every).await;
        i
    })
}

#[tokio::test(start_paused = true)]
async fn bursts_of_5xx_are_ridden_out_without_loss() {
    let bursts = [1_000, 2_500, 4_000]
        .map(|t| outage(ms(t), ms(t + 300), ErrorKind::Transient))
        .to_vec();
    let sim = Arc::new(Sim::new(SimConfig {
        faults: Faults {
            outages: bursts,
            ..Faults::default()
        },
        ..SimConfig::default()
    }));
    let engine = engine(&sim, EngineConfig::default());
    let n = 15_000;
    let outcomes = run(stream::iter(0..n), &engine, 1_000, secs(30)).await;
    assert_exactly_once(&outcomes, n);
    assert_eq!(failures(&outcomes), vec![]);
    let stats = sim.stats();
    assert!(
        stats.items > n,
        "the bursts made retries: {} items sent",
        stats.items
    );
}

#[tokio::test(start_paused = true)]
async fn only_the_failed_items_of_a_partly_failed_batch_are_sent_again() {
    let sim = Arc::new(Sim::new(SimConfig {
        seed: 21,
        faults: Faults {
            item_error_rate: 0.25,
            ..Faults::default()
        },
        ..SimConfig::default()
    }));
    let engine = engine(
        &sim,
        EngineConfig {
            retry: RetryConfig {
                max_attempts: 100,
                ..RetryConfig::default()
            },
            ..EngineConfig::default()
        },
    );
    let n = 5_000;
    let outcomes = run(stream::iter(0..n), &engine, 1_000, secs(60)).await;
    assert_exactly_once(&outcomes, n);
    assert_eq!(failures(&outcomes), vec![]);
    // Each item that failed was sent exactly once more; its neighbours were not.
    let stats = sim.stats();
    assert!(stats.item_errors > n / 5, "{stats:?}");
    assert_eq!(stats.items, n + stats.item_errors, "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn calls_stalled_past_the_attempt_timeout_are_retried_without_loss() {
    let sim = Arc::new(Sim::new(SimConfig {
        seed: 5,
        faults: Faults {
            stall_rate: 0.1,
            stall: secs(3_600),
            ..Faults::default()
        },
        ..SimConfig::default()
    }));
    let engine = engine(
        &sim,
        EngineConfig {
            attempt_timeout: Some(ms(200)),
            ..EngineConfig::default()
        },
    );
    let n = 5_000;
    let t0 = Instant::now();
    let outcomes = run(stream::iter(0..n), &engine, 1_000, secs(10)).await;
    assert_exactly_once(&outcomes, n);
    assert_eq!(failures(&outcomes), vec![]);
    // An hour-long stall was cut at 200 ms each time.
    assert!(t0.elapsed() < secs(10), "{:?}", t0.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_429_storm_is_waited_out_as_asked_and_never_trips_the_breaker() {
    let sim = Arc::new(
        Sim::new(SimConfig {
            faults: Faults {
                outages: vec![outage(secs(1), secs(3), ErrorKind::Overloaded)],
                retry_after: Some(ms(250)),
                ..Faults::default()
            },
            ..SimConfig::default()
        })
        .recording(),
    );
    let engine = engine(
        &sim,
        EngineConfig {
            breaker: Some(BreakerConfig {
                min_calls: 3,
                ..BreakerConfig::default()
            }),
            ..EngineConfig::default()
        },
    );
    let n = 8_000;
    let outcomes = run(stream::iter(0..n), &engine, 1_000, secs(30)).await;
    assert_exactly_once(&outcomes, n);
    assert_eq!(failures(&outcomes), vec![]);
    let calls = sim.calls();
    let rejected: Vec<Instant> = calls
        .iter()
        .filter(|c| c.error == Some(ErrorKind::Overloaded))
        .map(|c| c.finished)
        .collect();
    assert!(rejected.len() >= 2, "{} rejected calls", rejected.len());
    // Two seconds of storm, one round of calls per Retry-After: about 8 rounds of
    // at most the two calls that were in flight together.
    assert!(rejected.len() <= 20, "{} rejected calls", rejected.len());
    // After a 429, no call is sent before its Retry-After has passed.
    for at in &rejected {
        let early = calls
            .iter()
            .filter(|c| c.arrived > *at && c.arrived < *at + ms(250))
            .count();
        assert_eq!(early, 0, "{early} calls within 250 ms of a 429");
    }
    assert_eq!(
        engine.breaker_transitions(),
        vec![],
        "overload is not failure"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backend_down_for_30_s_opens_the_breaker_and_loses_nothing() {
    let down = (secs(2), secs(32));
    let sim = Arc::new(
        Sim::new(SimConfig {
            faults: Faults {
                outages: vec![outage(down.0, down.1, ErrorKind::Transient)],
                ..Faults::default()
            },
            ..SimConfig::default()
        })
        .recording(),
    );
    let probes = 2;
    let min_calls = 5;
    let engine = engine(
        &sim,
        EngineConfig {
            breaker: Some(BreakerConfig {
                window: BreakerWindow::Count(10),
                min_calls,
                failure_rate: 0.5,
                open_wait: secs(5),
                half_open_probes: probes,
                ..BreakerConfig::default()
            }),
            ..EngineConfig::default()
        },
    );
    let t0 = Instant::now();
    let n = 4_000;
    // 100 records/s for 40 s; they wait (within a 60 s deadline) while it is down.
    let outcomes = run(trickle(n, ms(10)), &engine, 5_000, secs(60)).await;
    assert_exactly_once(&outcomes, n);
    assert_eq!(failures(&outcomes), vec![]);

    let transitions = engine.breaker_transitions();
    let calls = sim.calls();
    let failed_before_open = calls
        .iter()
        .filter(|c| c.error.is_some() && c.arrived < transitions[0].0)
        .count();
    assert!(matches!(transitions[0].1, BreakerState::Open { .. }));
    assert!(
        failed_before_open <= min_calls,
        "{failed_before_open} failed calls before it opened"
    );
    let (last_at, last) = *transitions.last().unwrap();
    assert_eq!(last, BreakerState::Closed);
    assert!(
        last_at - t0 >= down.1,
        "closed at {:?}, before recovery",
        last_at - t0
    );

    // No call reaches the backend while the breaker is open; at most `probes` while
    // it is half-open. (A call arriving at the very instant the breaker opened was
    // sent before the result that opened it was in: on a paused clock they share
    // the instant.)
    for (i, (from, state)) in transitions.iter().enumerate() {
        let until = transitions.get(i + 1).map(|t| t.0);
        let opened_at = |c: &&flumen_sim::CallRecord| match state {
            BreakerState::Open { .. } => c.arrived > *from,
            _ => c.arrived >= *from,
        };
        let during = calls
            .iter()
            .filter(opened_at)
            .filter(|c| until.is_none_or(|u| c.arrived < u))
            .count();
        match state {
            BreakerState::Open { .. } => assert_eq!(during, 0, "calls while open at {from:?}"),
            BreakerState::HalfOpen => assert!(during <= probes, "{during} probes"),
            BreakerState::Closed => {}
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_poison_record_fails_alone_and_its_neighbours_succeed() {
    let sim = Arc::new(
        Sim::new(SimConfig::default())
            .with_poison(|&i| i == 17)
            .recording(),
    );
    // A budget large enough for the whole bisection at once (64 + 32 + … re-sends),
    // so that it shows in its textbook form.
    let engine = engine(
        &sim,
        EngineConfig {
            concurrency: ConcurrencyConfig::Fixed(1),
            retry: RetryConfig {
                budget_burst: 1_000.0,
                ..RetryConfig::default()
            },
            ..EngineConfig::default()
        },
    );
    let outcomes = run(stream::iter(0..64), &engine, 100, secs(30)).await;
    assert_exactly_once(&outcomes, 64);
    let failed = failures(&outcomes);
    assert_eq!(failed.len(), 1, "{failed:?}");
    let poison = outcomes.iter().find(|o| o.record == 17).unwrap();
    let f = poison.result.as_ref().unwrap_err();
    assert_eq!(f.kind, ErrorKind::Permanent);
    // The batch of 64, then halves down to the record alone: 1 + 6 calls for it.
    assert_eq!(f.attempts, 7);
    let calls = sim.calls();
    assert_eq!(calls[0].items, 64);
    assert_eq!(
        calls.len(),
        1 + 2 * 6,
        "bisection takes two calls per halving"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_that_would_start_after_the_deadline_times_out_once() {
    let sim = Arc::new(
        Sim::new(SimConfig {
            faults: Faults {
                call_error_rate: 1.0,
                ..Faults::default()
            },
            ..SimConfig::default()
        })
        .recording(),
    );
    let engine = engine(
        &sim,
        EngineConfig {
            retry: RetryConfig {
                max_attempts: 100,
                initial_backoff: ms(100),
                ..RetryConfig::default()
            },
            seed: 11,
            ..EngineConfig::default()
        },
    );
    let t0 = Instant::now();
    let deadline = ms(300);
    let outcomes = run(stream::iter(0..50), &engine, 100, deadline).await;
    assert_exactly_once(&outcomes, 50);
    for o in &outcomes {
        let f = o.result.as_ref().unwrap_err();
        assert_eq!(f.kind, ErrorKind::Timeout, "{f}");
        assert!(f.attempts >= 1, "{f}");
    }
    assert!(
        sim.calls().iter().all(|c| c.arrived - t0 < deadline),
        "no attempt starts after the deadline"
    );
    // Nothing arrives late: the engine holds no more records.
    sleep(secs(10)).await;
    let stats = engine.stats();
    assert_eq!((stats.queued, stats.in_flight), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn the_fallback_chain_answers_in_order_each_stage_with_its_timeout() {
    let dead = |seed| {
        Arc::new(Sim::new(SimConfig {
            seed,
            faults: Faults {
                call_error_rate: 1.0,
                ..Faults::default()
            },
            ..SimConfig::default()
        }))
    };
    let stalled = Arc::new(Sim::new(SimConfig {
        faults: Faults {
            stall_rate: 1.0,
            stall: secs(3_600),
            ..Faults::default()
        },
        ..SimConfig::default()
    }));
    let no_retries = || EngineConfig {
        retry: RetryConfig {
            max_attempts: 1,
            ..RetryConfig::default()
        },
        ..EngineConfig::default()
    };
    let primary = engine(&dead(1), no_retries());
    let stalled = Engine::from_arc(stalled, no_retries());
    let second = engine(&dead(2), no_retries());

    let config = OperatorConfig::default();
    let t0 = Instant::now();
    let outcomes: Vec<_> = stream::iter(0..20u64)
        .infer(&primary, config.clone(), |&i| Ok(i))
        .with_fallback(Fallback::engine(&stalled, ms(100)))
        .with_fallback(Fallback::engine(&second, ms(500)))
        .with_fallback(Fallback::value(u64::MAX))
        .collect()
        .await;
    assert_exactly_once(&outcomes, 20);
    for o in &outcomes {
        assert_eq!(o.result, Ok(u64::MAX));
        assert_eq!(o.served, Served::Fallback(2));
    }
    // 20.5 ms primary, 100 ms stalled stage, 20.5 ms second: the stalled stage
    // was cut at its own timeout.
    assert!(t0.elapsed() < ms(200), "{:?}", t0.elapsed());

    // Without the default value, the dead letter says what each stage did.
    let outcomes: Vec<_> = stream::iter(0..5u64)
        .infer(&primary, config, |&i| Ok(i))
        .with_fallback(Fallback::engine(&stalled, ms(100)))
        .collect()
        .await;
    assert_exactly_once(&outcomes, 5);
    for o in &outcomes {
        let f = o.result.as_ref().unwrap_err();
        assert_eq!((f.kind, o.served), (ErrorKind::Transient, Served::Primary));
        assert!(f.message.contains("fallback"), "{}", f.message);
        assert!(
            f.message.contains("timed out after 100 ms"),
            "{}",
            f.message
        );
    }
}

#[tokio::test(start_paused = true)]
async fn hedging_cuts_the_tail_of_stalled_calls_and_is_paid_from_the_budget() {
    let stalls = || {
        Arc::new(Sim::new(SimConfig {
            slots: 8,
            seed: 3,
            faults: Faults {
                stall_rate: 0.05,
                stall: secs(1),
                ..Faults::default()
            },
            ..SimConfig::default()
        }))
    };
    let p99 = |lat: &mut Vec<Duration>| {
        lat.sort();
        lat[lat.len() * 99 / 100]
    };
    let latencies = |engine: Engine<Sim<u64>>| async move {
        let records = stream::iter(0..400u64).then(|i| async move {
            sleep(ms(5)).await;
            (i, Instant::now())
        });
        let out: Vec<Duration> = records
            .infer(&engine, OperatorConfig::default(), |r| Ok(r.0))
            .map(|o| {
                assert!(o.result.is_ok());
                o.record.1.elapsed()
            })
            .collect()
            .await;
        out
    };
    let plain_sim = stalls();
    let fixed = || EngineConfig {
        concurrency: ConcurrencyConfig::Fixed(8),
        ..EngineConfig::default()
    };
    let mut plain = latencies(engine(&plain_sim, fixed())).await;
    let hedged_sim = stalls();
    let hedged_engine = engine(
        &hedged_sim,
        EngineConfig {
            hedge_after: Some(ms(60)),
            ..fixed()
        },
    );
    let mut hedged = latencies(hedged_engine).await;
    assert_eq!((plain.len(), hedged.len()), (400, 400));
    let (plain, hedged) = (p99(&mut plain), p99(&mut hedged));
    assert!(
        plain >= secs(1),
        "without hedging the stalls show: {plain:?}"
    );
    assert!(hedged < ms(200), "hedged p99 {hedged:?}");
    assert!(hedged_sim.stats().calls > plain_sim.stats().calls);
}

/// Answers every record of a call with its own 429 (`Ok` with one `Err` per record,
/// as an OpenAI-style batch endpoint or a KServe model with per-row errors does)
/// during `storm`, and succeeds otherwise; records when each call arrived and ended.
struct PerRecord429 {
    start: Instant,
    storm: (Duration, Duration),
    calls: std::sync::Mutex<Vec<(Instant, Instant, bool)>>,
}

impl flumen_core::Backend for PerRecord429 {
    type Input = u64;
    type Output = u64;

    fn capabilities(&self) -> flumen_core::Capabilities {
        flumen_core::Capabilities {
            max_batch_items: 32,
            ..flumen_core::Capabilities::default()
        }
    }

    async fn call(&self, batch: &[u64]) -> flumen_core::BatchResult<u64> {
        let arrived = Instant::now();
        sleep(ms(20)).await;
        let at = arrived.duration_since(self.start);
        let storm = at >= self.storm.0 && at < self.storm.1;
        self.calls
            .lock()
            .unwrap()
            .push((arrived, Instant::now(), storm));
        Ok(batch
            .iter()
            .map(|&i| {
                if storm {
                    Err(flumen_core::BackendError::overloaded(
                        "HTTP 429: slow down",
                        Some(ms(250)),
                    ))
                } else {
                    Ok(i)
                }
            })
            .collect())
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_every_record_is_429_is_overload_not_failure() {
    let backend = Arc::new(PerRecord429 {
        start: Instant::now(),
        storm: (Duration::ZERO, secs(2)),
        calls: std::sync::Mutex::new(Vec::new()),
    });
    let engine = Engine::from_arc(
        Arc::clone(&backend),
        EngineConfig {
            breaker: Some(BreakerConfig {
                min_calls: 3,
                ..BreakerConfig::default()
            }),
            concurrency: ConcurrencyConfig::Aimd(AimdConfig {
                initial: 8,
                ..AimdConfig::default()
            }),
            ..EngineConfig::default()
        },
    );
    // The concurrency limit during the storm, sampled every 10 ms.
    let watched = engine.clone();
    let lowest = tokio::spawn(async move {
        let mut lowest = usize::MAX;
        for _ in 0..200 {
            lowest = lowest.min(watched.stats().limit);
            sleep(ms(10)).await;
        }
        lowest
    });
    let n = 4_000;
    let outcomes = run(trickle(n, ms(1)), &engine, 1_000, secs(30)).await;
    let lowest = lowest.await.unwrap();
    assert!(
        lowest < 8,
        "overload shrinks concurrency: lowest limit {lowest}"
    );
    assert_exactly_once(&outcomes, n);
    assert_eq!(failures(&outcomes), vec![]);
    assert_eq!(
        engine.breaker_transitions(),
        vec![],
        "per-record overload is not failure"
    );
    let calls = backend.calls.lock().unwrap().clone();
    let refused: Vec<Instant> = calls.iter().filter(|c| c.2).map(|c| c.1).collect();
    assert!(refused.len() >= 2, "{} refused calls", refused.len());
    // As after a call-level 429: nothing is sent before the Retry-After has passed.
    for at in &refused {
        let early = calls
            .iter()
            .filter(|c| c.0 > *at && c.0 < *at + ms(250))
            .count();
        assert_eq!(early, 0, "{early} calls within 250 ms of a per-record 429");
    }
}
