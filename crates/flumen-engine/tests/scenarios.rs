//! Deterministic simulation scenarios: a paused tokio clock, the seeded `Sim`
//! backend, one scenario per test. Time advances only when every task waits, so
//! latencies are exact up to tokio's 1 ms timer resolution.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{assert_exactly_once, ms};
use flumen_core::ErrorKind;
use flumen_engine::{
    AimdConfig, BatchConfig, ConcurrencyConfig, Engine, EngineConfig, GradientConfig, InferExt,
    OperatorConfig, OrderMode, Outcome,
};
use flumen_sim::{Faults, Outage, Sim, SimConfig};
use futures::{stream, StreamExt};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::{sleep, sleep_until, Instant};

fn engine(sim: &Arc<Sim<u64>>, concurrency: ConcurrencyConfig) -> Engine<Sim<u64>> {
    Engine::from_arc(
        Arc::clone(sim),
        EngineConfig {
            name: "test".into(),
            concurrency,
            ..EngineConfig::default()
        },
    )
}

fn gradient() -> ConcurrencyConfig {
    ConcurrencyConfig::Gradient(GradientConfig::default())
}

/// Drains a backlog of `n` records; returns the outcomes and how long it took.
async fn drain_backlog(
    engine: &Engine<Sim<u64>>,
    n: u64,
    capacity: usize,
) -> (Vec<Outcome<u64, u64>>, Duration) {
    let t0 = Instant::now();
    let config = OperatorConfig {
        capacity,
        timeout: None,
        ..OperatorConfig::default()
    };
    let outcomes: Vec<_> = stream::iter(0..n)
        .infer(engine, config, |&i| Ok(i))
        .collect()
        .await;
    (outcomes, t0.elapsed())
}

#[tokio::test(start_paused = true)]
async fn an_idle_backend_gets_a_lone_record_at_once() {
    let sim = Arc::new(Sim::new(SimConfig::default()).recording());
    let engine = engine(&sim, gradient());
    // One record every 100 ms: the backend is idle each time.
    let records = stream::iter(0..20u64).then(|i| async move {
        sleep(ms(100)).await;
        (i, Instant::now())
    });
    let outcomes: Vec<_> = records
        .infer(&engine, OperatorConfig::default(), |r| Ok(r.0))
        .map(|o| (o.result.unwrap(), o.record.1.elapsed()))
        .collect()
        .await;
    assert_eq!(outcomes.len(), 20);
    for (_, latency) in outcomes {
        // a + b = 20.5 ms; tokio's timer rounds the sleep up to the next millisecond.
        assert!(
            latency >= Duration::from_micros(20_500) && latency <= ms(21),
            "latency {latency:?}"
        );
    }
    assert!(sim.calls().iter().all(|c| c.items == 1));
}

