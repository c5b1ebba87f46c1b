//! `[prices]` and `[budget]`: what a model's tokens cost, and a limit on what its
//! calls may spend (tokens or money) per period.
//!
//! ```toml
//! [prices]                     # per million tokens, in any currency
//! input_per_million = 0.15
//! output_per_million = 0.60
//!
//! [budget]
//! tokens = 2_000_000           # or: money = 5.0 (needs [prices])
//! period = "day"               # run (default: the whole run, or the gateway's life) | minute | hour | day
//! on_exhausted = "fail"        # fail (BudgetExhausted; the gateway answers 429) | wait (needs a period)
//! name = "openai-daily"        # said in failures (default "budget")
//! ```
//!
//! Calls are reserved when sent and settled when they answer (see
//! [`flumen_engine::spend`]): the budget is overshot only by what calls in flight
//! spend beyond their reservations.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flumen_engine::{OnExhausted, Prices, SpendBudget, SpendConfig, Unit};
use serde::Deserialize;

/// `[prices]`.
#[derive(Debug, Default, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct PricesSection {
    /// Price of a million input tokens.
    pub input_per_million: f64,
    /// Price of a million output tokens.
    #[serde(default)]
    pub output_per_million: f64,
}

/// `[budget]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetSection {
    /// A limit in tokens (input and output).
    pub tokens: Option<u64>,
    /// A limit in money, at `[prices]`.
    pub money: Option<f64>,
    /// `run` (default), `minute`, `hour` or `day`.
    pub period: Option<String>,
    /// `fail` (default) or `wait`.
    pub on_exhausted: Option<String>,
    /// The budget's name in failures (default `budget`).
    pub name: Option<String>,
}

impl PricesSection {
    /// Every problem at once, each with its path.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        for (field, v) in [
            ("input_per_million", self.input_per_million),
            ("output_per_million", self.output_per_million),
        ] {
            if !v.is_finite() || v < 0.0 {
                p.push(format!("{path}.{field}: must be a number ≥ 0, got {v}"));
            }
        }
        p
    }

    /// As the engine's prices.
    pub fn prices(&self) -> Prices {
        Prices {
            input_per_million: self.input_per_million,
            output_per_million: self.output_per_million,
        }
    }
}

fn period(name: Option<&str>) -> Result<Option<Duration>, String> {
    Ok(match name.unwrap_or("run") {
        "run" => None,
        "minute" => Some(Duration::from_secs(60)),
        "hour" => Some(Duration::from_secs(3_600)),
        "day" => Some(Duration::from_secs(86_400)),
        other => return Err(format!("`{other}` is not run, minute, hour or day")),
    })
}

impl BudgetSection {
    /// Whether there is a budget at all.
    pub fn is_set(&self) -> bool {
        self.tokens.is_some() || self.money.is_some()
    }

    /// Every problem at once, each with its path; `prices` is the model's `[prices]`.
    pub fn validate(&self, path: &str, prices: Option<&PricesSection>) -> Vec<String> {
        let mut p = Vec::new();
        let set = self.is_set();
        match (self.tokens, self.money) {
            (Some(_), Some(_)) => p.push(format!("{path}: tokens or money, not both")),
            (None, Some(m)) if !m.is_finite() || m <= 0.0 => {
                p.push(format!("{path}.money: must be a number > 0, got {m}"));
            }
            (None, Some(_)) if prices.is_none() => p.push(format!(
                "{path}.money: a money budget needs [prices] to count what calls cost"
            )),
            (Some(0), None) => p.push(format!("{path}.tokens: must be > 0")),
            _ => {}
        }
        let period = match period(self.period.as_deref()) {
            Ok(period) => period,
            Err(e) => {
                p.push(format!("{path}.period: {e}"));
                None
            }
        };
        match self.on_exhausted.as_deref() {
            None | Some("fail") => {}
            Some("wait") if period.is_none() => p.push(format!(
                "{path}.on_exhausted: `wait` needs a period (minute, hour or day): a budget for the whole run never comes back"
            )),
            Some("wait") => {}
            Some(other) => p.push(format!("{path}.on_exhausted: `{other}` is not fail or wait")),
        }
        if !set && (self.period.is_some() || self.on_exhausted.is_some() || self.name.is_some()) {
            p.push(format!("{path}: needs tokens or money"));
        }
        p
    }

    /// The engine's spending budget, for a validated section; `None` without one.
    pub fn build(&self, prices: Option<&PricesSection>) -> Option<SpendConfig> {
        let (unit, limit) = match (self.tokens, self.money, prices) {
            (Some(t), _, _) => (Unit::Tokens, t),
            (None, Some(m), Some(p)) => (Unit::Money(p.prices()), Unit::of_money(m)),
            _ => return None,
        };
        let budget = SpendBudget::new(
            self.name.as_deref().unwrap_or("budget"),
            unit,
            limit,
            period(self.period.as_deref()).ok().flatten(),
            tokio::time::Instant::now(),
        );
        Some(SpendConfig {
            budget: Arc::new(Mutex::new(budget)),
            on_exhausted: match self.on_exhausted.as_deref() {
                Some("wait") => OnExhausted::Wait,
                _ => OnExhausted::Fail,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::FileConfig;

    #[test]
    fn every_budget_problem_is_named() {
        let text = "[backend]\nkind = \"sim\"\n[budget]\nmoney = 5.0\nperiod = \"week\"\non_exhausted = \"wait\"\n";
        let problems = FileConfig::parse("p", text).unwrap().validate();
        for path in [
            "budget.money: a money budget needs [prices]",
            "budget.period: `week`",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(path)),
                "{path}: {problems:?}"
            );
        }
        for period in ["", "period = \"run\"\n"] {
            let text = format!(
                "[backend]\nkind = \"sim\"\n[budget]\ntokens = 10\n{period}on_exhausted = \"wait\"\n"
            );
            let problems = FileConfig::parse("p", &text).unwrap().validate();
            assert!(
                problems[0].starts_with("budget.on_exhausted: `wait` needs a period"),
                "{problems:?}"
            );
        }
        let text = "[backend]\nkind = \"sim\"\n[prices]\ninput_per_million = -1.0\n[budget]\nmoney = 1.0\nperiod = \"day\"\n";
        let problems = FileConfig::parse("p", text).unwrap().validate();
        assert!(
            problems[0].starts_with("prices.input_per_million"),
            "{problems:?}"
        );
        let fine = "[backend]\nkind = \"sim\"\n[prices]\ninput_per_million = 0.1\n[budget]\nmoney = 1.0\nperiod = \"day\"\non_exhausted = \"wait\"\n";
        let config = FileConfig::parse("p", fine).unwrap();
        assert!(config.validate().is_empty());
        assert!(config.budget.build(config.prices.as_ref()).is_some());
    }
}
