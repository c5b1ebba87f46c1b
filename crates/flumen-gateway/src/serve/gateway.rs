//! The gateway's protocol-neutral core, shared by every front (OpenAI and KServe over
//! HTTP, KServe over gRPC): one engine per model, bearer-token checks, request
//! limits, admission control, deadlines, and a [`Reject`] with a reason each front
//! maps to its own status. Nothing here knows HTTP or gRPC.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use flumen_config::AnyBackend;
use flumen_core::{Backend, ErrorKind, Failure};
use flumen_engine::{BreakerPhase, Class, Engine, Lane};
use serde_json::Value;
use tokio::time::Instant;

use super::quota::{Asked, Quotas};
use super::tenants::{Entry, KeyStore};
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
    /// `stream: true` is relayed from the backend as it comes (see `stream.rs`):
    /// an OpenAI-compatible chat model with no budget and no upstream limits.
    pub(crate) relays_streams: bool,
    /// `truncate_dimensions`: embeddings may be shortened (`dimensions`).
    pub(crate) truncate_dimensions: bool,
}

/// The gateway: its models and the limits every front applies alike.
pub(crate) struct Gateway {
    pub(crate) models: BTreeMap<String, Model>,
    pub(crate) metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub(crate) token: Option<String>,
    /// The tenants' keys (`server.keys_file`), when there is a file.
    pub(crate) keys: Option<Arc<KeyStore>>,
    /// Where quota buckets live (`[quota]`).
    pub(crate) quotas: Arc<Quotas>,
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
    /// The caller's tenant is over a quota (requests or tokens per minute, pending
    /// records); retry after this many seconds.
    Quota { retry_after_s: u64 },
    /// A request header or parameter is not what it must be (named in the message).
    BadRequest,
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
    pub(crate) fn failed(f: &Failure) -> Self {
        Reject::new(Reason::Failed(f.kind), f.to_string())
    }
}

/// The header (HTTP) or metadata key (gRPC) a caller names its records' priority
/// class in.
pub(crate) const PRIORITY_HEADER: &str = "x-flumen-priority";

/// A priority class as a request gives it: `interactive`, `default`, `bulk`, a level
/// 0–7; `what` names where it came from for the error.
pub(crate) fn class_of(value: &str, what: &str) -> Result<Class, Reject> {
    Class::parse(value).ok_or_else(|| {
        Reject::new(
            Reason::BadRequest,
            format!("{what}: `{value}` is not a priority class (interactive, default, bulk, or a level 0-7)"),
        )
    })
}

/// How many of a model's `max_pending` places records of `class` may fill: all for
/// `interactive` and `default`, a tenth less for each level below (`bulk` 90 %, down
/// to half), so that a bulk flood leaves room for the more urgent — which the queue
/// then sends first.
pub(crate) fn admits(max_pending: usize, class: Class) -> usize {
    let keep = 0.1 * f64::from(class.get().saturating_sub(1).min(5));
    ((max_pending as f64) * (1.0 - keep)).ceil() as usize
}

/// The token of an `Authorization: Bearer …` value ("" without one).
fn bearer(authorization: Option<&str>) -> &str {
    authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}

/// Who a request is for: its tenant, if the gateway has tenants and its key named
/// one, and the priority class its records queue in.
#[derive(Debug, Clone, Default)]
pub(crate) struct Who {
    pub(crate) tenant: Option<Arc<Entry>>,
    pub(crate) class: Class,
}

/// A tenant's quota by the minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Quota {
    Rpm,
    Tpm,
}

/// Records counted against a tenant's `max_pending`, given back when dropped.
pub(crate) struct TenantPending<'a>(&'a AtomicUsize, usize);

impl Drop for TenantPending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Relaxed);
    }
}

impl TenantPending<'_> {
    /// Keeps the records counted past this guard: whoever holds the tenant gives
    /// them back (a stream, when it ends).
    pub(crate) fn keep(mut self) {
        self.1 = 0;
    }
}

