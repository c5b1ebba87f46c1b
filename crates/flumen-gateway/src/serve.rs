//! `flumen serve`: a gateway in front of the engines, so that engines that send one
//! request per row (Flink, Spark, RisingWave) get batching, adaptive concurrency,
//! retries and breakers without changing. Every caller's records go into one
//! shared engine per model and are batched together.
//!
//! Front protocols: OpenAI `/v1/embeddings`, `/v1/chat/completions` (with
//! `stream: true`, the reply arrives as one SSE chunk: no backend streams yet),
//! `/v1/models`; KServe v2 over HTTP with JSON or binary tensors (`/v2/health/*`,
//! `/v2/models/{m}`, `/v2/models/{m}/ready`, `/v2/models/{m}/infer`). Admission
//! control answers 429 with `Retry-After` once a model has `max_pending` records in
//! the engine; bearer-token auth (constant-time comparison) when configured; body
//! size and items per request bounded; a request deadline from `x-request-timeout-ms`
//! (or the server's default); Prometheus `/metrics` with every engine's metrics.
//! KServe v2 over gRPC on `grpc_listen` with the `grpc` feature; HTTPS with
//! `tls_cert`/`tls_key` and the `tls` feature. On SIGINT/SIGTERM (or
//! [`Stopper::stop`]) every listener stops accepting, requests in flight are
//! answered, idle connections close, and `flumen serve` exits 0.
//!
//! This module holds the configuration, the shared core (auth, limits, admission,
//! deadlines, one engine per model), health, metrics and the listeners; the fronts
//! that translate a protocol into records live beside it: `serve_openai.rs`,
//! `serve_kserve.rs` (HTTP) and `serve_grpc.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flumen_core::{ErrorKind, Failure};
use flumen_engine::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::backends::{AnyBackend, BackendConfig, EngineSection};
use crate::BadConfig;

/// A gateway configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The listener and its limits.
    #[serde(default)]
    pub server: ServerSection,
    /// The models served, each with its backend and engine.
    pub models: Vec<ModelSection>,
}

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Address to listen on.
    pub listen: String,
    /// TLS certificate chain (PEM) for the HTTP listener (needs the `tls` feature).
    pub tls_cert: Option<String>,
    /// TLS private key (PEM) for the HTTP listener.
    pub tls_key: Option<String>,
    /// Address for KServe v2 over gRPC (needs the `grpc` feature); none: no gRPC.
    pub grpc_listen: Option<String>,
    /// Environment variable holding the bearer token callers must send (none: open).
    pub api_key_env: Option<String>,
    /// Largest request body, bytes (413 above).
    pub max_body_bytes: usize,
    /// Most items (inputs, rows) in one request (413 above).
    pub max_items: usize,
    /// Records per model admitted into its engine at once (429 above).
    pub max_pending: usize,
    /// Default deadline of a request, ms.
    pub timeout_ms: u64,
    /// One JSON line per request on stderr (time, method, path, status, duration);
    /// never a body, a query string or a header. Off by default.
    pub log_requests: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "127.0.0.1:8080".into(),
            grpc_listen: None,
            tls_cert: None,
            tls_key: None,
            api_key_env: None,
            max_body_bytes: 8 << 20,
            max_items: 2_048,
            max_pending: 10_000,
            timeout_ms: 30_000,
            log_requests: false,
        }
    }
}

/// `[[models]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The name callers use.
    pub name: String,
    /// Its backend.
    pub backend: BackendConfig,
    /// Its engine.
    #[serde(default)]
    pub engine: EngineSection,
}

impl ServeConfig {
    /// Parses and validates a configuration; every problem, each with its path.
    pub fn from_toml(text: &str) -> Result<ServeConfig, Vec<String>> {
        let config: ServeConfig =
            toml::from_str(text).map_err(|e| vec![e.to_string().trim_end().to_owned()])?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Every problem at once, each with its path.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.models.is_empty() {
            p.push("models: at least one model is needed".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let path = format!("models[{i}]");
            if m.name.is_empty() || !names.insert(m.name.as_str()) {
                p.push(format!("{path}.name: must be non-empty and unique"));
            }
            p.extend(m.backend.validate(&format!("{path}.backend")));
            p.extend(m.engine.validate(&format!("{path}.engine")));
        }
        let s = &self.server;
        if s.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!(
                "server.listen: `{}` is not an address like 127.0.0.1:8080",
                s.listen
            ));
        }
        for (field, v) in [
            ("max_body_bytes", s.max_body_bytes),
            ("max_items", s.max_items),
            ("max_pending", s.max_pending),
        ] {
            if v == 0 {
                p.push(format!("server.{field}: must be > 0"));
            }
        }
        match (&s.tls_cert, &s.tls_key) {
            (None, None) => {}
            (Some(_), Some(_)) if !cfg!(feature = "tls") => {
                p.push("server.tls_cert: TLS needs the `tls` feature".into())
            }
            (Some(c), Some(k)) => {
                for (field, path) in [("tls_cert", c), ("tls_key", k)] {
                    if !std::path::Path::new(path).is_file() {
                        p.push(format!("server.{field}: `{path}` is not a readable file"));
                    }
                }
            }
            _ => p.push("server.tls_cert, server.tls_key: give both or neither".into()),
        }
        if let Some(g) = &s.grpc_listen {
            if !cfg!(feature = "grpc") {
                p.push("server.grpc_listen: needs the `grpc` feature".into());
            } else if g.parse::<std::net::SocketAddr>().is_err() {
                p.push(format!(
                    "server.grpc_listen: `{g}` is not an address like 127.0.0.1:8081"
                ));
            }
        }
        if let Some(var) = &s.api_key_env {
            if std::env::var(var).map_or(true, |v| v.is_empty()) {
                p.push(format!(
                    "server.api_key_env: environment variable `{var}` is not set"
                ));
            }
        }
        p
    }
}

