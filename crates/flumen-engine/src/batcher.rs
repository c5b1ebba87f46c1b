//! The batch-cutting rule: a pure function of the queue, the clock and a free slot.
//!
//! The rule, in order:
//! 1. A record that alone exceeds the byte or token budget can never be sent: reject it.
//! 2. No free backend slot: wait (the next batch keeps growing meanwhile).
//! 3. A slot is free: take the longest FIFO prefix within the item, byte and token
//!    bounds, but stop before a record whose addition would make the batch's
//!    expected latency miss a deadline that a smaller batch would meet.
//! 4. Without `max_wait`, send it now: an idle backend never waits for company. If
//!    that prefix is the whole queue and more slots are free, spread it over them
//!    (as many parts as the slots allow while each split cuts the expected latency
//!    by at least [`SPLIT_GAIN`]): records that come back together — a closed loop, a
//!    burst — would otherwise ride in one batch while the other slots stay idle.
//!    With `max_wait`, send when the batch is full, when the oldest record has
//!    waited `max_wait`, or when waiting longer would miss the earliest deadline.
//!
//! Expired records are failed by the engine before the rule runs.

use std::time::Duration;

use flumen_core::{Capabilities, ItemCost};
use tokio::time::Instant;

use crate::LatencyModel;

/// A free slot is held back (rule 4) while sending now would move records through it
/// at less than this share of the rate of the calls in flight.
pub const BALANCE_EFFICIENCY: f64 = 0.9;

/// For at most this share of a call's fixed cost (rule 4).
pub const BALANCE_HOLD: f64 = 0.15;

/// A batch is split over free slots only if its parts are expected to take at most
/// this share of the latency of the undivided batch: splitting costs one more call's
/// fixed overhead, which a backend with a large fixed cost per call cannot repay.
pub const SPLIT_GAIN: f64 = 0.9;

/// How batches are bounded and whether the batcher may wait for them to fill.
/// The default: the backend's own bounds, and no waiting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchConfig {
    /// The most records per call; `None` uses the backend's `max_batch_items`.
    pub max_items: Option<usize>,
    /// The most payload bytes per call, on top of the backend's own limit.
    pub max_bytes: Option<u64>,
    /// The most tokens per call (a cost budget), on top of the backend's own limit.
    pub max_tokens: Option<u64>,
    /// Triton-style delay: while a slot is free, wait up to this long (from the oldest
    /// queued record) for a fuller batch. `None` (the default) never waits.
    pub max_wait: Option<Duration>,
    /// Send whatever is queued the moment a slot frees, never holding the slot for a
    /// batch as efficient as those in flight (rule 4 of the module docs). Off by
    /// default: holding lifts closed loops and barely moves open-loop latency.
    pub eager: bool,
}

/// What the batcher needs to know of one queued record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedMeta {
    /// When the record entered the queue.
    pub enqueued: Instant,
    /// When the record must have its outcome, if ever.
    pub deadline: Option<Instant>,
    /// Its cost in bytes and tokens.
    pub cost: ItemCost,
}

/// The batcher's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send the first `n` queued records as one call now.
    Send(usize),
    /// The first queued record alone exceeds the byte or token budget: fail it.
    RejectOversized,
    /// The first queued record's deadline is nearer than the `expected` latency of the
    /// call it would go in: sent, it would time out in flight and take a slot from
    /// records that can still make it. Fail it now.
    RejectHopeless {
        /// The expected latency of that call.
        expected: Duration,
    },
    /// Send nothing now; look again at this instant (or on the next event).
    Wait(Option<Instant>),
}