#[tokio::test(start_paused = true)]
async fn max_wait_delays_a_lone_record_like_triton() {
    let sim = Arc::new(Sim::new(SimConfig::default()));
    let engine = Engine::from_arc(
        Arc::clone(&sim),
        EngineConfig {
            batch: BatchConfig {
                max_wait: Some(ms(10)),
                ..BatchConfig::default()
            },
            ..EngineConfig::default()
        },
    );
    let t0 = Instant::now();
    let r = engine.submit(7, None).await;
    assert_eq!(r, Ok(7));
    let latency = t0.elapsed();
    assert!(
        latency >= Duration::from_micros(30_500) && latency <= ms(31),
        "{latency:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn under_saturation_batches_grow_to_the_max_and_throughput_reaches_the_limit() {
    let config = SimConfig::default();
    let limit_rps = config.limit_rps();
    let sim = Arc::new(Sim::new(config).recording());
    let engine = engine(&sim, gradient());
    let n = 10_000;
    let (outcomes, elapsed) = drain_backlog(&engine, n, 1_000).await;
    assert_exactly_once(&outcomes, n);
    assert!(outcomes.iter().all(|o| o.result == Ok(o.record)));

    let calls = sim.calls();
    let full = calls.iter().filter(|c| c.items == 64).count();
    assert!(
        full * 100 >= calls.len() * 95,
        "{full} of {} calls full",
        calls.len()
    );
    let rps = n as f64 / elapsed.as_secs_f64();
    assert!(
        rps >= 0.97 * limit_rps,
        "{rps:.0} records/s vs limit {limit_rps:.0}"
    );
}

/// Rows: k slots. The gradient controller starts at 1 and must settle at k ± 1.
#[tokio::test(start_paused = true)]
async fn the_gradient_limit_settles_at_the_slot_count() {
    for (k, noise) in [(1usize, 0.0), (2, 0.05), (4, 0.05), (8, 0.05)] {
        let sim = Arc::new(Sim::new(SimConfig {
            slots: k,
            noise,
            seed: 42,
            ..SimConfig::default()
        }));
        let engine = engine(&sim, gradient());
        let limits = limits_while_draining(&engine, 20_000 * k as u64 / 2).await;
        let tail = &limits[limits.len() / 3..];
        let (lo, hi) = (*tail.iter().min().unwrap(), *tail.iter().max().unwrap());
        assert!(
            lo + 1 >= k && hi <= k + 1,
            "k = {k}: limit ranged {lo}..={hi} after warm-up"
        );
        let max_busy = sim.stats().max_busy;
        assert_eq!(max_busy, k, "the backend's slots were all used");
    }
}

#[tokio::test(start_paused = true)]
async fn one_record_per_call_of_varying_cost_still_fills_every_slot() {
    // Sentences of 4–128 tokens, one per call (like an embedding model at batch 1):
    // a call's latency spreads tenfold with its tokens, and none of that is queueing.
    let k = 4;
    let tokens = |&i: &u64| 4 + (i * 7_919) % 125;
    let sim = Arc::new(
        Sim::new(SimConfig {
            base: ms(2),
            per_item: Duration::ZERO,
            per_token: Duration::from_micros(200),
            slots: k,
            max_batch: 1,
            seed: 7,
            ..SimConfig::default()
        })
        .with_tokens(tokens),
    );
    let engine = Engine::from_arc(
        Arc::clone(&sim),
        EngineConfig {
            name: "test".into(),
            concurrency: gradient(),
            batch: BatchConfig {
                max_items: Some(1),
                ..BatchConfig::default()
            },
            ..EngineConfig::default()
        },
    );
    let n = 6_000;
    let t0 = Instant::now();
    let limits = limits_while_draining(&engine, n).await;
    let elapsed = t0.elapsed();
    let tail = &limits[limits.len() / 3..];
    let (lo, hi) = (*tail.iter().min().unwrap(), *tail.iter().max().unwrap());
    assert!(
        lo + 1 >= k && hi <= k + 1,
        "limit ranged {lo}..={hi} after warm-up"
    );
    // Every slot busy all the time would take Σ service / k.
    let work: Duration = (0..n)
        .map(|i| sim.config().service_time(1, tokens(&i)))
        .sum();
    let ideal = work / k as u32;
    assert!(
        elapsed.as_secs_f64() <= ideal.as_secs_f64() * 1.15,
        "{elapsed:?} for an ideal {ideal:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn records_that_come_back_together_are_spread_over_the_free_slots() {
    // 64 callers, each sending its next record the moment the last one's answer is
    // back (a closed loop: 64 Flink subtasks, 64 HTTP clients). The answers of one call
    // come back together, so the next records arrive together: sent as one batch,
    // one call would carry all 64 while the second slot idles.
    let (share, sim) = closed_loop(BatchConfig::default(), 64, Duration::ZERO).await;
    assert_eq!(sim.stats().max_busy, 2, "both slots were used");
    let calls = sim.calls();
    let mean_batch = calls.iter().map(|c| c.items).sum::<usize>() as f64 / calls.len() as f64;
    // One call of 64 at a time does 64 / 52 ms, half the limit (2 × 64 / 52 ms); two
    // calls of 32 would do 1.44× that. Allow for the limiter's probes.
    assert!(
        share >= 1.25 * 0.5,
        "{share:.2} of the limit against 0.50 for one call of 64 at a time (mean batch {mean_batch:.1})"
    );
}

/// The default sim (a = 20 ms, b = 0.5 ms, k = 2, N = 64) with 5 % noise, its limit
/// in records/s, and an engine on it with `batch`.
fn loaded(batch: BatchConfig) -> (Arc<Sim<u64>>, Engine<Sim<u64>>, f64) {
    let config = SimConfig {
        noise: 0.05,
        seed: 3,
        ..SimConfig::default()
    };
    let limit = 2.0 * 64.0 / config.service_time(64, 0).as_secs_f64();
    let sim = Arc::new(Sim::new(config).recording());
    let engine = Engine::from_arc(
        Arc::clone(&sim),
        EngineConfig {
            name: "test".into(),
            batch,
            ..EngineConfig::default()
        },
    );
    (sim, engine, limit)
}

/// `c` callers in a closed loop, each waiting a seeded 0–`think` between an answer and
/// its next record (no wait at all when `think` is zero): records/s between 5 s and
/// 20 s as a share of the limit, and the simulator.
async fn closed_loop(batch: BatchConfig, c: u64, think: Duration) -> (f64, Arc<Sim<u64>>) {
    let (sim, engine, limit) = loaded(batch);
    let t0 = Instant::now();
    let (warm, end) = (t0 + Duration::from_secs(5), t0 + Duration::from_secs(20));
    let callers: Vec<_> = (0..c)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let mut rng = ChaCha8Rng::seed_from_u64(i);
                let mut counted = 0u64;
                while Instant::now() < end {
                    assert_eq!(engine.submit(i, None).await, Ok(i));
                    counted += u64::from(Instant::now() >= warm);
                    if !think.is_zero() {
                        sleep(think.mul_f64(rng.random::<f64>())).await;
                    }
                }
                counted
            })
        })
        .collect();
    let mut done = 0;
    for caller in callers {
        done += caller.await.unwrap();
    }
    (done as f64 / (end - warm).as_secs_f64() / limit, sim)
}