struct Model {
    engine: Engine<AnyBackend>,
    pending: AtomicUsize,
}

pub(crate) struct Gateway {
    models: BTreeMap<String, Model>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    token: Option<String>,
    max_items: usize,
    max_pending: usize,
    timeout: Duration,
}

/// An error answer: status, and an OpenAI-style body.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    (status, Json(json!({"error": {"message": message, "type": status.canonical_reason().unwrap_or("error")}}))).into_response()
}

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

/// A request turned away: its status, its reason, and whether to say when to retry.
pub(crate) struct Reject {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    retry_after: bool,
}

impl Reject {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Reject {
            status,
            message: message.into(),
            retry_after: status == StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let mut r = error(self.status, self.message);
        if self.retry_after {
            r.headers_mut()
                .insert("retry-after", "1".parse().expect("header value"));
        }
        r
    }
}

/// The one mapping from a record's failure to an HTTP status.
fn failure_status(f: &Failure) -> StatusCode {
    match f.kind {
        ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::InvalidInput => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Transient | ErrorKind::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// Equal in constant time (for equal lengths): no early exit on the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl Gateway {
    pub(crate) fn authorize(&self, headers: &HeaderMap) -> Result<(), Reject> {
        let sent = headers.get("authorization").and_then(|v| v.to_str().ok());
        self.check_token(sent)
    }

    /// Whether `name` is served.
    /// The configured models' names, in order.
    pub(crate) fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    pub(crate) fn has_model(&self, name: &str) -> bool {
        self.models.contains_key(name)
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
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token",
            ))
        }
    }

    /// A request's deadline: the caller's timeout (capped at ten times the default),
    /// or the default.
    pub(crate) fn deadline(&self, caller: Option<Duration>) -> Instant {
        Instant::now() + caller.map_or(self.timeout, |t| t.min(self.timeout * 10))
    }

    /// Runs `records` through `model`'s engine, for an HTTP caller.
    pub(crate) async fn infer(
        &self,
        name: &str,
        records: Vec<Value>,
        headers: &HeaderMap,
    ) -> Result<Vec<Value>, Reject> {
        self.authorize(headers)?;
        let timeout = headers
            .get("x-request-timeout-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        self.run(name, records, self.deadline(timeout)).await
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
            .ok_or_else(|| Reject::new(StatusCode::NOT_FOUND, format!("unknown model `{name}`")))?;
        if records.is_empty() {
            return Err(Reject::new(StatusCode::BAD_REQUEST, "no input"));
        }
        if records.len() > self.max_items {
            return Err(Reject::new(
                StatusCode::PAYLOAD_TOO_LARGE,
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
                StatusCode::TOO_MANY_REQUESTS,
                "the model is overloaded; retry later",
            ));
        }
        let pending: Vec<_> = records
            .into_iter()
            .map(|r| model.engine.submit(r, Some(deadline)))
            .collect();
        let results = futures::future::join_all(pending).await;
        drop(admitted);
        let mut out = Vec::with_capacity(n);
        for r in results {
            match r {
                Ok(v) => out.push(v),
                Err(f) => return Err(Reject::new(failure_status(&f), f.to_string())),
            }
        }
        Ok(out)
    }
}

pub(crate) type Shared = Arc<Gateway>;

