//! The batch policy, fed made-up queues and clocks.

use super::*;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn caps(max: usize) -> Capabilities {
    Capabilities {
        max_batch_items: max,
        ..Capabilities::default()
    }
}

fn queue(t0: Instant, n: usize) -> Vec<QueuedMeta> {
    (0..n)
        .map(|i| QueuedMeta {
            enqueued: t0 + ms(i as u64),
            deadline: None,
            cost: ItemCost::default(),
        })
        .collect()
}

fn model(a_ms: f64, b_ms: f64) -> LatencyModel {
    let mut m = LatencyModel::default();
    for n in [1usize, 10, 64, 5, 30] {
        m.observe(n, Duration::from_secs_f64((a_ms + b_ms * n as f64) / 1e3));
    }
    m
}

#[test]
fn idle_backend_sends_a_lone_record_at_once() {
    let t0 = Instant::now();
    let p = BatchPolicy::new(&BatchConfig::default(), &caps(64));
    let q = queue(t0, 1);
    assert_eq!(
        p.decide(t0, Slots::idle(1), &q, &LatencyModel::default()),
        Decision::Send(1)
    );
}

#[test]
fn busy_backend_lets_the_batch_grow() {
    let t0 = Instant::now();
    let p = BatchPolicy::new(&BatchConfig::default(), &caps(64));
    let q = queue(t0, 10);
    assert_eq!(
        p.decide(t0, Slots::idle(0), &q, &LatencyModel::default()),
        Decision::Wait(None)
    );
    let q = queue(t0, 100);
    assert_eq!(
        p.decide(t0 + ms(50), Slots::idle(1), &q, &LatencyModel::default()),
        Decision::Send(64)
    );
}

#[test]
fn config_cannot_exceed_the_backend_max() {
    let cfg = BatchConfig {
        max_items: Some(500),
        ..BatchConfig::default()
    };
    assert_eq!(BatchPolicy::new(&cfg, &caps(64)).max_items(), 64);
    let cfg = BatchConfig {
        max_items: Some(8),
        ..BatchConfig::default()
    };
    assert_eq!(BatchPolicy::new(&cfg, &caps(64)).max_items(), 8);
}

#[test]
fn token_and_byte_budgets_bound_the_batch() {
    let t0 = Instant::now();
    let cfg = BatchConfig {
        max_tokens: Some(100),
        max_bytes: Some(1_000),
        ..BatchConfig::default()
    };
    let p = BatchPolicy::new(&cfg, &caps(64));
    let mut q = queue(t0, 10);
    for m in &mut q {
        m.cost = ItemCost {
            bytes: 10,
            tokens: 30,
        };
    }
    // 3 × 30 = 90 tokens fit, a 4th would make 120.
    assert_eq!(
        p.decide(t0, Slots::idle(1), &q, &LatencyModel::default()),
        Decision::Send(3)
    );
    for m in &mut q {
        m.cost = ItemCost {
            bytes: 400,
            tokens: 1,
        };
    }
    assert_eq!(
        p.decide(t0, Slots::idle(1), &q, &LatencyModel::default()),
        Decision::Send(2)
    );
    q[0].cost.tokens = 101;
    assert_eq!(
        p.decide(t0, Slots::idle(0), &q, &LatencyModel::default()),
        Decision::RejectOversized
    );
}

#[test]
fn max_wait_waits_from_the_oldest_record_then_sends() {
    let t0 = Instant::now();
    let cfg = BatchConfig {
        max_wait: Some(ms(10)),
        ..BatchConfig::default()
    };
    let p = BatchPolicy::new(&cfg, &caps(8));
    let q = queue(t0, 3);
    let m = LatencyModel::default();
    assert_eq!(
        p.decide(t0 + ms(2), Slots::idle(1), &q, &m),
        Decision::Wait(Some(t0 + ms(10)))
    );
    assert_eq!(
        p.decide(t0 + ms(10), Slots::idle(1), &q, &m),
        Decision::Send(3)
    );
    // A full batch goes at once.
    let q = queue(t0, 9);
    assert_eq!(
        p.decide(t0 + ms(1), Slots::idle(1), &q, &m),
        Decision::Send(8)
    );
}

