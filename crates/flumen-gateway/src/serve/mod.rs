//! `flumen serve`: a gateway in front of the engines, so that engines that send one
//! request per row (Flink, Spark, RisingWave) get batching, adaptive concurrency,
//! retries and breakers without changing. Every caller's records go into one
//! shared engine per model and are batched together.
//!
//! Front protocols: OpenAI `/v1/embeddings`, `/v1/chat/completions` (with
//! `stream: true`, each choice arrives as one SSE chunk: no backend streams yet),
//! `/v1/models`, `/v1/models/{id}`; KServe v2 over HTTP with JSON or binary tensors
//! (`/v2`, `/v2/health/*`, `/v2/models/{m}` and its `ready`, `config`, `stats` and
//! `infer`, each also under `versions/{v}`). Admission
//! control answers 429 with `Retry-After` once a model has `max_pending` records in
//! the engine; bearer-token auth (constant-time comparison) on every endpoint when
//! configured; body size, body time, header time, open connections and items per
//! request bounded; errors in each protocol's shape; a request deadline from `x-request-timeout-ms`
//! (or the server's default); Prometheus `/metrics` with every engine's metrics.
//! KServe v2 over gRPC on `grpc_listen` with the `grpc` feature; HTTPS with
//! `tls_cert`/`tls_key` and the `tls` feature. On SIGINT/SIGTERM (or
//! [`Stopper::stop`]) every listener stops accepting, requests in flight are
//! answered, idle connections close, and `flumen serve` exits 0.
//!
//! The gateway's modules, each depending only on those below it:
//! - this module: `flumen serve`, the listeners, the routes and `/metrics`;
//! - `openai`, `kserve` (HTTP) and `grpc`: the fronts, each translating a protocol
//!   into records and back;
//! - `http` (what the HTTP fronts share: statuses, error bodies, readiness, the
//!   access log) and `tensors` (rows to records and back, for both KServe fronts);
//! - `gateway`: the protocol-neutral gateway: one engine per model, auth, limits,
//!   admission, deadlines, and a rejection's reason;
//! - `config`: the configuration file; `conn`: the HTTP listener's connections (how
//!   many, how long a request's headers may take); `tls`: HTTPS.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use flumen_config::{AnyBackend, BadConfig};
use flumen_engine::Engine;

mod config;
mod conn;
mod gateway;
#[cfg(feature = "grpc")]
mod grpc;
mod http;
mod kserve;
mod openai;
mod quota;
pub mod status;
mod stream;
mod tenants;
mod tensors;
#[cfg(feature = "tls")]
mod tls;

pub use config::{DeclaredTensors, ModelSection, ServeConfig, ServerSection, TensorSection};
use gateway::{Gateway, Model, Shared};
pub use quota::{QuotaSection, UpstreamSection};

/// Runs `flumen serve CONFIG` until interrupted.
pub async fn serve(path: &std::path::Path) -> Result<()> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadConfig(vec![format!("{shown}: cannot read: {e}")]))?;
    let config = ServeConfig::from_toml(&text).map_err(|problems| {
        BadConfig(
            problems
                .into_iter()
                .map(|p| format!("{shown}: {p}"))
                .collect(),
        )
    })?;
    let running = start(&config).await?;
    let scheme = if config.server.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(url = %format!("{scheme}://{}", running.addr), "flumen serve: listening");
    let stop = running.stopper();
    let mut signals = crate::signals::Signals::listen();
    tokio::spawn(async move {
        signals.recv().await;
        tracing::info!("flumen serve: stopping: answering the requests in flight");
        stop.stop();
    });
    running.finished().await
}

/// A gateway running in the background.
pub struct Running {
    /// The HTTP address it listens on.
    pub addr: std::net::SocketAddr,
    /// The gRPC address it listens on, when `grpc_listen` is set (a port of 0 picks
    /// a free one).
    pub grpc_addr: Option<std::net::SocketAddr>,
    servers: Vec<tokio::task::JoinHandle<Result<()>>>,
    stop: Stopper,
}

/// Stops a [`Running`] gateway from anywhere: it stops accepting connections, answers
/// the requests in flight, closes idle connections, then its servers end.
#[derive(Clone)]
pub struct Stopper(Arc<tokio::sync::watch::Sender<bool>>);

impl Stopper {
    /// Asks the gateway to stop (idempotent).
    pub fn stop(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once a stop was asked for.
    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

impl Running {
    /// A handle that stops this gateway.
    pub fn stopper(&self) -> Stopper {
        self.stop.clone()
    }

    /// Waits until every server (HTTP, and gRPC when configured) has ended: after a
    /// stop, once in-flight requests are answered; or at the first that fails.
    pub async fn finished(self) -> Result<()> {
        for server in self.servers {
            server.await.context("a server task panicked")??;
        }
        Ok(())
    }
}

/// The process's Prometheus recorder, installed on first use: every engine of the
/// process (labelled `engine`) reports to it, and every `/metrics` endpoint renders it.
/// If another recorder was installed first, the handle renders nothing.
fn prometheus() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = telemetry_buckets(metrics_exporter_prometheus::PrometheusBuilder::new())
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_ok() {
                flumen_engine::telemetry::describe();
            }
            handle
        })
        .clone()
}

