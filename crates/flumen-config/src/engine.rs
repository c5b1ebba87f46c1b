//! `[engine]` and `[operator]`: how records are batched, how many calls run, how
//! failures are retried; the operator's order, capacity and deadline. Both turn into
//! the engine's own settings here, and nowhere else.

use std::time::Duration;

use flumen_engine::{
    AimdConfig, BatchConfig, BreakerConfig, BreakerWindow, ConcurrencyConfig, EngineConfig,
    GradientConfig, OperatorConfig, OrderMode, RetryConfig, SchedulingConfig,
};
use serde::Deserialize;

/// `[engine]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Records per call at most (default: the backend's).
    pub max_batch: Option<usize>,
    /// Triton-style wait for a fuller batch, ms.
    pub max_wait_ms: Option<u64>,
    /// Send whatever is queued the moment a backend slot frees, never holding the slot
    /// for a batch as efficient as the calls in flight (default false: hold it for up
    /// to 15 % of a call's fixed cost, which lifts closed loops of callers).
    pub eager: bool,
    /// Token budget per call.
    pub max_batch_tokens: Option<u64>,
    /// `adaptive` (default; also `gradient`), `aimd`, or a fixed number: see
    /// [`concurrency`].
    pub concurrency: Option<toml::Value>,
    /// Attempts per record at most.
    pub max_attempts: Option<u32>,
    /// Abandon and retry a call after this long, ms.
    pub attempt_timeout_ms: Option<u64>,
    /// Hedge idempotent calls after this long, ms.
    pub hedge_after_ms: Option<u64>,
    /// Turn the circuit breaker on (Resilience4j-like defaults: a window of 100
    /// calls, opens at 50 % failures once 20 calls are in it, 30 s open).
    pub breaker: bool,
    /// Calls the breaker's window must hold before it may open (default 20).
    pub breaker_min_calls: Option<usize>,
    /// Judge the calls that finished in the last this many seconds, rather than the
    /// last 100 calls (default: by count).
    pub breaker_window_s: Option<u64>,
    /// How long the breaker stays open before half-open probes, ms (default 30,000).
    pub breaker_open_ms: Option<u64>,
    /// The share of each call's records owed to a less urgent priority class while
    /// it waits, 0 to 0.5 (default 0.1): a bulk stream keeps at least this much of
    /// the backend under any interactive load.
    pub min_share: Option<f64>,
}

/// `[operator]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OperatorSection {
    /// `unordered`, `ordered`, `keyed` (by `key_field`) or `partition` (per source
    /// partition, for Kafka).
    pub order: Option<String>,
    /// Records in flight (default 1,000).
    pub capacity: Option<usize>,
    /// Per-record deadline, ms (default 60,000; 0: none).
    pub timeout_ms: Option<u64>,
    /// With `keyed`: the record field holding the key.
    pub key_field: Option<String>,
}