#[test]
fn max_wait_never_waits_past_a_deadline() {
    let t0 = Instant::now();
    let cfg = BatchConfig {
        max_wait: Some(ms(100)),
        ..BatchConfig::default()
    };
    let p = BatchPolicy::new(&cfg, &caps(64));
    let mut q = queue(t0, 2);
    q[1].deadline = Some(t0 + ms(50));
    let m = model(20.0, 0.5);
    // Latest start for 2 records: 50 - 21 = 29 ms.
    assert_eq!(
        p.decide(t0, Slots::idle(1), &q, &m),
        Decision::Wait(Some(t0 + ms(29)))
    );
    assert_eq!(
        p.decide(t0 + ms(29), Slots::idle(1), &q, &m),
        Decision::Send(2)
    );
}

#[test]
fn a_whole_queue_is_spread_over_free_slots_when_that_pays() {
    let t0 = Instant::now();
    let p = BatchPolicy::new(&BatchConfig::default(), &caps(64));
    let q = queue(t0, 64);
    let m = model(20.0, 0.5);
    // 64 records, 52 ms in one call; two calls of 32 take 36 ms each.
    assert_eq!(p.decide(t0, Slots::idle(1), &q, &m), Decision::Send(64));
    assert_eq!(p.decide(t0, Slots::idle(2), &q, &m), Decision::Send(32));
    // Three of 22 (31 ms) still beat two of 32 by more than SPLIT_GAIN.
    assert_eq!(p.decide(t0, Slots::idle(3), &q, &m), Decision::Send(22));
    // More than a full batch waiting: full batches, no split.
    let full = queue(t0, 100);
    assert_eq!(p.decide(t0, Slots::idle(3), &full, &m), Decision::Send(64));
    // A large fixed cost per call: halves would take 97 % as long, so one call.
    let heavy = model(100.0, 0.1);
    assert_eq!(p.decide(t0, Slots::idle(2), &q, &heavy), Decision::Send(64));
    // With max_wait the caller asked for full batches: no split.
    let waiting = BatchPolicy::new(
        &BatchConfig {
            max_wait: Some(ms(5)),
            ..BatchConfig::default()
        },
        &caps(64),
    );
    assert_eq!(
        waiting.decide(t0 + ms(70), Slots::idle(2), &q, &m),
        Decision::Send(64)
    );
}

#[test]
fn an_unknown_slope_is_explored_with_two_parts() {
    let t0 = Instant::now();
    let p = BatchPolicy::new(&BatchConfig::default(), &caps(64));
    let q = queue(t0, 64);
    // No sample yet: nothing to go by, one call.
    assert_eq!(
        p.decide(t0, Slots::idle(2), &q, &LatencyModel::default()),
        Decision::Send(64)
    );
    // Every call so far carried 64: how latency grows with size is unknown.
    let mut lockstep = LatencyModel::default();
    for _ in 0..20 {
        lockstep.observe(64, ms(52));
    }
    assert_eq!(
        p.decide(t0, Slots::idle(3), &q, &lockstep),
        Decision::Send(32)
    );
    // Once sizes vary and latency turns out flat, no more splitting.
    let mut flat = lockstep.clone();
    flat.observe(32, ms(52));
    assert_eq!(p.decide(t0, Slots::idle(2), &q, &flat), Decision::Send(64));
}

#[test]
fn cuts_early_when_a_bigger_batch_would_miss_the_oldest_deadline() {
    let t0 = Instant::now();
    let p = BatchPolicy::new(&BatchConfig::default(), &caps(64));
    let mut q = queue(t0, 64);
    // The oldest has 30 ms left: 20 + 0.5·n ≤ 30 allows n = 20.
    q[0].deadline = Some(t0 + ms(30));
    let m = model(20.0, 0.5);
    assert_eq!(p.decide(t0, Slots::idle(1), &q, &m), Decision::Send(20));
    // A hopeless deadline (nearer than one record's latency) is failed, not sent
    // (it would time out in flight), whether or not a slot is free; before any
    // latency sample nothing is hopeless.
    q[0].deadline = Some(t0 + ms(5));
    assert!(matches!(
        p.decide(t0, Slots::idle(1), &q, &m),
        Decision::RejectHopeless { .. }
    ));
    assert!(matches!(
        p.decide(t0, Slots::idle(0), &q, &m),
        Decision::RejectHopeless { .. }
    ));
    assert_eq!(
        p.decide(t0, Slots::idle(1), &q, &LatencyModel::default()),
        Decision::Send(64)
    );
    // Behind a backlog while another call runs (sustained overload), the head
    // goes in a full call (52 ms): with 30 ms left it is failed rather than cut
    // the call to 20. On an idle backend the same burst is cut for it.
    let mut backlog = queue(t0, 100);
    backlog[0].deadline = Some(t0 + ms(30));
    let running = Slots {
        free: 1,
        busy: 1,
        busy_items: 64,
        freed_at: Some(t0),
    };
    let Decision::RejectHopeless { expected } = p.decide(t0, running, &backlog, &m) else {
        panic!("the head should be failed");
    };
    assert!(
        expected.abs_diff(ms(52)) < ms(1),
        "a full call: {expected:?}"
    );
    assert_eq!(
        p.decide(t0, Slots::idle(2), &backlog, &m),
        Decision::Send(20)
    );
}

