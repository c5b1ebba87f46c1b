//! Quotas that hold across replicas: `[quota] store = "redis"` keeps each tenant's
//! RPM/TPM buckets and each model's upstream limits (`[models.upstream]`) in one
//! Redis, so several `flumen serve` replicas together stay within one limit. The
//! default, `store = "local"`, keeps them in this process.
//!
//! When Redis does not answer (within `timeout_ms`), each replica falls back to its
//! local share of every limit — the limit divided by `replicas` — says so once in
//! its logs and in `flumen_quota_store_up` (0), and goes back to Redis as soon as a
//! request to it succeeds again (tried at most once a second while it is down).
//!
//! An upstream limit is asked synchronously by the engine before each call (a
//! [`RateGate`]), so the Redis one works from a lease: a background task keeps one
//! call's permit taken from Redis ahead of need, and the tokens of the call that
//! waits; the dispatcher takes from the lease and, when it is empty, looks again a
//! few milliseconds later. A replica that stops holds at most one call unused.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flumen_engine::rate::{LocalRate, RateGate, RateLimits};
use serde::Deserialize;
use tokio::time::Instant;

/// `[quota]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaSection {
    /// `local` (default) or `redis`.
    pub store: String,
    /// With `redis`: `redis://host:port/db`.
    pub url: Option<String>,
    /// How many replicas share the limits: without Redis each allows its share.
    pub replicas: usize,
    /// Prefix of the buckets' Redis keys.
    pub prefix: String,
    /// How long an answer from Redis may take, ms.
    pub timeout_ms: u64,
}

impl Default for QuotaSection {
    fn default() -> Self {
        QuotaSection {
            store: "local".into(),
            url: None,
            replicas: 1,
            prefix: "flumen:quota:".into(),
            timeout_ms: 100,
        }
    }
}

impl QuotaSection {
    /// Every problem, each under `quota.`.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        match (self.store.as_str(), &self.url) {
            ("local", None) => {}
            ("local", Some(_)) => p.push("quota.url: only with store = \"redis\"".into()),
            ("redis", None) => p.push("quota.url: store = \"redis\" needs a url".into()),
            ("redis", Some(_)) if !cfg!(feature = "redis-cache") => {
                p.push("quota.store: \"redis\" needs the `redis-cache` feature".into())
            }
            ("redis", Some(_)) => {}
            (other, _) => p.push(format!(
                "quota.store: `{other}` is not \"local\" or \"redis\""
            )),
        }
        if self.replicas == 0 {
            p.push("quota.replicas: must be > 0".into());
        }
        if self.timeout_ms == 0 {
            p.push("quota.timeout_ms: must be > 0".into());
        }
        p
    }
}

/// `[models.upstream]`: what the model's provider allows, for every replica together.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// Calls per minute.
    pub rpm: Option<u32>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
}

impl UpstreamSection {
    /// Every problem, each under `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.rpm == Some(0) {
            p.push(format!("{path}.rpm: must be > 0"));
        }
        if self.tpm == Some(0) {
            p.push(format!("{path}.tpm: must be > 0"));
        }
        p
    }

    fn limits(&self) -> Option<RateLimits> {
        (self.rpm.is_some() || self.tpm.is_some()).then(|| RateLimits {
            rpm: self.rpm.map(f64::from),
            tpm: self.tpm.map(|t| t as f64),
        })
    }
}

/// Whether the shared store answers: one per gateway, shared by every bucket.
#[derive(Debug)]
#[cfg_attr(not(feature = "redis-cache"), allow(dead_code))]
pub(crate) struct Health {
    up: AtomicBool,
    /// How many times it went down: a local bucket drained for an earlier outage
    /// is drained again for the next.
    downs: AtomicU64,
    /// While down, when Redis may next be tried.
    retry_at: Mutex<Option<Instant>>,
}

