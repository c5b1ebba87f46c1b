//! `flumen serve`'s configuration file: the listener and its limits (`[server]`) and
//! the models served (`[[models]]`), each with its backend and engine sections from
//! [`flumen_config`]. Every problem is reported at once, each with its path.

use flumen_config::{BackendConfig, EngineSection};
use serde::Deserialize;

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
    /// Largest request, bytes: an HTTP body (413 above; after decompression when
    /// it comes gzip- or deflate-encoded) or a gRPC message (RESOURCE_EXHAUSTED).
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
    /// How long a connection may take to send a request's headers, from when the
    /// gateway waits for it — a new connection, or a kept-alive one after its last
    /// answer, so this is also the idle keep-alive time — ms; then it is closed.
    pub header_timeout_ms: u64,
    /// How long a request's whole body may take to arrive once its headers have, ms
    /// (408 and the connection closed after).
    pub body_timeout_ms: u64,
    /// HTTP connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// With `api_key_env`, endpoints answered without the token: `"health"`
    /// (`/health/*`, `/v2/health/*`, gRPC ServerLive/ServerReady) and `"metrics"`
    /// (`/metrics`). Empty by default: the token guards everything.
    pub unauthenticated: Vec<String>,
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
            header_timeout_ms: 30_000,
            body_timeout_ms: 30_000,
            max_connections: 10_000,
            unauthenticated: Vec::new(),
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
    /// The model's embeddings may be shortened: `/v1/embeddings` takes `dimensions`
    /// and answers the first that many, renormalised — right only for models trained
    /// for it (Matryoshka embeddings, OpenAI's text-embedding-3-*). Off by default.
    #[serde(default)]
    pub truncate_dimensions: bool,
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
            ("max_connections", s.max_connections),
            ("header_timeout_ms", s.header_timeout_ms as usize),
            ("body_timeout_ms", s.body_timeout_ms as usize),
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
        for (i, e) in s.unauthenticated.iter().enumerate() {
            if e != "health" && e != "metrics" {
                p.push(format!(
                    "server.unauthenticated[{i}]: `{e}` is not \"health\" or \"metrics\""
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
