//! Spending budgets: a limit on the tokens (or the money, from per-token prices) a
//! period's calls may cost, that holds while calls run concurrently.
//!
//! A call's cost is **reserved** when it is sent — its input tokens, plus the most
//! output tokens its records may cost ([`Backend::max_output_tokens`]) — and
//! **settled** when it ends, with its input tokens and the output tokens its answers
//! did cost ([`Backend::output_tokens`]). A call is sent only if what is spent, plus
//! what is reserved by the calls in flight, plus its own reservation, fits the limit.
//!
//! The bound: what a period spends exceeds its limit by at most what the calls in
//! flight spend beyond their reservations — zero when a backend's output estimate is
//! an upper bound (embeddings, tensors: no output tokens; chat with `max_tokens`).
//! Calls are charged their input whatever their end (a provider may bill a call
//! that timed out), except a call refused as overloaded, which is not billed.
//!
//! [`Backend::max_output_tokens`]: flumen_core::Backend::max_output_tokens
//! [`Backend::output_tokens`]: flumen_core::Backend::output_tokens

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Prices per million tokens, in any currency (the budget's limit is in the same).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prices {
    /// Price of a million input tokens.
    pub input_per_million: f64,
    /// Price of a million output tokens.
    pub output_per_million: f64,
}

/// Money is counted in billionths of the currency unit, so that integer sums are exact.
const NANO: f64 = 1e9;

impl Prices {
    /// The cost of `input` and `output` tokens, in billionths of the currency.
    pub fn nanos(&self, input: u64, output: u64) -> u64 {
        let cost =
            (input as f64 * self.input_per_million + output as f64 * self.output_per_million) / 1e6;
        (cost * NANO).round() as u64
    }
}

/// What a budget's limit counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unit {
    /// Input plus output tokens.
    Tokens,
    /// Money: tokens at these prices (the limit in billionths of the currency).
    Money(Prices),
}

impl Unit {
    /// The cost of `input` and `output` tokens in this unit.
    pub fn cost(&self, input: u64, output: u64) -> u64 {
        match self {
            Unit::Tokens => input.saturating_add(output),
            Unit::Money(p) => p.nanos(input, output),
        }
    }

    /// `amount` as a person reads it: `1234 tokens`, or `0.012300` (money).
    pub fn show(&self, amount: u64) -> String {
        match self {
            Unit::Tokens => format!("{amount} tokens"),
            Unit::Money(_) => format!("{:.6}", amount as f64 / NANO),
        }
    }

    /// A money amount (in the currency) in this unit's integers.
    pub fn of_money(amount: f64) -> u64 {
        (amount * NANO).round() as u64
    }
}

/// What to do with a record whose call the budget cannot pay for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnExhausted {
    /// Fail it at once with [`ErrorKind::BudgetExhausted`](flumen_core::ErrorKind).
    #[default]
    Fail,
    /// Keep it queued until the next period (backpressure), within its deadline.
    Wait,
}

/// A call's budget could not be reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// When the period ends and the budget is whole again (`None`: never).
    pub resets_at: Option<Instant>,
    /// Whether what is already spent leaves no room for the call: `false` when only
    /// the reservations of calls in flight are in the way (they may settle for less).
    pub spent: bool,
    /// Whether the call costs more than the whole limit: it can never be paid for.
    pub never_fits: bool,
    /// Why, for the record's failure: the budget's name, what is spent and reserved.
    pub message: String,
}

/// A budget's state: the pure policy (no clock of its own; every call is given `now`).
#[derive(Debug, Clone)]
pub struct SpendBudget {
    name: String,
    unit: Unit,
    limit: u64,
    period: Option<Duration>,
    window_start: Instant,
    spent: u64,
    reserved: u64,
}

/// A point-in-time copy of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendSnapshot {
    /// Spent in the current period (settled calls).
    pub spent: u64,
    /// Reserved by the calls in flight.
    pub reserved: u64,
    /// The period's limit.
    pub limit: u64,
}

impl SpendBudget {
    /// A budget named `name` (said in failures) of `limit` per `period` (`None`:
    /// once, for the budget's whole life), starting now.
    pub fn new(name: &str, unit: Unit, limit: u64, period: Option<Duration>, now: Instant) -> Self {
        SpendBudget {
            name: name.to_owned(),
            unit,
            limit,
            period: period.filter(|p| !p.is_zero()),
            window_start: now,
            spent: 0,
            reserved: 0,
        }
    }

    /// What the budget counts.
    pub fn unit(&self) -> Unit {
        self.unit
    }