#[test]
fn a_free_slot_is_held_for_a_batch_as_efficient_as_those_in_flight() {
    let t0 = Instant::now();
    let p = BatchPolicy::new(&BatchConfig::default(), &caps(64));
    let m = model(20.0, 0.5);
    // One call of 30 in flight; 3 records queued when the other slot frees:
    // 3 / 21.5 ms is far below 30 / 35 ms. Held for 0.15 × 20 ms = 3 ms.
    let busy = Slots {
        free: 1,
        busy: 1,
        busy_items: 30,
        freed_at: Some(t0 + ms(1)),
    };
    let q = queue(t0, 3);
    assert_eq!(
        p.decide(t0 + ms(1), busy, &q, &m),
        Decision::Wait(Some(t0 + ms(4)))
    );
    assert_eq!(p.decide(t0 + ms(4), busy, &q, &m), Decision::Send(3));
    // As many as the call in flight (or nearly): at once.
    assert_eq!(
        p.decide(t0 + ms(1), busy, &queue(t0, 26), &m),
        Decision::Send(26)
    );
    // Nothing in flight: an idle backend never waits.
    assert_eq!(
        p.decide(t0 + ms(1), Slots::idle(2), &q, &m),
        Decision::Send(3)
    );
    // Nor does an eager policy.
    let eager = BatchPolicy::new(
        &BatchConfig {
            eager: true,
            ..BatchConfig::default()
        },
        &caps(64),
    );
    assert_eq!(eager.decide(t0 + ms(1), busy, &q, &m), Decision::Send(3));
    // The hold never costs a deadline: 3 records take 21.5 ms.
    let mut q = queue(t0, 3);
    q[2].deadline = Some(t0 + ms(24));
    let until = t0 + ms(24) - Duration::from_micros(21_500);
    assert_eq!(
        p.decide(t0 + ms(1), busy, &q, &m),
        Decision::Wait(Some(until))
    );
    assert_eq!(p.decide(until, busy, &q, &m), Decision::Send(3));
}

#[test]
fn a_backend_without_a_fixed_cost_per_call_is_never_held_for() {
    let t0 = Instant::now();
    let p = BatchPolicy::new(&BatchConfig::default(), &caps(64));
    // 1 record costs as much per record as 60: nothing to gain by waiting.
    let m = model(0.0, 1.0);
    let busy = Slots {
        free: 1,
        busy: 1,
        busy_items: 60,
        freed_at: Some(t0),
    };
    assert_eq!(p.decide(t0, busy, &queue(t0, 1), &m), Decision::Send(1));
}

#[test]
fn sheds_only_behind_a_backlog_it_cannot_clear_in_time() {
    let policy = BatchPolicy::new(&BatchConfig::default(), &caps(10));
    let now = Instant::now();
    let mut latency = LatencyModel::default();
    // No latency sample yet: never shed.
    assert_eq!(policy.sheds(now, now + ms(1), 1_000, 2, &latency), None);
    // Calls of 10 take 20 + 1·10 = 30 ms.
    for items in [1, 10, 5, 10, 1] {
        latency.observe(items, ms(20 + items as u64));
    }
    let call = latency.estimate(10);
    // Less than a full batch queued: never shed, however near the deadline.
    assert_eq!(policy.sheds(now, now + ms(1), 9, 2, &latency), None);
    // 40 queued, 2 calls at a time: 2 rounds ahead, then its own call.
    let answer = now + call * 3;
    assert_eq!(
        policy.sheds(now, answer - ms(1), 40, 2, &latency),
        Some(answer)
    );
    assert_eq!(policy.sheds(now, answer, 40, 2, &latency), None);
    // A higher limit clears the backlog sooner.
    assert_eq!(policy.sheds(now, answer - ms(1), 40, 4, &latency), None);
    // A limit of 0 (nothing may be sent now) counts as 1.
    assert_eq!(
        policy.sheds(now, now + ms(1), 10, 0, &latency),
        Some(now + call * 2)
    );
}