#[cfg_attr(not(feature = "redis-cache"), allow(dead_code))]
impl Health {
    fn new() -> Self {
        metrics::gauge!("flumen_quota_store_up").set(1.0);
        Health {
            up: AtomicBool::new(true),
            downs: AtomicU64::new(0),
            retry_at: Mutex::new(None),
        }
    }

    /// Whether to ask Redis now: while up, always; while down, once a second.
    fn try_now(&self) -> bool {
        if self.up.load(Relaxed) {
            return true;
        }
        let now = Instant::now();
        let mut at = self.retry_at.lock().expect("health lock");
        if at.is_none_or(|t| t <= now) {
            *at = Some(now + Duration::from_secs(1));
            true
        } else {
            false
        }
    }

    fn ok(&self) {
        if !self.up.swap(true, Relaxed) {
            metrics::gauge!("flumen_quota_store_up").set(1.0);
            tracing::info!("flumen serve: the quota store answers again: limits are shared again");
        }
    }

    fn failed(&self, why: &str, replicas: usize) {
        if self.up.swap(false, Relaxed) {
            self.downs.fetch_add(1, Relaxed);
            metrics::gauge!("flumen_quota_store_up").set(0.0);
            *self.retry_at.lock().expect("health lock") =
                Some(Instant::now() + Duration::from_secs(1));
            tracing::warn!(
                "flumen serve: the quota store does not answer ({why}): this replica now allows 1/{replicas} of each limit until it does"
            );
        }
    }
}

/// The gateway's quotas: where buckets live.
#[derive(Debug)]
#[cfg_attr(not(feature = "redis-cache"), allow(dead_code))]
pub(crate) struct Quotas {
    #[cfg(feature = "redis-cache")]
    redis: Option<flumen_cache::quota::RedisBuckets>,
    pub(crate) replicas: usize,
    timeout: Duration,
    health: Arc<Health>,
}

/// What a take from a shared bucket came to.
#[cfg_attr(not(feature = "redis-cache"), allow(dead_code))]
pub(crate) enum Asked {
    /// Taken, or refused with the wait until it could be.
    Answered(Result<(), Option<Duration>>),
    /// No shared store, or it did not answer: use the local share.
    Local,
}

impl Quotas {
    pub(crate) fn new(section: &QuotaSection) -> anyhow::Result<Self> {
        #[cfg(feature = "redis-cache")]
        let redis = match (section.store.as_str(), &section.url) {
            ("redis", Some(url)) => Some(
                flumen_cache::quota::RedisBuckets::new(
                    url,
                    &section.prefix,
                    Duration::from_millis(section.timeout_ms),
                )
                .map_err(|e| anyhow::anyhow!("quota.url: {e}"))?,
            ),
            _ => None,
        };
        Ok(Quotas {
            #[cfg(feature = "redis-cache")]
            redis,
            replicas: section.replicas.max(1),
            timeout: Duration::from_millis(section.timeout_ms),
            health: Arc::new(Health::new()),
        })
    }

    /// The share of a limit a local bucket holds: all of it without a shared store,
    /// else this replica's share (used only while the store does not answer).
    pub(crate) fn local_share(&self) -> f64 {
        if self.shared() {
            1.0 / self.replicas as f64
        } else {
            1.0
        }
    }

    /// The outages of the shared store so far (0 without one): a local bucket
    /// used in an outage it was not drained for starts empty.
    pub(crate) fn outages(&self) -> u64 {
        self.health.downs.load(Relaxed)
    }

    pub(crate) fn shared(&self) -> bool {
        #[cfg(feature = "redis-cache")]
        return self.redis.is_some();
        #[cfg(not(feature = "redis-cache"))]
        false
    }

