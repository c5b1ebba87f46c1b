use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Which recent calls the breaker judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerWindow {
    /// The last `n` calls.
    Count(usize),
    /// The calls that finished within the last `d`.
    Time(Duration),
}

/// Settings of the circuit breaker (names and defaults after Resilience4j's).
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// The sliding window of calls judged.
    pub window: BreakerWindow,
    /// No judgement before the window holds this many calls.
    pub min_calls: usize,
    /// Open when at least this fraction of judged calls failed (0.5).
    pub failure_rate: f64,
    /// Open when at least this fraction of judged calls were slow (1.0: off unless
    /// every call is slow).
    pub slow_call_rate: f64,
    /// A call slower than this is slow.
    pub slow_call: Duration,
    /// How long the breaker stays open before letting probes through.
    pub open_wait: Duration,
    /// Calls let through while half-open; all must finish before it decides.
    pub half_open_probes: usize,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: BreakerWindow::Count(100),
            min_calls: 20,
            failure_rate: 0.5,
            slow_call_rate: 1.0,
            slow_call: Duration::from_secs(60),
            open_wait: Duration::from_secs(30),
            half_open_probes: 3,
        }
    }
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow; outcomes are judged over the window.
    Closed,
    /// No call is sent until the instant given.
    Open {
        /// When probes may start.
        until: Instant,
    },
    /// A few probe calls test the backend.
    HalfOpen,
}

impl BreakerState {
    /// The phase, without the instant.
    pub fn phase(self) -> BreakerPhase {
        match self {
            BreakerState::Closed => BreakerPhase::Closed,
            BreakerState::HalfOpen => BreakerPhase::HalfOpen,
            BreakerState::Open { .. } => BreakerPhase::Open,
        }
    }

    /// 0 closed, 1 half-open, 2 open (for a gauge).
    pub fn level(self) -> u8 {
        self.phase() as u8
    }

    /// `closed`, `half_open` or `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open { .. } => "open",
        }
    }
}

/// The breaker's state without its instant, as [`StatsSnapshot`](crate::StatsSnapshot)
/// reports it; `Closed` also when an engine has no breaker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum BreakerPhase {
    /// Calls flow.
    #[default]
    Closed = 0,
    /// Probe calls test the backend.
    HalfOpen = 1,
    /// No call is sent.
    Open = 2,
}

impl BreakerPhase {
    /// The phase of a gauge level (see [`BreakerState::level`]).
    pub(crate) fn from_level(level: u8) -> Self {
        match level {
            0 => BreakerPhase::Closed,
            1 => BreakerPhase::HalfOpen,
            _ => BreakerPhase::Open,
        }
    }
}

/// How a finished call counts for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallClass {
    /// It returned (items may have failed on their own merits).
    Success,
    /// The backend failed: a transient refusal, a timeout, a panic, or every record
    /// failing retryably for another reason than overload (see the judgement of a
    /// call in `reliability/classify.rs`).
    Failure,
    /// Says nothing about the backend's health: overload (which shrinks concurrency
    /// instead), a bad request, a call abandoned because its records expired.
    Ignored,
}