/// Histograms as Prometheus histograms (buckets), not summaries: Prometheus can
/// then aggregate them across processes and compute any quantile.
fn telemetry_buckets(
    builder: metrics_exporter_prometheus::PrometheusBuilder,
) -> metrics_exporter_prometheus::PrometheusBuilder {
    use flumen_engine::telemetry::{
        ATTEMPTS, BACKEND_LATENCY, BATCH_SIZE, END_TO_END_LATENCY, QUEUE_TIME,
    };
    use metrics_exporter_prometheus::Matcher;
    const SECONDS: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    const RECORDS: &[f64] = &[
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
    ];
    const CALLS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0];
    let mut b = builder;
    for (name, buckets) in [
        (BATCH_SIZE, RECORDS),
        (ATTEMPTS, CALLS),
        (QUEUE_TIME, SECONDS),
        (BACKEND_LATENCY, SECONDS),
        (END_TO_END_LATENCY, SECONDS),
    ] {
        b = b
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
            .expect("buckets are not empty");
    }
    b
}

/// Installs the process's Prometheus recorder (engine metrics, names in
/// `flumen_engine::telemetry`) and serves `GET /metrics` and a status page (`/`,
/// `/status.json`) on `addr` in the background, for `flumen run --metrics-addr`.
/// Returns the bound address (port 0 picks one) and the page's monitor, which
/// watches the engines given to [`status::Monitor::watch`]. Call it before creating
/// the engines, so that their metrics are registered with the recorder.
pub async fn serve_metrics(
    addr: std::net::SocketAddr,
) -> std::io::Result<(std::net::SocketAddr, Arc<std::sync::Mutex<status::Monitor>>)> {
    let handle = prometheus();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let monitor = status::Monitor::start(Vec::new());
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move { handle.render() }
            }),
        )
        .merge(status::routes(Arc::clone(&monitor)));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((bound, monitor))
}