/// Runs `flumen serve CONFIG` until interrupted.
pub async fn serve(path: &std::path::Path) -> Result<()> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadConfig(vec![format!("{shown}: cannot read: {e}")]))?;
    let config: ServeConfig = toml::from_str(&text)
        .map_err(|e| BadConfig(vec![format!("{shown}: {}", e.to_string().trim_end())]))?;
    let problems: Vec<String> = config
        .validate()
        .into_iter()
        .map(|p| format!("{shown}: {p}"))
        .collect();
    if !problems.is_empty() {
        return Err(BadConfig(problems).into());
    }
    let running = start(&config).await?;
    let scheme = if config.server.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    eprintln!("flumen serve: listening on {scheme}://{}", running.addr);
    let stop = running.stopper();
    let mut signals = crate::signals::Signals::listen();
    tokio::spawn(async move {
        signals.recv().await;
        eprintln!("flumen serve: stopping: answering the requests in flight");
        stop.stop();
    });
    running.finished().await
}

/// A gateway running in the background.
pub struct Running {
    /// The HTTP address it listens on.
    pub addr: std::net::SocketAddr,
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

/// Ready when every model can take requests: its backend was reached at start (the
/// gateway listens only then) and its circuit breaker is not open. Otherwise 503,
/// naming the models that are not.
async fn ready(State(g): State<Shared>) -> Response {
    let open: Vec<&str> = g
        .models
        .iter()
        .filter(|(_, m)| m.engine.stats().breaker == flumen_engine::BreakerPhase::Open)
        .map(|(name, _)| name.as_str())
        .collect();
    if open.is_empty() {
        StatusCode::OK.into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("circuit open for: {}", open.join(", ")),
        )
    }
}

/// The access log: one JSON object per request on stderr. Only the method, the path,
/// the status and the time are written — no body, query or header, so neither
/// payloads nor tokens reach the log.
async fn access_log(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let line = json!({
        "ts": (ts * 1e3).round() / 1e3,
        "event": "request",
        "method": method,
        "path": path,
        "status": response.status().as_u16(),
        "ms": (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
    });
    eprintln!("{line}");
    response
}

/// The process's Prometheus recorder, installed on first use: every engine of the
/// process (labelled `engine`) reports to it, and every `/metrics` endpoint renders it.
/// If another recorder was installed first, the handle renders nothing.
fn prometheus() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_ok() {
                flumen_engine::telemetry::describe();
            }
            handle
        })
        .clone()
}

/// Installs the process's Prometheus recorder (engine metrics, names in
/// `flumen_engine::telemetry`) and serves `GET /metrics` on `addr` in the background,
/// for `flumen run --metrics-addr`. Returns the bound address (port 0 picks one).
pub async fn serve_metrics(addr: std::net::SocketAddr) -> std::io::Result<std::net::SocketAddr> {
    let handle = prometheus();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(bound)
}