/// A circuit breaker: CLOSED → OPEN when the failure or slow-call rate over the
/// window reaches its threshold (with at least `min_calls` judged); OPEN →
/// HALF_OPEN after `open_wait`; HALF_OPEN lets `half_open_probes` calls through and
/// closes if their failure rate is below the threshold, else opens again.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    /// (finished at, failed, slow)
    window: VecDeque<(Instant, bool, bool)>,
    probes_sent: usize,
    probe_results: Vec<bool>,
    transitions: Vec<(Instant, BreakerState)>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            state: BreakerState::Closed,
            window: VecDeque::new(),
            probes_sent: 0,
            probe_results: Vec::new(),
            transitions: Vec::new(),
        }
    }

    /// The state at `now` (an expired open period reads as half-open).
    pub fn state(&mut self, now: Instant) -> BreakerState {
        if let BreakerState::Open { until } = self.state {
            if now >= until {
                self.transition(now, BreakerState::HalfOpen);
            }
        }
        self.state
    }

    /// Whether a call may be sent now.
    pub fn allows(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen => self.probes_sent < self.config.half_open_probes.max(1),
        }
    }

    /// A call is sent (counts half-open probes).
    pub fn on_send(&mut self, now: Instant) {
        if self.state(now) == BreakerState::HalfOpen {
            self.probes_sent += 1;
        }
    }

    /// When the breaker will next let a call through, while it is open.
    pub fn reopens_at(&self) -> Option<Instant> {
        match self.state {
            BreakerState::Open { until } => Some(until),
            _ => None,
        }
    }

    /// A call finished. `probe` tells a call sent while half-open; a result that
    /// arrives while half-open from a call sent before is not a probe and is ignored.
    pub fn on_result(&mut self, now: Instant, class: CallClass, rtt: Duration, probe: bool) {
        if class == CallClass::Ignored {
            if probe && self.state(now) == BreakerState::HalfOpen {
                // An ignored probe frees its probe slot.
                self.probes_sent = self.probes_sent.saturating_sub(1);
            }
            return;
        }
        let failed = class == CallClass::Failure;
        let slow = rtt >= self.config.slow_call;
        match self.state(now) {
            BreakerState::Closed => {
                self.window.push_back((now, failed, slow));
                self.trim(now);
                if self.tripped() {
                    self.open(now);
                }
            }
            BreakerState::HalfOpen if probe => {
                self.probe_results.push(failed || slow);
                let probes = self.config.half_open_probes.max(1);
                if self.probe_results.len() >= probes {
                    let bad = self.probe_results.iter().filter(|b| **b).count();
                    if bad as f64 / self.probe_results.len() as f64 >= self.config.failure_rate {
                        self.open(now);
                    } else {
                        self.window.clear();
                        self.transition(now, BreakerState::Closed);
                    }
                }
            }
            // Late results of calls sent before the breaker opened.
            BreakerState::HalfOpen | BreakerState::Open { .. } => {}
        }
    }

    fn trim(&mut self, now: Instant) {
        match self.config.window {
            BreakerWindow::Count(n) => {
                while self.window.len() > n.max(1) {
                    self.window.pop_front();
                }
            }
            BreakerWindow::Time(d) => {
                while self
                    .window
                    .front()
                    .is_some_and(|(t, _, _)| now.saturating_duration_since(*t) > d)
                {
                    self.window.pop_front();
                }
            }
        }
    }

    fn tripped(&self) -> bool {
        let n = self.window.len();
        if n < self.config.min_calls.max(1) {
            return false;
        }
        let failed = self.window.iter().filter(|w| w.1).count() as f64 / n as f64;
        let slow = self.window.iter().filter(|w| w.2).count() as f64 / n as f64;
        failed >= self.config.failure_rate || slow >= self.config.slow_call_rate
    }

    fn open(&mut self, now: Instant) {
        self.window.clear();
        self.transition(
            now,
            BreakerState::Open {
                until: now + self.config.open_wait,
            },
        );
    }

    fn transition(&mut self, now: Instant, to: BreakerState) {
        self.state = to;
        self.probes_sent = 0;
        self.probe_results.clear();
        self.transitions.push((now, to));
    }

    /// Transitions since the last call, oldest first.
    pub fn take_transitions(&mut self) -> Vec<(Instant, BreakerState)> {
        std::mem::take(&mut self.transitions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn config() -> BreakerConfig {
        BreakerConfig {
            window: BreakerWindow::Count(10),
            min_calls: 5,
            failure_rate: 0.5,
            open_wait: ms(1_000),
            half_open_probes: 2,
            ..BreakerConfig::default()
        }
    }

    #[test]
    fn opens_at_the_failure_rate_once_min_calls_are_judged() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        for _ in 0..4 {
            b.on_result(t, CallClass::Failure, ms(10), false);
        }
        assert!(b.allows(t), "4 calls < min_calls");
        b.on_result(t, CallClass::Success, ms(10), false);
        assert!(!b.allows(t), "4 failed of 5 ≥ 50 %");
        assert_eq!(b.reopens_at(), Some(t + ms(1_000)));
    }

    #[test]
    fn overload_and_bad_requests_never_trip_it() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        for _ in 0..100 {
            b.on_result(t, CallClass::Ignored, ms(1), false);
        }
        assert_eq!(b.state(t), BreakerState::Closed);
    }

    #[test]
    fn half_open_probes_close_it_or_open_it_again() {
        let t0 = Instant::now();
        let mut b = Breaker::new(config());
        for _ in 0..5 {
            b.on_result(t0, CallClass::Failure, ms(10), false);
        }
        let t1 = t0 + ms(999);
        assert!(!b.allows(t1));
        let t2 = t0 + ms(1_000);
        assert!(b.allows(t2));
        assert_eq!(b.state(t2), BreakerState::HalfOpen);
        b.on_send(t2);
        b.on_send(t2);
        assert!(!b.allows(t2), "only two probes");
        // A late result from before the opening is not a probe.
        b.on_result(t2, CallClass::Success, ms(10), false);
        b.on_result(t2, CallClass::Failure, ms(10), true);
        b.on_result(t2, CallClass::Success, ms(10), true);
        assert!(!b.allows(t2), "one of two probes failed: 50 % → open again");
        let t3 = t2 + ms(1_000);
        b.on_send(t3);
        b.on_send(t3);
        b.on_result(t3, CallClass::Success, ms(10), true);
        b.on_result(t3, CallClass::Success, ms(10), true);
        assert_eq!(b.state(t3), BreakerState::Closed);
        let states: Vec<&str> = b
            .take_transitions()
            .iter()
            .map(|(_, s)| s.as_str())
            .collect();
        assert_eq!(states, ["open", "half_open", "open", "half_open", "closed"]);
    }

    #[test]
    fn slow_calls_trip_it_and_a_time_window_forgets() {
        let t = Instant::now();
        let mut b = Breaker::new(BreakerConfig {
            window: BreakerWindow::Time(ms(100)),
            min_calls: 3,
            slow_call_rate: 0.6,
            slow_call: ms(500),
            ..config()
        });
        b.on_result(t, CallClass::Success, ms(900), false);
        b.on_result(t, CallClass::Success, ms(900), false);
        // The two slow calls leave the window before the third arrives.
        let later = t + ms(200);
        b.on_result(later, CallClass::Success, ms(10), false);
        assert_eq!(b.state(later), BreakerState::Closed);
        b.on_result(later, CallClass::Success, ms(900), false);
        b.on_result(later, CallClass::Success, ms(900), false);
        assert!(!b.allows(later), "2 slow of 3 ≥ 60 %");
    }
}