/// The batch-cutting policy with its bounds resolved against a backend's capabilities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPolicy {
    max_items: usize,
    max_bytes: Option<u64>,
    max_tokens: Option<u64>,
    max_wait: Option<Duration>,
    eager: bool,
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl BatchPolicy {
    /// The policy for `config` on a backend with `caps`: the tighter of each bound.
    pub fn new(config: &BatchConfig, caps: &Capabilities) -> Self {
        let backend_max = caps.max_batch_items.max(1);
        BatchPolicy {
            max_items: config
                .max_items
                .unwrap_or(backend_max)
                .clamp(1, backend_max),
            max_bytes: min_opt(config.max_bytes, caps.max_batch_bytes),
            max_tokens: min_opt(config.max_tokens, caps.max_batch_tokens),
            max_wait: config.max_wait,
            eager: config.eager,
        }
    }

    /// The most records one call may carry.
    pub fn max_items(&self) -> usize {
        self.max_items
    }

    /// Whether one record's cost fits in a batch on its own.
    pub fn fits_alone(&self, cost: ItemCost) -> bool {
        self.max_bytes.is_none_or(|m| cost.bytes <= m)
            && self.max_tokens.is_none_or(|m| cost.tokens <= m)
    }

    /// How many records from the front of `queue` one call may carry within the
    /// item, byte and token bounds, and whether a bound stopped it (the queue holds
    /// at least a full call).
    fn fill<'a>(&self, queue: impl Iterator<Item = &'a QueuedMeta>) -> (usize, bool) {
        let (mut n, mut bytes, mut tokens) = (0usize, 0u64, 0u64);
        for meta in queue {
            let (b, t) = (bytes + meta.cost.bytes, tokens + meta.cost.tokens);
            if n == self.max_items
                || self.max_bytes.is_some_and(|m| b > m)
                || self.max_tokens.is_some_and(|m| t > m)
            {
                return (n, true);
            }
            (n, bytes, tokens) = (n + 1, b, t);
        }
        (n, false)
    }

    /// Decides what to do with `queue` (oldest first) at `now`, given the calls in
    /// flight and the free slots.
    pub fn decide<'a, Q>(
        &self,
        now: Instant,
        slots: Slots,
        queue: Q,
        latency: &LatencyModel,
    ) -> Decision
    where
        Q: IntoIterator<Item = &'a QueuedMeta>,
        Q::IntoIter: Clone,
    {
        let free_slots = slots.free;
        let queue = queue.into_iter();
        let whole = queue.clone();
        let mut queue = queue.peekable();
        let Some(head) = queue.peek().copied().copied() else {
            return Decision::Wait(None);
        };
        if !self.fits_alone(head.cost) {
            return Decision::RejectOversized;
        }
        if let Some(deadline) = head.deadline {
            // Behind a backlog (the queue holds a full call) while other calls run —
            // sustained overload — the head goes out in a full call: if it cannot make
            // its deadline in that call it is failed, rather than cut the call short
            // for it (every head record would otherwise shrink the calls). Otherwise
            // (a burst on an idle backend, a short queue) only a record that would
            // miss even alone; the cut rule below saves the rest.
            let call = match self.fill(whole) {
                (n, true) if slots.busy > 0 => n,
                _ => 1,
            };
            if hopeless(now, deadline, call, latency) {
                return Decision::RejectHopeless {
                    expected: latency.estimate(call),
                };
            }
        }
        if free_slots == 0 {
            return Decision::Wait(None);
        }

        let meets = |n: usize, deadline: Option<Instant>| {
            deadline.is_none_or(|d| now + latency.estimate(n) <= d)
        };
        let (mut n, mut bytes, mut tokens) = (0usize, 0u64, 0u64);
        let mut deadline: Option<Instant> = None;
        let mut full = false;
        for meta in queue {
            let (b, t) = (bytes + meta.cost.bytes, tokens + meta.cost.tokens);
            let over_budget =
                self.max_bytes.is_some_and(|m| b > m) || self.max_tokens.is_some_and(|m| t > m);
            if n == self.max_items || over_budget {
                full = true;
                break;
            }
            let with = match (deadline, meta.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Adding this record would make someone miss a deadline that the
            // batch as it stands would meet: cut here.
            if n > 0 && meets(n, deadline) && !meets(n + 1, with) {
                full = true;
                break;
            }
            n += 1;
            (bytes, tokens, deadline) = (b, t, with);
        }

        let Some(max_wait) = self.max_wait else {
            if full {
                return Decision::Send(n);
            }
            if !self.eager {
                if let Some(until) = balance_hold(now, n, head.enqueued, deadline, slots, latency) {
                    return Decision::Wait(Some(until));
                }
            }
            return Decision::Send(split(n, free_slots, latency));
        };
        if full {
            return Decision::Send(n);
        }
        let mut send_at = head.enqueued + max_wait;
        if let Some(d) = deadline {
            send_at = send_at.min(d.checked_sub(latency.estimate(n)).unwrap_or(now));
        }
        if now >= send_at {
            Decision::Send(n)
        } else {
            Decision::Wait(Some(send_at))
        }
    }
}

