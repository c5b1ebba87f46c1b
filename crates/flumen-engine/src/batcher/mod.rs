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

    /// The records of a full call when `queue` (in sending order) holds at least
    /// one: the call the front records would ride in behind a backlog.
    pub fn full_call<'a>(&self, queue: impl Iterator<Item = &'a QueuedMeta>) -> Option<usize> {
        match self.fill(queue) {
            (n, true) => Some(n),
            _ => None,
        }
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

impl BatchPolicy {
    /// Shedding at enqueue: whether a record due at `deadline`, arriving at `now`
    /// behind `queued` records with `limit` calls allowed in flight, would miss its
    /// deadline in the queue; if so, the earliest it could have its answer.
    ///
    /// Only behind a backlog (at least one full batch queued) and once the latency
    /// model has a sample: the record's predecessors need `queued / max_items` full
    /// calls, `limit` at a time, then its own call. Under sustained overload a FIFO
    /// queue otherwise fills with records that reach the backend only as their
    /// deadlines pass, and every call carries records that time out in flight while
    /// fresh ones wait behind them.
    pub fn sheds(
        &self,
        now: Instant,
        deadline: Instant,
        queued: usize,
        limit: usize,
        latency: &LatencyModel,
    ) -> Option<Instant> {
        let full = self.max_items;
        if queued < full {
            return None;
        }
        latency.coefficients()?;
        let rounds = queued / (full * limit.max(1));
        let call = latency.estimate(full);
        let answer = now + call * u32::try_from(rounds + 1).unwrap_or(u32::MAX);
        (answer > deadline).then_some(answer)
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
mod tests;
