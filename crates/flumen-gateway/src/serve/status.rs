//! The live status page: `GET /` (HTML, with uPlot vendored under `assets/` and
//! served from the binary) and `GET /status.json`, which the page reads every second
//! and tests and scripts can read too.
//!
//! A sampler task reads every watched engine's counters once a second and keeps the
//! last [`KEPT`] seconds of: outcomes per second, mean batch size, the concurrency
//! limit, calls in flight, queue depth, p50 and p99 latency (from the engine's
//! latency histogram, within a factor of √2), failed, retried and shed records per
//! second, cache hits per second; and the breaker's phase and the totals now.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use flumen_core::{Backend, ErrorKind};
use flumen_engine::{BreakerPhase, CacheStats, Engine, StatsSnapshot};
use serde_json::{json, Value};
use tokio::time::Instant;

/// Seconds of history kept and shown.
pub const KEPT: usize = 300;

const PAGE: &str = include_str!("../../assets/status.html");
const UPLOT_JS: &str = include_str!("../../assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/uPlot.min.css");

/// What the status page reads of an engine.
pub trait Watched: Send + Sync + 'static {
    /// The model's name.
    fn name(&self) -> &str;
    /// Its counters now.
    fn stats(&self) -> StatsSnapshot;
    /// Its result cache's counters, if it has one.
    fn cache_stats(&self) -> Option<CacheStats>;
}

impl<B: Backend> Watched for Engine<B> {
    fn name(&self) -> &str {
        Engine::name(self)
    }
    fn stats(&self) -> StatsSnapshot {
        Engine::stats(self)
    }
    fn cache_stats(&self) -> Option<CacheStats> {
        Engine::cache_stats(self)
    }
}

/// The series of one model, by name, oldest first.
const SERIES: [&str; 11] = [
    "throughput",
    "batch",
    "limit",
    "in_flight",
    "queued",
    "p50_ms",
    "p99_ms",
    "failed",
    "retried",
    "shed",
    "cache_hits",
];

struct Model {
    engine: Arc<dyn Watched>,
    last: Option<(Instant, StatsSnapshot, Option<CacheStats>)>,
    t: VecDeque<f64>,
    series: BTreeMap<&'static str, VecDeque<Option<f64>>>,
}

/// The sampled history of the watched engines.
pub struct Monitor {
    models: Vec<Model>,
}

fn phase(p: BreakerPhase) -> &'static str {
    match p {
        BreakerPhase::Closed => "closed",
        BreakerPhase::HalfOpen => "half_open",
        BreakerPhase::Open => "open",
    }
}

fn unix_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Monitor {
    /// Watches `engines`, sampling them every second from now on (a task on the
    /// current runtime, which ends when the returned monitor is dropped).
    pub fn start(engines: Vec<Arc<dyn Watched>>) -> Arc<Mutex<Monitor>> {
        let mut monitor = Monitor { models: Vec::new() };
        for engine in engines {
            monitor.watch(engine);
        }
        let monitor = Arc::new(Mutex::new(monitor));
        let weak = Arc::downgrade(&monitor);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            // A late tick is not made up with a burst of samples a millisecond apart.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(m) = weak.upgrade() else { return };
                m.lock()
                    .expect("monitor lock")
                    .sample(Instant::now(), unix_s());
            }
        });
        monitor
    }

    /// Watches one more engine, from the next sample on.
    pub fn watch(&mut self, engine: Arc<dyn Watched>) {
        self.models.push(Model {
            engine,
            last: None,
            t: VecDeque::with_capacity(KEPT),
            series: SERIES
                .iter()
                .map(|s| (*s, VecDeque::with_capacity(KEPT)))
                .collect(),
        });
    }

    /// Takes one sample of every engine.
    fn sample(&mut self, now: Instant, unix: f64) {
        for m in &mut self.models {
            let (stats, cache) = (m.engine.stats(), m.engine.cache_stats());
            if let Some((at, before, cache_before)) = &m.last {
                let dt = now.duration_since(*at).as_secs_f64().max(1e-3);
                let rate = |a: u64, b: u64| Some(a.saturating_sub(b) as f64 / dt);
                let calls = stats.calls.saturating_sub(before.calls);
                let batch = (calls > 0).then(|| {
                    stats.records_sent.saturating_sub(before.records_sent) as f64 / calls as f64
                });
                let ms = |q: f64| {
                    stats
                        .latency_quantile(before, q)
                        .map(|d| d.as_secs_f64() * 1e3)
                };
                let failed = |s: &StatsSnapshot| s.failed.iter().sum::<u64>();
                let hits = |c: &Option<CacheStats>| c.map_or(0, |c| c.hits + c.shared);
                let point = [
                    rate(stats.ok + failed(&stats), before.ok + failed(before)),
                    batch,
                    Some(stats.limit as f64),
                    Some(stats.in_flight as f64),
                    Some(stats.queued as f64),
                    ms(0.5),
                    ms(0.99),
                    rate(failed(&stats), failed(before)),
                    rate(stats.resent, before.resent),
                    rate(stats.shed, before.shed),
                    cache
                        .map(|_| 0.0)
                        .and(rate(hits(&cache), hits(cache_before))),
                ];
                if m.t.len() == KEPT {
                    m.t.pop_front();
                    for s in m.series.values_mut() {
                        s.pop_front();
                    }
                }
                m.t.push_back((unix * 1e3).round() / 1e3);
                for (name, v) in SERIES.iter().zip(point) {
                    m.series
                        .get_mut(name)
                        .expect("every series")
                        .push_back(v.map(|x| (x * 1e3).round() / 1e3));
                }
            }
            m.last = Some((now, stats, cache));
        }
    }

    /// The history and the state now, as `/status.json` gives it.
    pub fn json(&self) -> Value {
        let models: Vec<Value> = self
            .models
            .iter()
            .map(|m| {
                let stats = m.engine.stats();
                let cache = m.engine.cache_stats();
                let failed: serde_json::Map<String, Value> = ErrorKind::ALL
                    .iter()
                    .zip(stats.failed)
                    .filter(|(_, n)| *n > 0)
                    .map(|(k, n)| (k.as_str().to_owned(), n.into()))
                    .collect();
                json!({
                    "name": m.engine.name(),
                    "breaker": phase(stats.breaker),
                    "totals": {
                        "ok": stats.ok, "calls": stats.calls, "records_sent": stats.records_sent,
                        "resent": stats.resent, "shed": stats.shed,
                        "tokens_sent": stats.tokens_sent, "output_tokens": stats.output_tokens,
                    },
                    "failed_by_kind": failed,
                    "cache": cache.map(|c| json!({
                        "hits": c.hits, "shared": c.shared, "misses": c.misses,
                        "errors": c.errors, "bypassed": c.bypassed,
                    })),
                    "t": m.t,
                    "series": m.series,
                })
            })
            .collect();
        json!({ "window_s": KEPT, "models": models })
    }
}

/// `/`, `/status.json` and the page's assets.
pub fn routes<S: Clone + Send + Sync + 'static>(monitor: Arc<Mutex<Monitor>>) -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE) }),
        )
        .route(
            "/status.json",
            get(move || {
                let monitor = Arc::clone(&monitor);
                async move {
                    let status = monitor.lock().expect("monitor lock").json();
                    Json(status).into_response()
                }
            }),
        )
        .route(
            "/assets/uPlot.iife.min.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    UPLOT_JS,
                )
            }),
        )
        .route(
            "/assets/uPlot.min.css",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
                    UPLOT_CSS,
                )
            }),
        )
}