/// Whether a record due at `deadline` would miss it in a call of `items` sent now, by
/// the latency model (never before the model has a sample).
pub fn hopeless(now: Instant, deadline: Instant, items: usize, latency: &LatencyModel) -> bool {
    latency.coefficients().is_some() && now + latency.estimate(items) > deadline
}

/// The calls in flight, as the batcher sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    /// More calls allowed in flight now.
    pub free: usize,
    /// Calls in flight.
    pub busy: usize,
    /// Records in those calls.
    pub busy_items: usize,
    /// When a call last finished.
    pub freed_at: Option<Instant>,
}

impl Slots {
    /// `free` slots and nothing in flight.
    pub fn idle(free: usize) -> Self {
        Slots {
            free,
            busy: 0,
            busy_items: 0,
            freed_at: None,
        }
    }
}

/// Whether to hold a free slot, and until when: while other calls are in flight and
/// a call of the `n` records queued would move records through its slot at less than
/// [`BALANCE_EFFICIENCY`] of the rate of a call of their mean size, for at most
/// [`BALANCE_HOLD`] of a call's fixed cost from when both the slot and the oldest
/// record were there, and never past the point where a deadline would be missed.
fn balance_hold(
    now: Instant,
    n: usize,
    oldest: Instant,
    deadline: Option<Instant>,
    slots: Slots,
    latency: &LatencyModel,
) -> Option<Instant> {
    if slots.busy == 0 {
        return None;
    }
    let (a, b) = latency.coefficients()?;
    let rate = |items: f64| items / (a + b * items);
    let share = slots.busy_items as f64 / slots.busy as f64;
    if a <= 0.0 || rate(n as f64) >= BALANCE_EFFICIENCY * rate(share) {
        return None;
    }
    let from = slots.freed_at.map_or(oldest, |t| t.max(oldest));
    let mut until = from + Duration::from_secs_f64(BALANCE_HOLD * a);
    if let Some(d) = deadline {
        until = until.min(d.checked_sub(latency.estimate(n)).unwrap_or(now));
    }
    (until > now).then_some(until)
}

/// The first part of `n` records spread over up to `free` calls: the most parts
/// whose expected latency is at most [`SPLIT_GAIN`] of one part fewer. Before any
/// latency sample, `n` whole; while every sample had the same size (so how latency
/// grows with size is unknown: records that move in lockstep never show it), two
/// parts, to find out.
fn split(n: usize, free: usize, latency: &LatencyModel) -> usize {
    let part = |s: usize| n.div_ceil(s);
    if free < 2 || n < 2 || latency.coefficients().is_none() {
        return n;
    }
    if !latency.has_spread() {
        return part(2);
    }
    let mut s = 1;
    while s < free.min(n) {
        let (now, next) = (latency.estimate(part(s)), latency.estimate(part(s + 1)));
        if now.is_zero() || next.as_secs_f64() > SPLIT_GAIN * now.as_secs_f64() {
            break;
        }
        s += 1;
    }
    part(s)
}

#[cfg(test)]
mod tests {
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
}