impl EngineSection {
    /// Every problem with these settings, each under `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(c) = &self.concurrency {
            if let Err(e) = concurrency(c) {
                p.push(format!("{path}.concurrency: {e}"));
            }
        }
        for (field, zero) in [
            ("max_batch", self.max_batch == Some(0)),
            ("max_batch_tokens", self.max_batch_tokens == Some(0)),
            ("max_attempts", self.max_attempts == Some(0)),
            ("attempt_timeout_ms", self.attempt_timeout_ms == Some(0)),
            ("hedge_after_ms", self.hedge_after_ms == Some(0)),
            ("breaker_min_calls", self.breaker_min_calls == Some(0)),
            ("breaker_window_s", self.breaker_window_s == Some(0)),
        ] {
            if zero {
                p.push(format!("{path}.{field}: must be > 0"));
            }
        }
        if let Some(share) = self.min_share {
            if !(0.0..=0.5).contains(&share) {
                p.push(format!(
                    "{path}.min_share: must be between 0 and 0.5, not {share}"
                ));
            }
        }
        if !self.breaker
            && (self.breaker_min_calls.is_some()
                || self.breaker_open_ms.is_some()
                || self.breaker_window_s.is_some())
        {
            p.push(format!(
                "{path}.breaker: set it to true to use breaker_min_calls, breaker_open_ms or breaker_window_s"
            ));
        }
        p
    }

    /// The engine's settings, for a validated section.
    pub fn config(&self, name: &str) -> EngineConfig {
        let e = self;
        EngineConfig {
            name: name.into(),
            batch: BatchConfig {
                max_items: e.max_batch,
                max_tokens: e.max_batch_tokens,
                max_wait: e.max_wait_ms.map(Duration::from_millis),
                eager: e.eager,
                ..BatchConfig::default()
            },
            concurrency: e
                .concurrency
                .as_ref()
                .and_then(|c| concurrency(c).ok())
                .unwrap_or_default(),
            retry: RetryConfig {
                max_attempts: e
                    .max_attempts
                    .unwrap_or(RetryConfig::default().max_attempts),
                ..RetryConfig::default()
            },
            breaker: e.breaker.then(|| {
                let d = BreakerConfig::default();
                BreakerConfig {
                    min_calls: e.breaker_min_calls.unwrap_or(d.min_calls),
                    window: e
                        .breaker_window_s
                        .map_or(d.window, |s| BreakerWindow::Time(Duration::from_secs(s))),
                    open_wait: e
                        .breaker_open_ms
                        .map(Duration::from_millis)
                        .unwrap_or(d.open_wait),
                    ..d
                }
            }),
            attempt_timeout: e.attempt_timeout_ms.map(Duration::from_millis),
            hedge_after: e.hedge_after_ms.map(Duration::from_millis),
            seed: 0,
            // `[cache]` and `[budget]` are sections of their own.
            cache: None,
            spend: None,
            prices: None,
            // Upstream limits are the gateway's (`[models.upstream]`).
            rate: None,
            // Set by what builds a fallback chain (`flumen run`'s `[[fallback]]`).
            hand_off: false,
            scheduling: SchedulingConfig {
                min_share: e
                    .min_share
                    .unwrap_or(flumen_engine::schedule::DEFAULT_MIN_SHARE),
            },
        }
    }
}

/// `concurrency`: `"adaptive"` (the latency-gradient controller, the default; also
/// spelled `"gradient"`), `"aimd"`, or a positive number of calls. The one parser,
/// for TOML values and for `flumen run --concurrency` (see [`concurrency_flag`]).
pub fn concurrency(v: &toml::Value) -> Result<ConcurrencyConfig, String> {
    match v {
        toml::Value::String(s) if s == "adaptive" || s == "gradient" => {
            Ok(ConcurrencyConfig::Gradient(GradientConfig::default()))
        }
        toml::Value::String(s) if s == "aimd" => Ok(ConcurrencyConfig::Aimd(AimdConfig::default())),
        toml::Value::Integer(n) if *n > 0 => Ok(ConcurrencyConfig::Fixed(*n as usize)),
        toml::Value::String(s) => Err(format!(
            "`{s}` is not \"adaptive\", \"aimd\" or a positive number"
        )),
        other => Err(format!(
            "`{other}` is not \"adaptive\", \"aimd\" or a positive number"
        )),
    }
}

/// A flag's text as the TOML value it stands for: a whole number, or a string.
pub fn concurrency_flag(text: &str) -> toml::Value {
    text.parse::<i64>().map_or_else(
        |_| toml::Value::String(text.to_owned()),
        toml::Value::Integer,
    )
}

/// The orders an operator may keep.
const ORDERS: &str = "unordered, ordered, keyed or partition";