/// Starts a gateway for a validated configuration: connects every model's backend,
/// then listens. A `listen` port of 0 picks a free one (see [`Running::addr`]).
pub async fn start(config: &ServeConfig) -> Result<Running> {
    // Every engine's metrics (names in flumen_engine::telemetry), for `/metrics`.
    let handle = prometheus();
    let quotas = Arc::new(quota::Quotas::new(&config.quota)?);
    let mut models = BTreeMap::new();
    let mut stores = flumen_config::Stores::default();
    for m in &config.models {
        let backend = AnyBackend::build(&m.backend).await.map_err(|p| {
            anyhow::anyhow!(
                "model `{}`: cannot start its backend: {}",
                m.name,
                p.join("; ")
            )
        })?;
        let tensors = match (backend.kserve_model(), &m.kserve) {
            (Some(k), _) => tensors::Tensors::of_backend(k.metadata, k.signature, k.config),
            (None, Some(declared)) => tensors::Tensors::declared(declared),
            (None, None) => tensors::Tensors::generic(),
        };
        let openai_chat = backend.is_openai_chat();
        let mut engine_config = m.engine.config(&m.name);
        engine_config.spend = m.budget.build(m.prices.as_ref());
        engine_config.prices = m.prices.map(|p| p.prices());
        engine_config.cache = m.cache.build(&m.backend, &mut stores).map_err(|e| {
            anyhow::anyhow!("model `{}`: cannot open its result cache: {e}", m.name)
        })?;
        let call_tokens = engine_config
            .batch
            .max_tokens
            .or(flumen_core::Backend::capabilities(&backend).max_batch_tokens)
            .unwrap_or(0);
        engine_config.rate = quotas.gate(&m.name, &m.upstream, call_tokens);
        // A stream is relayed past the engine only when the engine has nothing to
        // count on its way: no spending budget, no upstream limits.
        let relays_streams =
            openai_chat && engine_config.spend.is_none() && engine_config.rate.is_none();
        let engine = Engine::new(backend, engine_config);
        models.insert(
            m.name.clone(),
            Model {
                engine,
                pending: AtomicUsize::new(0),
                tensors,
                answered: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                openai_chat,
                relays_streams,
                truncate_dimensions: m.truncate_dimensions,
            },
        );
    }
    let s = &config.server;
    let token = match &s.api_key_env {
        Some(var) => Some(std::env::var(var).context("server.api_key_env")?),
        None => None,
    };
    let keys = match &s.keys_file {
        Some(path) => {
            let store = tenants::KeyStore::open(std::path::Path::new(path), quotas.local_share())
                .map_err(|problems| {
                anyhow::anyhow!("server.keys_file: {}", problems.join("; "))
            })?;
            let store = Arc::new(store);
            store.watch();
            tracing::info!(
                file = %path,
                tenants = store.tenants().len(),
                names = %store.tenants().names().collect::<Vec<_>>().join(","),
                "flumen serve: keys file read"
            );
            Some(store)
        }
        None => None,
    };
    let stop = Stopper(Arc::new(tokio::sync::watch::channel(false).0));
    let mut servers = Vec::new();
    let monitor = status::Monitor::start(
        models
            .values()
            .map(|m| Arc::new(m.engine.clone()) as Arc<dyn status::Watched>)
            .collect(),
    );
    let gateway = Arc::new(Gateway {
        models,
        metrics: handle,
        token,
        keys,
        quotas,
        open: gateway::Open {
            health: s.unauthenticated.iter().any(|e| e == "health"),
            metrics: s.unauthenticated.iter().any(|e| e == "metrics"),
            status: s.unauthenticated.iter().any(|e| e == "status"),
        },
        max_items: s.max_items,
        max_pending: s.max_pending,
        timeout: Duration::from_millis(s.timeout_ms),
    });
    let app = Router::new()
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{id}", get(openai::get_model))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(http::ready))
        .route(
            "/metrics",
            get(|State(g): State<Shared>| async move { g.metrics.render() }),
        )
        .route("/health/live", get(|| async { StatusCode::OK }))
        .route("/health/ready", get(http::ready))
        .route("/v2", get(kserve::server_metadata))
        .route("/v2/models/{model}", get(kserve::kserve_metadata))
        .route("/v2/models/{model}/ready", get(kserve::kserve_ready))
        .route("/v2/models/{model}/config", get(kserve::kserve_config))
        .route("/v2/models/{model}/stats", get(kserve::kserve_stats))
        .route("/v2/models/{model}/infer", post(kserve::kserve_infer))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(kserve::kserve_metadata),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(kserve::kserve_ready),
        )
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(kserve::kserve_config),
        )
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(kserve::kserve_stats),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(kserve::kserve_infer),
        )
        .merge(status::routes(monitor))
        .fallback(http::no_route)
        .layer(DefaultBodyLimit::max(s.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            http::BodyLimits {
                timeout: Duration::from_millis(s.body_timeout_ms),
                max_bytes: s.max_body_bytes,
            },
            http::read_body,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&gateway),
            http::authorize,
        ))
        .with_state(Arc::clone(&gateway));
    let app = if s.log_requests {
        app.layer(axum::middleware::from_fn_with_state(
            Arc::clone(&gateway),
            http::access_log,
        ))
    } else {
        app
    };
    let limits = conn::Limits {
        header_timeout: Duration::from_millis(s.header_timeout_ms),
        max_connections: s.max_connections,
        // A client that does not read its answer for as long as it may take to send
        // a body; a stop waits for the longest deadline a request may have.
        write_timeout: Duration::from_millis(s.body_timeout_ms),
        grace: Duration::from_millis(s.timeout_ms.saturating_mul(10).max(s.body_timeout_ms)),
    };
    #[allow(unused_mut)] // set only with the grpc feature
    let mut grpc_addr = None;
    #[cfg(feature = "grpc")]
    if let Some(addr) = &s.grpc_listen {
        let addr: std::net::SocketAddr = addr.parse().context("server.grpc_listen")?;
        let service = grpc::GrpcGateway(Arc::clone(&gateway)).service(s.max_body_bytes);
        // Bound here, so that the gateway takes gRPC calls once `start` returns.
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (server.grpc_listen)"))?;
        let bound = listener.local_addr()?;
        tracing::info!(addr = %bound, "flumen serve: KServe v2 gRPC listening");
        grpc_addr = Some(bound);
        // The same connection cap (its own count) and time for a first byte as
        // HTTP; HTTP/2 pings find peers that went away.
        let incoming = conn::grpc_incoming(listener, limits);
        let stopped = stop.stopped();
        servers.push(tokio::spawn(async move {
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(limits.header_timeout))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stopped)
                .await
                .context("the gRPC server failed")
        }));
    }
    let listener = tokio::net::TcpListener::bind(&s.listen)
        .await
        .with_context(|| format!("cannot listen on {}", s.listen))?;
    let addr = listener.local_addr()?;
    let stopped = stop.stopped();
    if let Some(files) = open_files_limit() {
        if s.max_connections as u64 + 64 > files {
            tracing::warn!(
                "flumen serve: server.max_connections = {} is near or above this process's open-file limit ({files}): \
                 past that limit connections fail to be accepted; raise `ulimit -n` or lower max_connections",
                s.max_connections
            );
        }
    }
    #[cfg(feature = "tls")]
    if let (Some(cert), Some(key)) = (&s.tls_cert, &s.tls_key) {
        let tls = tls::Tls(tls::acceptor(cert, key)?);
        servers.push(tokio::spawn(async move {
            conn::serve(listener, tls, app, limits, stopped)
                .await
                .context("the HTTPS server failed")
        }));
        return Ok(Running {
            addr,
            grpc_addr,
            servers,
            stop,
        });
    }
    servers.push(tokio::spawn(async move {
        conn::serve(listener, conn::Plain, app, limits, stopped)
            .await
            .context("the HTTP server failed")
    }));
    Ok(Running {
        addr,
        grpc_addr,
        servers,
        stop,
    })
}

/// This process's soft limit on open files (Linux: from `/proc/self/limits`).
fn open_files_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}