/// Poisson arrivals (seeded) at `load` × the limit for 20 s: p50 and p99 latency of
/// the records that arrived after 5 s, from their scheduled arrival.
async fn open_loop(batch: BatchConfig, load: f64) -> (Duration, Duration) {
    let (_, engine, limit) = loaded(batch);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let t0 = Instant::now();
    let (warm, end) = (t0 + Duration::from_secs(5), t0 + Duration::from_secs(20));
    let mut at = t0;
    let mut records = Vec::new();
    while at < end {
        let gap = -(1.0 - rng.random::<f64>()).ln() / (load * limit);
        at += Duration::from_secs_f64(gap);
        sleep_until(at).await;
        let engine = engine.clone();
        records.push(tokio::spawn(async move {
            assert_eq!(engine.submit(1, None).await, Ok(1));
            (at, at.elapsed())
        }));
    }
    let mut latencies = Vec::new();
    for r in records {
        let (sent, latency) = r.await.unwrap();
        if sent >= warm {
            latencies.push(latency);
        }
    }
    latencies.sort();
    let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    (q(0.5), q(0.99))
}

fn eager() -> BatchConfig {
    BatchConfig {
        eager: true,
        ..BatchConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_freed_slot_waits_for_the_records_that_trickle_back_in_a_closed_loop() {
    // 64 callers that answer within 0–4 ms (HTTP clients, Flink subtasks). Sending
    // whatever is queued the moment a slot frees sends the first few records back
    // from one call as a call of their own, paying the whole fixed cost, alternating
    // with overfull calls: about half the limit. Two calls of 32 would do ~70 %.
    let think = ms(4);
    let (eager, _) = closed_loop(eager(), 64, think).await;
    let (balanced, _) = closed_loop(BatchConfig::default(), 64, think).await;
    eprintln!("closed loop of 64: eager {eager:.2} of the limit, balanced {balanced:.2}");
    assert!(
        balanced >= 1.15 * eager && balanced >= 0.55,
        "balanced {balanced:.2} of the limit, eager {eager:.2}"
    );
    // Records that come back at once need no hold, and are not slowed by it.
    let (eager, _) = closed_loop(self::eager(), 64, Duration::ZERO).await;
    let (balanced, _) = closed_loop(BatchConfig::default(), 64, Duration::ZERO).await;
    assert!(
        balanced >= eager,
        "lockstep: {balanced:.2} against {eager:.2}"
    );
}

#[tokio::test(start_paused = true)]
async fn holding_slots_for_balance_barely_moves_open_loop_latency() {
    // With independent arrivals there are no stragglers to wait for; the hold
    // (at most 15 % of the fixed cost) must not show in the latency.
    for load in [0.1, 0.5, 0.9] {
        let (p50_eager, p99_eager) = open_loop(eager(), load).await;
        let (p50, p99) = open_loop(BatchConfig::default(), load).await;
        eprintln!(
            "open loop at {load}: p50 {p50:?} / {p50_eager:?} eager, p99 {p99:?} / {p99_eager:?}"
        );
        assert!(
            p50.as_secs_f64() <= 1.05 * p50_eager.as_secs_f64()
                && p99.as_secs_f64() <= 1.05 * p99_eager.as_secs_f64(),
            "at {load}: p50 {p50:?} / {p50_eager:?}, p99 {p99:?} / {p99_eager:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn sustained_overload_with_deadlines_keeps_goodput_near_the_limit() {
    // Three times what the backend can do, each record due 1 s after it arrives, no
    // bound on what is submitted. A FIFO queue alone would fill with a second of
    // work, so records would reach the backend only as their deadlines pass: every
    // call would carry records that time out in flight. Records that would miss
    // their deadline behind the queue are shed at once instead, and those that
    // reach the head too late are failed unsent.
    let (sim, engine, limit) = loaded(BatchConfig::default());
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let t0 = Instant::now();
    let (warm, end) = (t0 + Duration::from_secs(5), t0 + Duration::from_secs(20));
    let mut at = t0;
    let mut records = Vec::new();
    while at < end {
        at += Duration::from_secs_f64(-(1.0 - rng.random::<f64>()).ln() / (3.0 * limit));
        sleep_until(at).await;
        let engine = engine.clone();
        records.push(tokio::spawn(async move {
            let result = engine.submit(1, Some(at + ms(1_000))).await;
            // Timers fire on whole milliseconds: up to 1 ms past the deadline.
            (at, result, Instant::now() <= at + ms(1_001))
        }));
    }
    let (mut ok, mut shed, mut late, mut n) = (0usize, 0usize, 0usize, 0usize);
    for r in records {
        let (sent, result, in_time) = r.await.unwrap();
        n += 1;
        assert!(in_time, "every outcome comes by the deadline");
        match result {
            Ok(_) if sent >= warm => ok += 1,
            Ok(_) => {}
            Err(f) if f.kind == ErrorKind::Overloaded => shed += 1,
            Err(f) => {
                assert_eq!(f.kind, ErrorKind::Timeout, "{}", f.message);
                late += 1;
            }
        }
    }
    let goodput = ok as f64 / (end - warm).as_secs_f64() / limit;
    let sent = sim.stats().items as usize;
    eprintln!(
        "3x overload: {n} records, goodput {goodput:.2} of the limit, {shed} shed, {late} timed out, {sent} sent"
    );
    assert!(goodput >= 0.85, "goodput {goodput:.2} of the limit");
    assert!(
        shed > n / 2,
        "most of the excess is shed at once: {shed} of {n}"
    );
}

async fn limits_while_draining(engine: &Engine<Sim<u64>>, n: u64) -> Vec<usize> {
    let limits = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = {
        let (engine, limits) = (engine.clone(), Arc::clone(&limits));
        tokio::spawn(async move {
            loop {
                sleep(ms(20)).await;
                limits.lock().unwrap().push(engine.stats().limit);
            }
        })
    };
    let config = OperatorConfig {
        capacity: 2_000,
        timeout: None,
        ..OperatorConfig::default()
    };
    let outcomes: Vec<_> = stream::iter(0..n)
        .infer(engine, config, |&i| Ok(i))
        .collect()
        .await;
    sampler.abort();
    assert_exactly_once(&outcomes, n);
    let limits = limits.lock().unwrap().clone();
    assert!(limits.len() > 50, "only {} samples", limits.len());
    limits
}

#[tokio::test(start_paused = true)]
async fn aimd_settles_at_the_slot_count_when_the_backend_rejects_excess_calls() {
    // Like Triton with max_queue_size 0: a call beyond the k slots is answered 503.
    let sim = Arc::new(Sim::new(SimConfig {
        queue_limit: Some(0),
        ..SimConfig::default()
    }));
    let engine = engine(&sim, ConcurrencyConfig::Aimd(AimdConfig::default()));
    let n = 10_000u64;
    let config = OperatorConfig {
        capacity: 1_000,
        timeout: None,
        ..OperatorConfig::default()
    };
    let limits = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = {
        let (engine, limits) = (engine.clone(), Arc::clone(&limits));
        tokio::spawn(async move {
            loop {
                sleep(ms(20)).await;
                limits.lock().unwrap().push(engine.stats().limit);
            }
        })
    };
    let outcomes: Vec<_> = stream::iter(0..n)
        .infer(&engine, config, |&i| Ok(i))
        .collect()
        .await;
    sampler.abort();
    assert_exactly_once(&outcomes, n);
    let limits = limits.lock().unwrap().clone();
    let tail = &limits[limits.len() / 3..];
    let (lo, hi) = (*tail.iter().min().unwrap(), *tail.iter().max().unwrap());
    assert!(lo >= 1 && hi <= 3, "limit ranged {lo}..={hi}");
    let overloaded = outcomes
        .iter()
        .filter(|o| {
            o.result
                .as_ref()
                .is_err_and(|f| f.kind == ErrorKind::Overloaded)
        })
        .count() as u64;
    let stats = sim.stats();
    assert!(stats.overloaded * 64 >= overloaded);
    // AIMD finds the ceiling by probing: every probe past k costs one rejected call
    // (about one in five here). That is its nature, and why Gradient is the default.
    assert!(
        stats.overloaded * 4 < stats.calls,
        "{} of {} calls rejected",
        stats.overloaded,
        stats.calls
    );
}

#[tokio::test(start_paused = true)]
async fn an_overload_storm_shrinks_the_limit_and_it_recovers_after() {
    let sim = Arc::new(Sim::new(SimConfig {
        slots: 8,
        faults: Faults {
            outages: vec![Outage {
                from: Duration::from_secs(3),
                until: Duration::from_secs(4),
                kind: ErrorKind::Overloaded,
            }],
            ..Faults::default()
        },
        ..SimConfig::default()
    }));
    let engine = engine(&sim, gradient());
    let at = |t: u64| {
        let engine = engine.clone();
        tokio::spawn(async move {
            sleep(ms(t)).await;
            engine.stats().limit
        })
    };
    let (before, during, after) = (at(2_900), at(3_950), at(5_500));
    let config = OperatorConfig {
        capacity: 2_000,
        // With a deadline, overload answers are waited out instead of counted as attempts.
        timeout: Some(Duration::from_secs(30)),
        ..OperatorConfig::default()
    };
    let n = 80_000u64;
    let outcomes: Vec<_> = stream::iter(0..n)
        .infer(&engine, config, |&i| Ok(i))
        .collect()
        .await;
    assert_exactly_once(&outcomes, n);
    let (before, during, after) = (
        before.await.unwrap(),
        during.await.unwrap(),
        after.await.unwrap(),
    );
    assert!((7..=9).contains(&before), "before the storm: {before}");
    assert!(during <= 2, "during the storm: {during}");
    assert!((7..=9).contains(&after), "after the storm: {after}");
    // Overloaded records wait out the storm and are retried: none is lost.
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    assert_eq!(failed, 0, "{failed} records failed");
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_stops_input_polling_at_capacity() {
    let sim = Arc::new(Sim::new(SimConfig::default()));
    let engine = engine(&sim, gradient());
    let pulled = Arc::new(AtomicUsize::new(0));
    let source = {
        let pulled = Arc::clone(&pulled);
        stream::iter(0..100_000u64).inspect(move |_| {
            pulled.fetch_add(1, Relaxed);
        })
    };
    let capacity = 50;
    let config = OperatorConfig {
        capacity,
        ..OperatorConfig::default()
    };
    let mut outcomes = Box::pin(source.infer(&engine, config, |&i| Ok(i)));
    let mut consumed = 0;
    let mut max_queue = 0;
    while consumed < 2_000 {
        let o = outcomes.next().await.unwrap();
        assert!(o.result.is_ok());
        consumed += 1;
        // A slow consumer: 10 ms per outcome, far slower than the backend.
        sleep(ms(10)).await;
        let held = pulled.load(Relaxed) - consumed;
        assert!(
            held <= capacity,
            "{held} records held with capacity {capacity}"
        );
        max_queue = max_queue.max(engine.stats().queued);
    }
    assert!(max_queue <= capacity);
    let held = outcomes.in_flight();
    assert!(
        held + 1 >= capacity && held <= capacity,
        "the operator stays full, no more: {held}"
    );
}

#[tokio::test(start_paused = true)]
async fn records_expire_in_the_queue_before_they_are_sent() {
    // One slot, 500 ms per call, one call at a time, batches of 4: records past the
    // first few batches cannot be sent before their 1.2 s deadline.
    let sim = Arc::new(Sim::new(SimConfig {
        base: ms(500),
        per_item: Duration::ZERO,
        slots: 1,
        max_batch: 4,
        ..SimConfig::default()
    }));
    let engine = engine(&sim, ConcurrencyConfig::Fixed(1));
    let config = OperatorConfig {
        capacity: 100,
        timeout: Some(ms(1_200)),
        ..OperatorConfig::default()
    };
    let t0 = Instant::now();
    let outcomes: Vec<_> = stream::iter(0..40u64)
        .infer(&engine, config, |&i| Ok(i))
        .collect()
        .await;
    assert_exactly_once(&outcomes, 40);
    // Calls at 0 and 500 ms (4 records each succeed). At 1,000 ms the next records
    // have 200 ms left, less than a call takes: sent, they would time out in flight,
    // so they fail unsent, like the other 28 that expire in the queue.
    let ok = outcomes.iter().filter(|o| o.result.is_ok()).count();
    let failed: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err())
        .collect();
    assert_eq!(ok, 8);
    assert_eq!(failed.len(), 32);
    assert!(failed
        .iter()
        .all(|f| f.kind == ErrorKind::Timeout && f.attempts == 0));
    assert!(
        failed.iter().any(|f| f
            .message
            .contains("nearer than the backend's expected latency")),
        "the hopeless ones say why"
    );
    assert_eq!(
        sim.stats().items,
        8,
        "records that cannot make their deadline never reach the backend"
    );
    assert!(t0.elapsed() <= ms(1_201));
}

#[tokio::test(start_paused = true)]
async fn a_stalled_call_times_its_records_out_once() {
    let sim = Arc::new(Sim::new(SimConfig {
        faults: Faults {
            stall_rate: 1.0,
            stall: Duration::from_secs(3_600),
            ..Faults::default()
        },
        ..SimConfig::default()
    }));
    let engine = engine(&sim, ConcurrencyConfig::Fixed(2));
    let config = OperatorConfig {
        timeout: Some(Duration::from_secs(1)),
        ..OperatorConfig::default()
    };
    let t0 = Instant::now();
    let outcomes: Vec<_> = stream::iter(0..10u64)
        .infer(&engine, config, |&i| Ok(i))
        .collect()
        .await;
    assert_exactly_once(&outcomes, 10);
    for o in &outcomes {
        let f = o.result.as_ref().unwrap_err();
        assert_eq!(f.kind, ErrorKind::Timeout);
    }
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    // The abandoned calls released their slots in the engine.
    sleep(ms(1)).await;
    assert_eq!(engine.stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn operators_sharing_an_engine_are_batched_together() {
    let sim = Arc::new(Sim::new(SimConfig::default()).recording());
    let engine = engine(&sim, ConcurrencyConfig::Fixed(1));
    let trickle = |offset: u64| {
        stream::iter(0..200u64).then(move |i| async move {
            sleep(ms(2)).await;
            i * 2 + offset
        })
    };
    let a = trickle(0).infer(&engine, OperatorConfig::default(), |&i| Ok(i));
    let b = trickle(1).infer(&engine, OperatorConfig::default(), |&i| Ok(i));
    let (a, b): (Vec<_>, Vec<_>) = tokio::join!(a.collect(), b.collect());
    let mut all: Vec<_> = a.into_iter().chain(b).collect();
    all.sort_by_key(|o| o.record);
    assert_exactly_once(&all, 400);
    // With one call in flight of ~25 ms and a record each 1 ms across both streams,
    // calls carry records of both operators.
    let calls = sim.calls();
    assert!(calls.len() < 40, "{} calls for 400 records", calls.len());
}

#[tokio::test(start_paused = true)]
async fn invalid_records_fail_without_reaching_the_backend_and_keep_their_place() {
    let sim = Arc::new(Sim::new(SimConfig::default()));
    let engine = engine(&sim, gradient());
    let config = OperatorConfig {
        order: OrderMode::Ordered,
        ..OperatorConfig::default()
    };
    let outcomes: Vec<_> = stream::iter(0..100u64)
        .infer(&engine, config, |&i| {
            if i % 10 == 3 {
                Err(format!("record {i}: field `text` is missing"))
            } else {
                Ok(i)
            }
        })
        .collect()
        .await;
    let ids: Vec<_> = outcomes.iter().map(|o| o.record).collect();
    assert_eq!(ids, (0..100).collect::<Vec<_>>());
    for o in &outcomes {
        match &o.result {
            Ok(v) => assert_eq!(*v, o.record),
            Err(f) => {
                assert_eq!(o.record % 10, 3);
                assert_eq!((f.kind, f.attempts), (ErrorKind::InvalidInput, 0));
                assert!(f.message.contains("field `text`"));
            }
        }
    }
    assert_eq!(sim.stats().items, 90);
}

#[tokio::test(start_paused = true)]
async fn records_outlive_a_dropped_engine_handle() {
    let sim = Arc::new(Sim::new(SimConfig::default()));
    let engine = engine(&sim, gradient());
    let pending: Vec<_> = (0..100u64).map(|i| engine.submit(i, None)).collect();
    drop(engine);
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(p.await, Ok(i as u64));
    }
}