    /// The budget's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn roll(&mut self, now: Instant) {
        if let Some(p) = self.period {
            if now >= self.window_start + p {
                let periods = (now - self.window_start).as_nanos() / p.as_nanos();
                self.window_start += p * u32::try_from(periods).unwrap_or(u32::MAX);
                self.spent = 0;
            }
        }
    }

    /// Reserves `amount` for a call, if it fits.
    pub fn reserve(&mut self, now: Instant, amount: u64) -> Result<(), Exhausted> {
        self.roll(now);
        if self
            .spent
            .saturating_add(self.reserved)
            .saturating_add(amount)
            <= self.limit
        {
            self.reserved += amount;
            return Ok(());
        }
        let resets_at = self.period.map(|p| self.window_start + p);
        if amount > self.limit {
            return Err(Exhausted {
                resets_at,
                spent: true,
                never_fits: true,
                message: format!(
                    "budget `{}`: this call needs {}, more than the whole budget of {}",
                    self.name,
                    self.unit.show(amount),
                    self.unit.show(self.limit)
                ),
            });
        }
        Err(Exhausted {
            resets_at,
            spent: self.spent.saturating_add(amount) > self.limit,
            never_fits: false,
            message: format!(
                "budget `{}` is spent: {} of {} {}, {} reserved by calls in flight, this call needs {}{}",
                self.name,
                self.unit.show(self.spent),
                self.unit.show(self.limit),
                match self.period {
                    Some(p) => format!("per {} s", p.as_secs()),
                    None => "in all".into(),
                },
                self.unit.show(self.reserved),
                self.unit.show(amount),
                match resets_at {
                    Some(at) => format!("; it resets in {} s", (at - now).as_secs().max(1)),
                    None => String::new(),
                }
            ),
        })
    }

    /// A call that reserved `reserved` ended having cost `actual`.
    pub fn settle(&mut self, now: Instant, reserved: u64, actual: u64) {
        self.roll(now);
        self.reserved = self.reserved.saturating_sub(reserved);
        self.spent = self.spent.saturating_add(actual);
    }

    /// The budget now.
    pub fn snapshot(&mut self, now: Instant) -> SpendSnapshot {
        self.roll(now);
        SpendSnapshot {
            spent: self.spent,
            reserved: self.reserved,
            limit: self.limit,
        }
    }
}

/// An engine's spending budget: shared (one budget may cover several engines), with
/// what to do when it is spent.
#[derive(Debug, Clone)]
pub struct SpendConfig {
    /// The budget, shared by every engine that spends from it.
    pub budget: Arc<Mutex<SpendBudget>>,
    /// What happens to records the budget cannot pay for.
    pub on_exhausted: OnExhausted,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_hold_the_limit_and_periods_renew_it() {
        let t0 = Instant::now();
        let mut b = SpendBudget::new("b", Unit::Tokens, 100, Some(Duration::from_secs(60)), t0);
        assert!(b.reserve(t0, 60).is_ok());
        // 60 reserved: 50 more does not fit, only because of the reservation; 40 does.
        let e = b.reserve(t0, 50).unwrap_err();
        assert_eq!(e.resets_at, Some(t0 + Duration::from_secs(60)));
        assert!(!e.spent, "only the reservation is in the way");
        assert!(e.message.contains("budget `b` is spent"), "{}", e.message);
        assert!(b.reserve(t0, 40).is_ok());
        // The first call cost less than it reserved: the difference comes back.
        b.settle(t0, 60, 30);
        assert!(b.reserve(t0, 30).is_ok());
        assert!(b.reserve(t0, 1).is_err());
        b.settle(t0, 40, 40);
        b.settle(t0, 30, 30);
        assert!(b.reserve(t0, 1).unwrap_err().spent, "100 of 100 spent");
        // The next period starts spent-free; a reservation in flight carries over.
        let t1 = t0 + Duration::from_secs(61);
        assert!(b.reserve(t1, 70).is_ok());
        let t2 = t0 + Duration::from_secs(125);
        let s = b.snapshot(t2);
        assert_eq!((s.spent, s.reserved), (0, 70));
        assert!(b.reserve(t2, 30).is_ok());
        assert!(b.reserve(t2, 1).is_err());
    }

    #[test]
    fn money_is_counted_exactly() {
        let p = Prices {
            input_per_million: 0.02,
            output_per_million: 0.6,
        };
        assert_eq!(p.nanos(1_000_000, 0), 20_000_000);
        assert_eq!(Unit::Money(p).cost(500, 100), 10_000 + 60_000);
        assert_eq!(Unit::of_money(0.5), 500_000_000);
        assert_eq!(Unit::Money(p).show(20_000_000), "0.020000");
    }
}