/// Starts a gateway for a validated configuration: connects every model's backend,
/// then listens. A `listen` port of 0 picks a free one (see [`Running::addr`]).
pub async fn start(config: &ServeConfig) -> Result<Running> {
    // Every engine's metrics (names in flumen_engine::telemetry), for `/metrics`.
    let handle = prometheus();
    let mut models = BTreeMap::new();
    for m in &config.models {
        let backend = AnyBackend::build(&m.backend).await.map_err(|p| {
            anyhow::anyhow!(
                "model `{}`: cannot start its backend: {}",
                m.name,
                p.join("; ")
            )
        })?;
        let engine = Engine::new(backend, m.engine.config(&m.name));
        models.insert(
            m.name.clone(),
            Model {
                engine,
                pending: AtomicUsize::new(0),
            },
        );
    }
    let s = &config.server;
    let token = match &s.api_key_env {
        Some(var) => Some(std::env::var(var).context("server.api_key_env")?),
        None => None,
    };
    let stop = Stopper(Arc::new(tokio::sync::watch::channel(false).0));
    let mut servers = Vec::new();
    let gateway = Arc::new(Gateway {
        models,
        metrics: handle,
        token,
        max_items: s.max_items,
        max_pending: s.max_pending,
        timeout: Duration::from_millis(s.timeout_ms),
    });
    let app = Router::new()
        .route("/v1/embeddings", post(crate::serve_openai::embeddings))
        .route("/v1/chat/completions", post(crate::serve_openai::chat))
        .route("/v1/models", get(crate::serve_openai::list_models))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready))
        .route(
            "/metrics",
            get(|State(g): State<Shared>| async move { g.metrics.render() }),
        )
        .route("/health/live", get(|| async { StatusCode::OK }))
        .route("/health/ready", get(ready))
        .route(
            "/v2/models/{model}",
            get(crate::serve_kserve::kserve_metadata),
        )
        .route(
            "/v2/models/{model}/ready",
            get(crate::serve_kserve::kserve_ready),
        )
        .route(
            "/v2/models/{model}/infer",
            post(crate::serve_kserve::kserve_infer),
        )
        .layer(DefaultBodyLimit::max(s.max_body_bytes))
        .with_state(Arc::clone(&gateway));
    let app = if s.log_requests {
        app.layer(axum::middleware::from_fn(access_log))
    } else {
        app
    };
    #[cfg(feature = "grpc")]
    if let Some(addr) = &s.grpc_listen {
        let addr: std::net::SocketAddr = addr.parse().context("server.grpc_listen")?;
        let service = crate::serve_grpc::GrpcGateway(Arc::clone(&gateway)).service();
        // Bound here, so that the gateway takes gRPC calls once `start` returns.
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (server.grpc_listen)"))?;
        eprintln!("flumen serve: KServe v2 gRPC on {}", listener.local_addr()?);
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let stopped = stop.stopped();
        servers.push(tokio::spawn(async move {
            tonic::transport::Server::builder()
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
    #[cfg(feature = "tls")]
    if let (Some(cert), Some(key)) = (&s.tls_cert, &s.tls_key) {
        let acceptor = tls::acceptor(cert, key)?;
        servers.push(tokio::spawn(async move {
            tls::serve(listener, acceptor, app, stopped)
                .await
                .context("the HTTPS server failed")
        }));
        return Ok(Running {
            addr,
            servers,
            stop,
        });
    }
    servers.push(tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
            .context("the HTTP server failed")
    }));
    Ok(Running {
        addr,
        servers,
        stop,
    })
}

/// HTTPS for the gateway's HTTP listener (rustls).
#[cfg(feature = "tls")]
mod tls {
    use std::sync::Arc;

    use anyhow::{Context, Result};
    use axum::Router;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::ServerConfig;
    use tokio_rustls::TlsAcceptor;

    /// A TLS acceptor for the PEM certificate chain and key at these paths.
    pub(super) fn acceptor(cert: &str, key: &str) -> Result<TlsAcceptor> {
        let certs = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("server.tls_cert: cannot read {cert}"))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("server.tls_cert: {cert} is not a PEM certificate chain"))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("server.tls_key: {key} is not a PEM private key"))?;
        let config = ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("server.tls_cert / server.tls_key do not match")?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Accepts TLS connections and serves `app` on each until `stopped`; then stops
    /// accepting, lets every connection answer its requests in flight (idle ones
    /// close), and returns once they have.
    pub(super) async fn serve(
        listener: tokio::net::TcpListener,
        acceptor: TlsAcceptor,
        app: Router,
        stopped: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let graceful = GracefulShutdown::new();
        tokio::pin!(stopped);
        loop {
            let (tcp, _) = tokio::select! {
                accepted = listener.accept() => accepted?,
                () = &mut stopped => break,
            };
            let (acceptor, app, watcher) = (acceptor.clone(), app.clone(), graceful.watcher());
            tokio::spawn(async move {
                // A failed handshake concerns that connection only.
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = TowerToHyperService::new(app);
                let builder = Builder::new(TokioExecutor::new());
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let _ = watcher.watch(connection).await;
            });
        }
        drop(listener);
        graceful.shutdown().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ready_turns_503_while_a_models_breaker_is_open() {
        let config = ServeConfig::from_toml(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n\
             [[models]]\nname = \"good\"\n[models.backend]\nkind = \"sim\"\na_ms = 1.0\n\n\
             [[models]]\nname = \"bad\"\n[models.backend]\nkind = \"sim\"\na_ms = 1.0\nerror_rate = 1.0\n\
             [models.engine]\nbreaker = true\nbreaker_min_calls = 3\nmax_attempts = 1\n",
        )
        .unwrap();
        let running = start(&config).await.unwrap();
        let base = format!("http://{}", running.addr);
        let http = reqwest::Client::new();
        let ready = || async {
            let r = http
                .get(format!("{base}/health/ready"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        };
        assert_eq!(ready().await.0, 200);
        let row =
            json!({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]});
        // Failing calls until the breaker opens (3 are needed; with it open, a
        // request would wait for it within its deadline, so stop there).
        let mut sent = 0;
        while ready().await.0 == 200 {
            assert!(sent < 10, "the breaker never opened");
            let r = http
                .post(format!("{base}/v2/models/bad/infer"))
                .header("x-request-timeout-ms", "2000")
                .json(&row)
                .send()
                .await
                .unwrap();
            assert!(!r.status().is_success());
            sent += 1;
        }
        let (status, body) = ready().await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("circuit open for: bad"), "{body}");
        let good = http
            .post(format!("{base}/v2/models/good/infer"))
            .json(&row)
            .send()
            .await
            .unwrap();
        assert!(good.status().is_success(), "the other model still serves");
        running.stopper().stop();
    }

    #[test]
    fn tokens_compare_without_shortcuts() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"", b"x"));
    }

    #[test]
    fn failures_map_to_one_status_each() {
        let f = |k| failure_status(&Failure::new(k, "x", 1));
        assert_eq!(f(ErrorKind::Overloaded), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(f(ErrorKind::Timeout), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(f(ErrorKind::InvalidInput), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(f(ErrorKind::Permanent), StatusCode::BAD_GATEWAY);
    }
}