impl OperatorSection {
    /// Every problem with these settings, each under `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.capacity == Some(0) {
            p.push(format!("{path}.capacity: must be > 0"));
        }
        match self.order.as_deref() {
            None | Some("unordered") | Some("ordered") | Some("partition") => {}
            Some("keyed") if self.key_field.is_none() => p.push(format!(
                "{path}.key_field: required when {path}.order is \"keyed\""
            )),
            Some("keyed") => {}
            Some(o) => p.push(format!("{path}.order: `{o}` is not {ORDERS}")),
        }
        p
    }

    /// The operator's settings, for a validated section: `keyed` and `partition`
    /// both keep order per key (what the key is, the caller decides).
    pub fn config(&self) -> OperatorConfig {
        OperatorConfig {
            order: match self.order.as_deref() {
                Some("ordered") => OrderMode::Ordered,
                Some("keyed") | Some("partition") => OrderMode::Keyed,
                _ => OrderMode::Unordered,
            },
            capacity: self.capacity.unwrap_or(DEFAULT_CAPACITY),
            timeout: match self.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS) {
                0 => None,
                t => Some(Duration::from_millis(t)),
            },
        }
    }
}

/// Records in flight when `capacity` is not given.
pub(crate) const DEFAULT_CAPACITY: usize = 1_000;
/// A record's deadline when `timeout_ms` is not given, ms.
pub(crate) const DEFAULT_TIMEOUT_MS: u64 = 60_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_has_one_vocabulary_for_files_and_flags() {
        let gradient = ConcurrencyConfig::Gradient(GradientConfig::default());
        for text in ["adaptive", "gradient"] {
            assert_eq!(concurrency(&concurrency_flag(text)), Ok(gradient.clone()));
            let v = toml::Value::String(text.into());
            assert_eq!(concurrency(&v), Ok(gradient.clone()));
        }
        assert_eq!(
            concurrency(&concurrency_flag("aimd")),
            Ok(ConcurrencyConfig::Aimd(AimdConfig::default()))
        );
        assert_eq!(
            concurrency(&concurrency_flag("8")),
            Ok(ConcurrencyConfig::Fixed(8))
        );
        assert_eq!(
            concurrency(&toml::Value::Integer(8)),
            Ok(ConcurrencyConfig::Fixed(8))
        );
        for bad in ["0", "-3", "lots", "8.5", ""] {
            let e = concurrency(&concurrency_flag(bad)).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
        assert!(concurrency(&toml::Value::Boolean(true)).is_err());
    }

    #[test]
    fn zero_is_refused_wherever_it_means_nothing() {
        let zero = EngineSection {
            max_batch: Some(0),
            max_batch_tokens: Some(0),
            max_attempts: Some(0),
            attempt_timeout_ms: Some(0),
            hedge_after_ms: Some(0),
            breaker: true,
            breaker_min_calls: Some(0),
            breaker_window_s: Some(0),
            ..EngineSection::default()
        };
        let p = zero.validate("engine");
        for field in [
            "max_batch",
            "max_batch_tokens",
            "max_attempts",
            "attempt_timeout_ms",
            "hedge_after_ms",
            "breaker_min_calls",
            "breaker_window_s",
        ] {
            let want = format!("engine.{field}: must be > 0");
            assert!(p.contains(&want), "{want} missing in {p:#?}");
        }
        assert_eq!(p.len(), 7, "{p:#?}");
        assert!(EngineSection::default().validate("engine").is_empty());
    }

    #[test]
    fn operator_sections_default_as_documented() {
        let o = OperatorSection::default().config();
        assert_eq!(o.order, OrderMode::Unordered);
        assert_eq!(o.capacity, 1_000);
        assert_eq!(o.timeout, Some(Duration::from_secs(60)));
        let none = OperatorSection {
            timeout_ms: Some(0),
            order: Some("partition".into()),
            ..OperatorSection::default()
        };
        assert_eq!(none.config().timeout, None, "0 is no deadline");
        assert_eq!(none.config().order, OrderMode::Keyed);
        let bad = OperatorSection {
            order: Some("sideways".into()),
            capacity: Some(0),
            ..OperatorSection::default()
        };
        let p = bad.validate("operator");
        assert!(p[0].starts_with("operator.capacity"), "{p:?}");
        assert!(p[1].starts_with("operator.order: `sideways`"), "{p:?}");
    }
}
