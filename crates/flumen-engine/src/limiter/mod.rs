//! Concurrency controllers: how many backend calls may be in flight.
//!
//! The controllers are policy only: plain structs fed with [`Sample`]s (one per
//! finished call) and read through [`Limiter::limit`]. The engine's dispatcher is
//! the mechanism that holds calls to the limit. Concurrency is independent of batch
//! size: the batcher decides how many records go in a call, the limiter how many
//! calls run at once.

mod aimd;
mod gradient;

use std::time::Duration;

use tokio::time::Instant;

pub use aimd::{Aimd, AimdConfig};
pub use gradient::{Gradient, GradientConfig};

/// How the engine limits calls in flight.
#[derive(Debug, Clone, PartialEq)]
pub enum ConcurrencyConfig {
    /// A fixed number of calls in flight.
    Fixed(usize),
    /// Additive increase, multiplicative decrease on overload and timeouts.
    Aimd(AimdConfig),
    /// Latency gradient: grows while calls take no longer than their no-load
    /// latency, shrinks when queueing shows up in the latency, on overload and on timeouts.
    Gradient(GradientConfig),
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        ConcurrencyConfig::Gradient(GradientConfig::default())
    }
}

/// How a finished call went, as far as the concurrency controller cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleOutcome {
    /// The call returned (items may still have failed individually, though not all
    /// of them with overload: that is `Overloaded`).
    Ok,
    /// The backend said it is overloaded: for the whole call, or for every record
    /// it answered.
    Overloaded,
    /// The call was abandoned: it outlived every record's deadline.
    Dropped,
    /// The call failed for another reason; it says nothing about load.
    Failed,
}

/// One finished backend call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// When the call was sent.
    pub sent_at: Instant,
    /// How long it took.
    pub rtt: Duration,
    /// Records in the call.
    pub items: usize,
    /// The records' cost in the backend's unit ([`flumen_core::ItemCost::tokens`]),
    /// or 0 when the backend reports none.
    pub tokens: u64,
    /// Calls in flight when it was sent, itself included.
    pub in_flight: usize,
    /// The limit when it was sent.
    pub limit: usize,
    /// How it went.
    pub outcome: SampleOutcome,
}

impl Sample {
    /// The call's size as far as its latency goes: its tokens when the backend
    /// charges by tokens (one long record can cost as much as many short ones),
    /// its records otherwise.
    pub fn size(&self) -> u64 {
        if self.tokens > 0 {
            self.tokens
        } else {
            self.items as u64
        }
    }

    /// Whether this call used the last slot the limit allowed (so the limit was binding).
    pub fn limit_reached(&self) -> bool {
        self.in_flight >= self.limit
    }
}

/// A concurrency controller of any kind.
#[derive(Debug, Clone)]
pub enum Limiter {
    /// A fixed limit.
    Fixed(usize),
    /// See [`Aimd`].
    Aimd(Aimd),
    /// See [`Gradient`].
    Gradient(Gradient),
}

impl Limiter {
    /// A controller for `config`.
    pub fn new(config: &ConcurrencyConfig) -> Self {
        match config {
            ConcurrencyConfig::Fixed(n) => Limiter::Fixed((*n).max(1)),
            ConcurrencyConfig::Aimd(c) => Limiter::Aimd(Aimd::new(c.clone())),
            ConcurrencyConfig::Gradient(c) => Limiter::Gradient(Gradient::new(c.clone())),
        }
    }

    /// Calls allowed in flight now (at least 1).
    pub fn limit(&self) -> usize {
        match self {
            Limiter::Fixed(n) => *n,
            Limiter::Aimd(c) => c.limit(),
            Limiter::Gradient(c) => c.limit(),
        }
    }

    /// Feeds one finished call.
    pub fn on_sample(&mut self, now: Instant, sample: &Sample) {
        match self {
            Limiter::Fixed(_) => {}
            Limiter::Aimd(c) => c.on_sample(now, sample),
            Limiter::Gradient(c) => c.on_sample(now, sample),
        }
    }
}

/// Multiplicative decrease at most once per round trip: a burst of bad samples
/// from calls sent before the last decrease does not shrink the limit again.
#[derive(Debug, Clone, Default)]
struct Cooldown {
    last_decrease: Option<Instant>,
}

impl Cooldown {
    fn allows(&self, sample: &Sample) -> bool {
        self.last_decrease.is_none_or(|t| sample.sent_at >= t)
    }

    fn mark(&mut self, now: Instant) {
        self.last_decrease = Some(now);
    }
}