    /// Takes `n` from the shared bucket `name` holding `capacity` and refilling
    /// `per_minute` (`charge`: whatever is left).
    pub(crate) async fn take(
        &self,
        name: &str,
        capacity: f64,
        per_minute: f64,
        n: f64,
        charge: bool,
    ) -> Asked {
        #[cfg(feature = "redis-cache")]
        if let Some(redis) = &self.redis {
            if !self.health.try_now() {
                return Asked::Local;
            }
            use flumen_cache::quota::{Shape, Take};
            let how = if charge { Take::Charge } else { Take::All };
            let shape = Shape {
                capacity,
                per_minute,
                // Tenants' buckets hold a minute and start full; an upstream's hold
                // half a second and start empty (see `RateLimits`).
                starts_full: capacity >= per_minute,
            };
            let asked = tokio::time::timeout(self.timeout, redis.take(name, shape, n, how)).await;
            return match asked {
                Ok(Ok(t)) => {
                    self.health.ok();
                    Asked::Answered(if charge || t.got >= n {
                        Ok(())
                    } else if n > capacity {
                        Err(None)
                    } else {
                        Err(Some(t.wait.unwrap_or(Duration::from_millis(1))))
                    })
                }
                Ok(Err(e)) => {
                    self.health.failed(&e.to_string(), self.replicas);
                    Asked::Local
                }
                Err(_) => {
                    self.health.failed("no answer in time", self.replicas);
                    Asked::Local
                }
            };
        }
        let _ = (name, capacity, per_minute, n, charge);
        Asked::Local
    }

    /// The rate gate of a model with `upstream` limits (`None` without any):
    /// local buckets, or Redis's through a lease with a local share to fall back on.
    pub(crate) fn gate(
        self: &Arc<Self>,
        model: &str,
        upstream: &UpstreamSection,
        call_tokens: u64,
    ) -> Option<Arc<dyn RateGate>> {
        let limits = upstream.limits()?;
        let now = Instant::now();
        let share = self.local_share();
        let local = LocalRate::new(
            RateLimits {
                rpm: limits.rpm.map(|r| r * share),
                tpm: limits.tpm.map(|t| t * share),
            },
            call_tokens,
            now,
        );
        if !self.shared() {
            return Some(Arc::new(local));
        }
        let gate = Arc::new(LeasedRate {
            quotas: Arc::clone(self),
            model: model.to_owned(),
            limits,
            call_tokens: call_tokens as f64,
            local,
            lease: Mutex::new(Lease::default()),
            wake: Arc::new(tokio::sync::Notify::new()),
            local_since: AtomicBool::new(false),
        });
        LeasedRate::fetch_forever(&gate);
        Some(gate)
    }
}

/// What a replica holds of the shared upstream buckets.
#[derive(Debug, Default)]
struct Lease {
    calls: f64,
    tokens: f64,
    /// The tokens of the call waiting for them.
    wanted: f64,
    /// No use asking Redis before then (its bucket said so).
    not_before: Option<Instant>,
}

/// An upstream limit kept in Redis, asked through a lease.
#[derive(Debug)]
struct LeasedRate {
    quotas: Arc<Quotas>,
    model: String,
    limits: RateLimits,
    call_tokens: f64,
    local: LocalRate,
    lease: Mutex<Lease>,
    wake: Arc<tokio::sync::Notify>,
    /// Whether the last call went through the local share (Redis down).
    local_since: AtomicBool,
}

/// How soon the dispatcher looks again while the lease is empty.
const POLL: Duration = Duration::from_millis(5);

