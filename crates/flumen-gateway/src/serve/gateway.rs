//! The gateway's protocol-neutral core, shared by every front (OpenAI and KServe over
//! HTTP, KServe over gRPC): one engine per model, bearer-token checks, request
//! limits, admission control, deadlines, and a [`Reject`] with a reason each front
//! maps to its own status. Nothing here knows HTTP or gRPC.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use flumen_config::AnyBackend;
use flumen_core::{ErrorKind, Failure};
use flumen_engine::{BreakerPhase, Engine};
use serde_json::Value;
use tokio::time::Instant;

use super::tensors::Tensors;

/// One served model.
pub(crate) struct Model {
    pub(crate) engine: Engine<AnyBackend>,
    /// Records of this model in its engine now, for admission control.
    pub(crate) pending: AtomicUsize,
    /// Its tensors, as the KServe fronts serve and check them.
    pub(crate) tensors: Tensors,
    /// Requests answered and failed (admitted ones), for statistics.
    pub(crate) answered: AtomicU64,
    pub(crate) failed: AtomicU64,
    /// The backend is an OpenAI-compatible chat model: chat requests go through whole.
    pub(crate) openai_chat: bool,
    /// `truncate_dimensions`: embeddings may be shortened (`dimensions`).
    pub(crate) truncate_dimensions: bool,
}

/// The gateway: its models and the limits every front applies alike.
pub(crate) struct Gateway {
    pub(crate) models: BTreeMap<String, Model>,
    pub(crate) metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub(crate) token: Option<String>,
    /// Endpoints answered without the token when one is set.
    pub(crate) open: Open,
    pub(crate) max_items: usize,
    pub(crate) max_pending: usize,
    pub(crate) timeout: Duration,
}

/// What the statistics extension (HTTP and gRPC) reports of a model.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counts {
    /// Requests answered and failed.
    pub(crate) answered: u64,
    pub(crate) failed: u64,
    /// Rows sent to the backend, and backend calls.
    pub(crate) rows: u64,
    pub(crate) calls: u64,
}

impl Model {
    /// Its statistics so far.
    pub(crate) fn counts(&self) -> Counts {
        let stats = self.engine.stats();
        Counts {
            answered: self.answered.load(Relaxed),
            failed: self.failed.load(Relaxed),
            rows: stats.records_sent,
            calls: stats.calls,
        }
    }

    /// The most rows its backend takes in one call.
    pub(crate) fn max_batch(&self) -> usize {
        flumen_core::Backend::capabilities(self.engine.backend().as_ref()).max_batch_items
    }
}

/// What a request is for, as far as the bearer token goes: every endpoint needs it
/// when one is set, except health, metrics and the status page when
/// `server.unauthenticated` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// Liveness and readiness of the server (HTTP `/health/*`, `/v2/health/*`; gRPC
    /// `ServerLive`, `ServerReady`).
    Health,
    /// Prometheus `/metrics`.
    Metrics,
    /// The status page: `/`, `/status.json` and the page's assets.
    Status,
    /// Everything else: models, their metadata and readiness, inference, the server's
    /// metadata.
    Model,
}

/// `server.unauthenticated`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Open {
    pub(crate) health: bool,
    pub(crate) metrics: bool,
    pub(crate) status: bool,
}

impl Open {
    fn admits(self, endpoint: Endpoint) -> bool {
        match endpoint {
            Endpoint::Health => self.health,
            Endpoint::Metrics => self.metrics,
            Endpoint::Status => self.status,
            Endpoint::Model => false,
        }
    }
}

/// The gateway as every front's handlers share it.
pub(crate) type Shared = Arc<Gateway>;

/// Records counted against a model's `max_pending`, given back when dropped — also
/// when the caller disconnects and the request's future is dropped midway.
struct Admitted<'a> {
    pending: &'a AtomicUsize,
    n: usize,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.pending.fetch_sub(self.n, Relaxed);
    }
}

/// Why a request was turned away, whatever the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// A missing or wrong bearer token.
    Unauthorized,
    /// No model of that name.
    UnknownModel,
    /// Nothing to infer.
    NoInput,
    /// More items than one request may carry.
    TooManyItems,
    /// Admission control: the model has `max_pending` records already; retry later.
    Busy,
    /// A record failed in the engine, with this kind.
    Failed(ErrorKind),
}

/// A request turned away: why, and a message for the caller.
#[derive(Debug)]
pub(crate) struct Reject {
    pub(crate) reason: Reason,
    pub(crate) message: String,
}

