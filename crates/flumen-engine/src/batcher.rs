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

    /// Decides what to do with `queue` (oldest first) at `now`, with `free_slots`
    /// more calls allowed in flight.
    pub fn decide<'a>(
        &self,
        now: Instant,
        free_slots: usize,
        queue: impl IntoIterator<Item = &'a QueuedMeta>,
        latency: &LatencyModel,
    ) -> Decision {
        let mut queue = queue.into_iter().peekable();
        let Some(head) = queue.peek().copied().copied() else {
            return Decision::Wait(None);
        };
        if !self.fits_alone(head.cost) {
            return Decision::RejectOversized;
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
            p.decide(t0, 1, &q, &LatencyModel::default()),
            Decision::Send(1)
        );
    }

    #[test]
    fn busy_backend_lets_the_batch_grow() {
        let t0 = Instant::now();
        let p = BatchPolicy::new(&BatchConfig::default(), &caps(64));
        let q = queue(t0, 10);
        assert_eq!(
            p.decide(t0, 0, &q, &LatencyModel::default()),
            Decision::Wait(None)
        );
        let q = queue(t0, 100);
        assert_eq!(
            p.decide(t0 + ms(50), 1, &q, &LatencyModel::default()),
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
            p.decide(t0, 1, &q, &LatencyModel::default()),
            Decision::Send(3)
        );
        for m in &mut q {
            m.cost = ItemCost {
                bytes: 400,
                tokens: 1,
            };
        }
        assert_eq!(
            p.decide(t0, 1, &q, &LatencyModel::default()),
            Decision::Send(2)
        );
        q[0].cost.tokens = 101;
        assert_eq!(
            p.decide(t0, 0, &q, &LatencyModel::default()),
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
            p.decide(t0 + ms(2), 1, &q, &m),
            Decision::Wait(Some(t0 + ms(10)))
        );
        assert_eq!(p.decide(t0 + ms(10), 1, &q, &m), Decision::Send(3));
        // A full batch goes at once.
        let q = queue(t0, 9);
        assert_eq!(p.decide(t0 + ms(1), 1, &q, &m), Decision::Send(8));
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
        assert_eq!(p.decide(t0, 1, &q, &m), Decision::Wait(Some(t0 + ms(29))));
        assert_eq!(p.decide(t0 + ms(29), 1, &q, &m), Decision::Send(2));
    }

    #[test]
    fn a_whole_queue_is_spread_over_free_slots_when_that_pays() {
        let t0 = Instant::now();
        let p = BatchPolicy::new(&BatchConfig::default(), &caps(64));
        let q = queue(t0, 64);
        let m = model(20.0, 0.5);
        // 64 records, 52 ms in one call; two calls of 32 take 36 ms each.
        assert_eq!(p.decide(t0, 1, &q, &m), Decision::Send(64));
        assert_eq!(p.decide(t0, 2, &q, &m), Decision::Send(32));
        // Three of 22 (31 ms) still beat two of 32 by more than SPLIT_GAIN.
        assert_eq!(p.decide(t0, 3, &q, &m), Decision::Send(22));
        // More than a full batch waiting: full batches, no split.
        let full = queue(t0, 100);
        assert_eq!(p.decide(t0, 3, &full, &m), Decision::Send(64));
        // A large fixed cost per call: halves would take 97 % as long, so one call.
        let heavy = model(100.0, 0.1);
        assert_eq!(p.decide(t0, 2, &q, &heavy), Decision::Send(64));
        // With max_wait the caller asked for full batches: no split.
        let waiting = BatchPolicy::new(
            &BatchConfig {
                max_wait: Some(ms(5)),
                ..BatchConfig::default()
            },
            &caps(64),
        );
        assert_eq!(waiting.decide(t0 + ms(70), 2, &q, &m), Decision::Send(64));
    }

    #[test]
    fn an_unknown_slope_is_explored_with_two_parts() {
        let t0 = Instant::now();
        let p = BatchPolicy::new(&BatchConfig::default(), &caps(64));
        let q = queue(t0, 64);
        // No sample yet: nothing to go by, one call.
        assert_eq!(
            p.decide(t0, 2, &q, &LatencyModel::default()),
            Decision::Send(64)
        );
        // Every call so far carried 64: how latency grows with size is unknown.
        let mut lockstep = LatencyModel::default();
        for _ in 0..20 {
            lockstep.observe(64, ms(52));
        }
        assert_eq!(p.decide(t0, 3, &q, &lockstep), Decision::Send(32));
        // Once sizes vary and latency turns out flat, no more splitting.
        let mut flat = lockstep.clone();
        flat.observe(32, ms(52));
        assert_eq!(p.decide(t0, 2, &q, &flat), Decision::Send(64));
    }

    #[test]
    fn cuts_early_when_a_bigger_batch_would_miss_the_oldest_deadline() {
        let t0 = Instant::now();
        let p = BatchPolicy::new(&BatchConfig::default(), &caps(64));
        let mut q = queue(t0, 64);
        // The oldest has 30 ms left: 20 + 0.5·n ≤ 30 allows n = 20.
        q[0].deadline = Some(t0 + ms(30));
        let m = model(20.0, 0.5);
        assert_eq!(p.decide(t0, 1, &q, &m), Decision::Send(20));
        // A hopeless deadline (less than one record's latency) does not shrink the batch.
        q[0].deadline = Some(t0 + ms(5));
        assert_eq!(p.decide(t0, 1, &q, &m), Decision::Send(64));
    }
}