impl LeasedRate {
    fn fetch_forever(gate: &Arc<Self>) {
        let weak = Arc::downgrade(gate);
        tokio::spawn(async move {
            loop {
                let Some(gate) = weak.upgrade() else {
                    return;
                };
                let wait = gate.fetch().await;
                // A permit stored by `notify_one` while fetching wakes this at once.
                let wake = Arc::clone(&gate.wake);
                drop(gate);
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
        });
    }

    /// Tops the lease up to one call (and the waiting call's tokens); how long to
    /// wait before trying again.
    async fn fetch(&self) -> Duration {
        let (calls, tokens, wanted, not_before) = {
            let l = self.lease.lock().expect("lease lock");
            (l.calls, l.tokens, l.wanted, l.not_before)
        };
        if let Some(t) = not_before {
            let now = Instant::now();
            if t > now {
                return t - now;
            }
            self.lease.lock().expect("lease lock").not_before = None;
        }
        let mut wait = Duration::from_millis(50);
        if let Some(rpm) = self.limits.rpm {
            if calls < 1.0 {
                let name = format!("upstream:{}:rpm", self.model);
                match self
                    .quotas
                    .take(&name, RateLimits::capacity(rpm, 1.0), rpm, 1.0, false)
                    .await
                {
                    Asked::Answered(Ok(())) => self.lease.lock().expect("lease lock").calls += 1.0,
                    Asked::Answered(Err(w)) => {
                        let w = w.unwrap_or(Duration::from_secs(1));
                        self.lease.lock().expect("lease lock").not_before =
                            Some(Instant::now() + w);
                        return w;
                    }
                    Asked::Local => return Duration::from_secs(1),
                }
            }
        }
        if let Some(tpm) = self.limits.tpm {
            if tokens < wanted {
                let name = format!("upstream:{}:tpm", self.model);
                let need = wanted - tokens;
                match self
                    .quotas
                    .take(
                        &name,
                        RateLimits::capacity(tpm, self.call_tokens),
                        tpm,
                        need,
                        false,
                    )
                    .await
                {
                    Asked::Answered(Ok(())) => {
                        self.lease.lock().expect("lease lock").tokens += need
                    }
                    Asked::Answered(Err(w)) => {
                        let w = w.unwrap_or(Duration::from_secs(1));
                        self.lease.lock().expect("lease lock").not_before =
                            Some(Instant::now() + w);
                        wait = w;
                    }
                    Asked::Local => return Duration::from_secs(1),
                }
            }
        }
        wait
    }
}

impl RateGate for LeasedRate {
    fn acquire(&self, tokens: u64, now: Instant) -> Result<(), Instant> {
        if !self.quotas.health.up.load(Relaxed) {
            // Redis is down: this replica's share, in this process, from an empty
            // bucket. The fetcher keeps trying Redis once a second.
            if !self.local_since.swap(true, Relaxed) {
                self.local.drain(now);
            }
            self.wake.notify_one();
            return self.local.acquire(tokens, now);
        }
        self.local_since.store(false, Relaxed);
        // As in `LocalRate`: a call larger than the bucket waits for a full one,
        // and the rest is charged after.
        let cap = self
            .limits
            .tpm
            .map_or(f64::MAX, |t| RateLimits::capacity(t, self.call_tokens));
        let all = tokens;
        let tokens = (tokens as f64).min(cap);
        let mut l = self.lease.lock().expect("lease lock");
        let calls_ok = self.limits.rpm.is_none() || l.calls >= 1.0;
        let tokens_ok = self.limits.tpm.is_none() || l.tokens >= tokens;
        if calls_ok && tokens_ok {
            if self.limits.rpm.is_some() {
                l.calls -= 1.0;
            }
            if self.limits.tpm.is_some() {
                l.tokens -= tokens;
            }
            l.wanted = 0.0;
            drop(l);
            if all as f64 > tokens {
                self.charge(all - tokens as u64, now);
            }
            // Take the next call's permit ahead of need.
            self.wake.notify_one();
            return Ok(());
        }
        l.wanted = l.wanted.max(tokens);
        let again = l.not_before.map_or(now + POLL, |t| t.max(now + POLL));
        drop(l);
        self.wake.notify_one();
        Err(again)
    }

    fn charge(&self, tokens: u64, now: Instant) {
        let Some(tpm) = self.limits.tpm else {
            return;
        };
        if !self.quotas.health.up.load(Relaxed) {
            self.local.charge(tokens, now);
            return;
        }
        let quotas = Arc::clone(&self.quotas);
        let name = format!("upstream:{}:tpm", self.model);
        let capacity = RateLimits::capacity(tpm, self.call_tokens);
        tokio::spawn(async move {
            quotas.take(&name, capacity, tpm, tokens as f64, true).await;
        });
    }
}