impl Reject {
    pub(crate) fn new(reason: Reason, message: impl Into<String>) -> Self {
        Reject {
            reason,
            message: message.into(),
        }
    }

    /// A record's failure: the request fails with it.
    fn failed(f: &Failure) -> Self {
        Reject::new(Reason::Failed(f.kind), f.to_string())
    }
}

/// Equal in constant time (for equal lengths): no early exit on the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl Gateway {
    /// The configured models' names, in order.
    pub(crate) fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Whether `name` is served.
    pub(crate) fn has_model(&self, name: &str) -> bool {
        self.models.contains_key(name)
    }

    /// A served model.
    pub(crate) fn model(&self, name: &str) -> Option<&Model> {
        self.models.get(name)
    }

    /// The model `name` for a KServe front, at `version` when one is asked for (an
    /// empty one is none); else Triton's message for an unknown model.
    pub(crate) fn served(&self, name: &str, version: Option<&str>) -> Result<&Model, String> {
        let m = self
            .model(name)
            .ok_or_else(|| format!("Request for unknown model: '{name}' is not found"))?;
        match version.filter(|v| !v.is_empty()) {
            Some(v) if !m.tensors.versions.iter().any(|x| x == v) => Err(format!(
                "Request for unknown model: '{name}' version {v} is not found"
            )),
            _ => Ok(m),
        }
    }

    /// The models whose circuit breaker is open: they cannot take requests now.
    pub(crate) fn open_circuits(&self) -> Vec<&str> {
        self.models
            .iter()
            .filter(|(_, m)| m.engine.stats().breaker == BreakerPhase::Open)
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// Checks an `Authorization` value (`Bearer …`) against the configured token, for
    /// a request to `endpoint`.
    pub(crate) fn check_access(
        &self,
        endpoint: Endpoint,
        authorization: Option<&str>,
    ) -> Result<(), Reject> {
        if self.open.admits(endpoint) {
            return Ok(());
        }
        self.check_token(authorization)
    }

    /// Checks an `Authorization` value (`Bearer …`) against the configured token.
    pub(crate) fn check_token(&self, authorization: Option<&str>) -> Result<(), Reject> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let sent = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if same(sent.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(Reject::new(
                Reason::Unauthorized,
                "missing or wrong bearer token",
            ))
        }
    }

    /// A request's deadline: the caller's timeout (capped at ten times the default),
    /// or the default.
    pub(crate) fn deadline(&self, caller: Option<Duration>) -> Instant {
        Instant::now() + caller.map_or(self.timeout, |t| t.min(self.timeout * 10))
    }

    /// Runs `records` through `model`'s engine: all results, or the first failure.
    pub(crate) async fn run(
        &self,
        name: &str,
        records: Vec<Value>,
        deadline: Instant,
    ) -> Result<Vec<Value>, Reject> {
        let model = self
            .models
            .get(name)
            .ok_or_else(|| Reject::new(Reason::UnknownModel, format!("unknown model `{name}`")))?;
        if records.is_empty() {
            return Err(Reject::new(Reason::NoInput, "no input"));
        }
        if records.len() > self.max_items {
            return Err(Reject::new(
                Reason::TooManyItems,
                format!(
                    "{} items; at most {} per request",
                    records.len(),
                    self.max_items
                ),
            ));
        }
        // Admission control: answer early rather than queue without bound.
        let n = records.len();
        let admitted = Admitted {
            pending: &model.pending,
            n,
        };
        if model.pending.fetch_add(n, Relaxed) + n > self.max_pending {
            // `admitted` gives the places back as it drops.
            return Err(Reject::new(
                Reason::Busy,
                "the model is overloaded; retry later",
            ));
        }
        let pending: Vec<_> = records
            .into_iter()
            .map(|r| model.engine.submit(r, Some(deadline)))
            .collect();
        let results = futures::future::join_all(pending).await;
        drop(admitted);
        let out: Result<Vec<Value>, Reject> = results
            .into_iter()
            .map(|r| r.map_err(|f| Reject::failed(&f)))
            .collect();
        match &out {
            Ok(_) => model.answered.fetch_add(1, Relaxed),
            Err(_) => model.failed.fetch_add(1, Relaxed),
        };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_without_shortcuts() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"", b"x"));
    }

    #[test]
    fn a_failure_rejects_with_its_kind() {
        let r = Reject::failed(&Failure::new(ErrorKind::Timeout, "too slow", 2));
        assert_eq!(r.reason, Reason::Failed(ErrorKind::Timeout));
        assert!(r.message.contains("too slow"), "{}", r.message);
    }
}