/// Equal in constant time (for equal lengths): no early exit on the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl Gateway {
    /// A tenant's request of `n` records and `tokens` input tokens against its
    /// quotas: its pending records (held until the returned guard drops), then a
    /// request from its RPM bucket and the tokens from its TPM bucket — in the
    /// shared store when there is one, else (or while it does not answer) here.
    pub(crate) async fn admit_tenant<'a>(
        &self,
        t: &'a Entry,
        n: usize,
        tokens: u64,
    ) -> Result<TenantPending<'a>, Reject> {
        let name = &*t.tenant.name;
        let refuse = |quota: &'static str, retry: Duration, message: String| {
            metrics::counter!("flumen_tenant_rejections_total", "tenant" => name.to_owned(), "quota" => quota).increment(1);
            Reject::new(
                Reason::Quota {
                    retry_after_s: retry.as_secs_f64().ceil().max(1.0) as u64,
                },
                message,
            )
        };
        let usage = &t.usage;
        let held = TenantPending(&usage.pending, n);
        let pending = usage.pending.fetch_add(n, Relaxed) + n;
        if let Some(cap) = t.tenant.max_pending {
            if pending > cap {
                return Err(refuse(
                    "pending",
                    Duration::from_secs(1),
                    format!("tenant `{name}` has {} records pending, at most {cap} (max_pending); retry later", pending - n),
                ));
            }
        }
        if let Some(rpm) = t.tenant.rpm {
            if let Err(wait) = self
                .take_tenant(t, Quota::Rpm, f64::from(rpm), 1.0, false)
                .await
            {
                let wait = wait.unwrap_or(Duration::from_secs(60));
                return Err(refuse(
                    "rpm",
                    wait,
                    format!(
                        "tenant `{name}` is over its {rpm} requests per minute (rpm); the next is allowed in {} ms",
                        wait.as_millis()
                    ),
                ));
            }
        }
        if let Some(tpm) = t.tenant.tpm {
            if let Err(wait) = self
                .take_tenant(t, Quota::Tpm, tpm as f64, tokens as f64, false)
                .await
            {
                // The request is not sent: its request is not counted either.
                if let Some(rpm) = t.tenant.rpm {
                    let _ = self
                        .take_tenant(t, Quota::Rpm, f64::from(rpm), -1.0, true)
                        .await;
                }
                return Err(match wait {
                    Some(wait) => refuse(
                        "tpm",
                        wait,
                        format!(
                            "tenant `{name}` is over its {tpm} tokens per minute (tpm): this request needs {tokens}; allowed in {} ms",
                            wait.as_millis()
                        ),
                    ),
                    None => refuse(
                        "tpm",
                        Duration::from_secs(60),
                        format!(
                            "this request needs {tokens} tokens, more than tenant `{name}`'s {tpm} tokens per minute (tpm) allow at once; send fewer inputs"
                        ),
                    ),
                });
            }
        }
        Ok(held)
    }

    /// Takes `n` from a tenant's bucket (`charge`: whatever is left; negative gives
    /// back): in the shared store, or here.
    pub(crate) async fn take_tenant(
        &self,
        t: &Entry,
        quota: Quota,
        limit: f64,
        n: f64,
        charge: bool,
    ) -> Result<(), Option<Duration>> {
        let which = match quota {
            Quota::Rpm => "rpm",
            Quota::Tpm => "tpm",
        };
        let key = format!("tenant:{}:{which}", t.tenant.name);
        match self.quotas.take(&key, limit, limit, n, charge).await {
            Asked::Answered(r) => r,
            Asked::Local => {
                let now = Instant::now();
                // A replica that takes over its share of a shared quota starts from
                // an empty bucket, so the outage adds no burst.
                let outage = self.quotas.outages();
                if self.quotas.shared() && t.usage.drained_for.swap(outage, Relaxed) != outage {
                    for b in [&t.usage.rpm, &t.usage.tpm] {
                        if let Some(b) = b.lock().expect("bucket lock").as_mut() {
                            b.drain(now);
                        }
                    }
                }
                let bucket = match quota {
                    Quota::Rpm => &t.usage.rpm,
                    Quota::Tpm => &t.usage.tpm,
                };
                let mut b = bucket.lock().expect("bucket lock");
                let Some(b) = b.as_mut() else {
                    return Ok(());
                };
                if charge {
                    b.charge(n, now);
                    Ok(())
                } else {
                    b.take(n, now)
                }
            }
        }
    }

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

    /// Checks an `Authorization` value (`Bearer …`) against the configured token and
    /// the tenants' keys: either lets the request in.
    pub(crate) fn check_token(&self, authorization: Option<&str>) -> Result<(), Reject> {
        if self.token.is_none() && self.keys.is_none() {
            return Ok(());
        }
        let sent = bearer(authorization);
        let token = self
            .token
            .as_ref()
            .is_some_and(|t| same(sent.as_bytes(), t.as_bytes()));
        if token || self.tenant(authorization).is_some() {
            Ok(())
        } else {
            Err(Reject::new(
                Reason::Unauthorized,
                "missing or wrong bearer token",
            ))
        }
    }

    /// The tenant whose key an `Authorization` value carries, if any.
    pub(crate) fn tenant(&self, authorization: Option<&str>) -> Option<Arc<Entry>> {
        let keys = self.keys.as_ref()?;
        keys.tenants().identify(bearer(authorization))
    }

    /// Who a request is for the engine: its tenant (by its key) and its class — the
    /// one it asks for, but never more urgent than its tenant's.
    pub(crate) fn who(&self, authorization: Option<&str>, asked: Option<Class>) -> Who {
        let tenant = self.tenant(authorization);
        let class = match (&tenant, asked) {
            (Some(t), Some(c)) => c.max(t.tenant.class),
            (Some(t), None) => t.tenant.class,
            (None, c) => c.unwrap_or_default(),
        };
        Who { tenant, class }
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
        who: &Who,
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
        if model.pending.fetch_add(n, Relaxed) + n > admits(self.max_pending, who.class) {
            // `admitted` gives the places back as it drops.
            return Err(Reject::new(
                Reason::Busy,
                "the model is overloaded; retry later",
            ));
        }
        let backend = model.engine.backend();
        let mut lane = Lane::class(who.class);
        let mut held = None;
        if let Some(t) = &who.tenant {
            let input: u64 = records
                .iter()
                .map(|r| {
                    backend
                        .billed_input_tokens(r)
                        .unwrap_or_else(|| backend.cost(r).tokens)
                })
                .sum();
            held = Some(self.admit_tenant(t, n, input).await?);
            lane = Lane::tenant(who.class, &t.tenant.name, t.tenant.weight);
        }
        let pending: Vec<_> = records
            .into_iter()
            .map(|r| model.engine.submit_in(r, Some(deadline), lane.clone()))
            .collect();
        let results = futures::future::join_all(pending).await;
        drop(admitted);
        drop(held);
        if let Some(t) = &who.tenant {
            let output: u64 = results
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .map(|o| backend.output_tokens(o))
                .sum();
            if let (Some(tpm), true) = (t.tenant.tpm, output > 0) {
                let _ = self
                    .take_tenant(t, Quota::Tpm, tpm as f64, output as f64, true)
                    .await;
            }
            metrics::counter!("flumen_tenant_requests_total", "tenant" => t.tenant.name.to_string(), "model" => name.to_owned(), "result" => if results.iter().all(Result::is_ok) { "ok" } else { "failed" }).increment(1);
        }
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
    fn less_urgent_classes_leave_room_for_the_more_urgent() {
        assert_eq!(admits(1_000, Class::INTERACTIVE), 1_000);
        assert_eq!(admits(1_000, Class::DEFAULT), 1_000);
        assert_eq!(admits(1_000, Class::BULK), 900);
        assert_eq!(admits(1_000, Class::level(5).unwrap()), 600);
        assert_eq!(admits(1_000, Class::LOWEST), 500);
        assert_eq!(admits(1, Class::LOWEST), 1);
    }

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
