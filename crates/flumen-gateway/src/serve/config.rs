//! `flumen serve`'s configuration file: the listener and its limits (`[server]`) and
//! the models served (`[[models]]`), each with its backend and engine sections from
//! [`flumen_config`]. Every problem is reported at once, each with its path.

use flumen_config::{BackendConfig, BudgetSection, CacheSection, EngineSection, PricesSection};
use serde::Deserialize;

/// A gateway configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The listener and its limits.
    #[serde(default)]
    pub server: ServerSection,
    /// Where quota buckets live (`[quota]`): here, or in Redis for replicas to share.
    #[serde(default)]
    pub quota: super::quota::QuotaSection,
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
    /// A file of tenants with the SHA-256 of their API keys, classes, weights and
    /// quotas (see the README's "Scheduling"); read again on SIGHUP and when it
    /// changes. With it a caller needs a tenant's key (or the `api_key_env` token,
    /// which names no tenant).
    pub keys_file: Option<String>,
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
    /// (`/health/*`, `/v2/health/*`, gRPC ServerLive/ServerReady), `"status"` (the
    /// status page `/`, `/status.json` and its `/assets/`) and `"metrics"`
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
            keys_file: None,
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
    /// Its result cache (`[models.cache]`): on by default for deterministic
    /// backends; models that name the same file or Redis share it (their keys differ).
    #[serde(default)]
    pub cache: CacheSection,
    /// What its tokens cost (`[models.prices]`), for a money budget.
    #[serde(default)]
    pub prices: Option<PricesSection>,
    /// A spending limit on its calls (`[models.budget]`): over it, requests get 429
    /// with a message naming the budget.
    #[serde(default)]
    pub budget: BudgetSection,
    /// The tensors a model that is not behind a KServe backend shows over KServe v2
    /// (`[models.kserve]`); without it, one input `INPUT` and one output `OUTPUT` of
    /// any datatype. (A KServe backend's come from its server.)
    #[serde(default)]
    pub kserve: Option<DeclaredTensors>,
    /// The model's embeddings may be shortened: `/v1/embeddings` takes `dimensions`
    /// and answers the first that many, renormalised — right only for models trained
    /// for it (Matryoshka embeddings, OpenAI's text-embedding-3-*). Off by default.
    #[serde(default)]
    pub truncate_dimensions: bool,
    /// What its provider allows, all replicas together (`[models.upstream]`: rpm,
    /// tpm): no call is sent beyond it (shared through `[quota]`).
    #[serde(default)]
    pub upstream: super::quota::UpstreamSection,
}

/// `[models.kserve]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredTensors {
    /// The inputs, in order: each row of a request fills every one (a record is the
    /// row itself for one input, else an object of them by name).
    pub inputs: Vec<TensorSection>,
    /// The outputs, in order (a prediction is the row of the one, else an object of
    /// them by name).
    pub outputs: Vec<TensorSection>,
}

/// One declared tensor.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSection {
    /// Its name.
    pub name: String,
    /// `FP32`, `INT64`, `BYTES`, …
    pub datatype: String,
    /// Its shape, the batch dimension first as -1 (any size), e.g. `[-1, 384]`.
    pub shape: Vec<i64>,
}

/// KServe v2's tensor datatypes.
const DATATYPES: [&str; 14] = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
    "FP32", "FP64", "BYTES", "BF16",
];

impl DeclaredTensors {
    fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        for (list, tensors) in [("inputs", &self.inputs), ("outputs", &self.outputs)] {
            if tensors.is_empty() {
                p.push(format!("{path}.{list}: at least one tensor is needed"));
            }
            let mut names = std::collections::HashSet::new();
            for (i, t) in tensors.iter().enumerate() {
                let at = format!("{path}.{list}[{i}]");
                if t.name.is_empty() || !names.insert(t.name.as_str()) {
                    p.push(format!("{at}.name: must be non-empty and unique"));
                }
                if !DATATYPES.contains(&t.datatype.as_str()) {
                    p.push(format!(
                        "{at}.datatype: `{}` is not one of {}",
                        t.datatype,
                        DATATYPES.join(", ")
                    ));
                }
                let batched = t.shape.first() == Some(&-1);
                if !batched || t.shape[1..].iter().any(|d| *d == 0 || *d < -1) {
                    p.push(format!(
                        "{at}.shape: {:?} must start with -1 (the batch), then sizes (-1: any)",
                        t.shape
                    ));
                }
            }
        }
        p
    }
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
            if matches!(&m.backend, BackendConfig::OpenaiChat(o) if o.has_pipeline()) {
                p.push(format!(
                    "{path}.backend: user_template, response_schema and max_repairs are for \
                     `flumen run`'s record pipelines; the gateway passes whole chat requests \
                     through (send `response_format` in the request)"
                ));
            }
            p.extend(m.engine.validate(&format!("{path}.engine")));
            p.extend(m.cache.validate(&format!("{path}.cache")));
            p.extend(m.upstream.validate(&format!("{path}.upstream")));
            if let Some(prices) = &m.prices {
                p.extend(prices.validate(&format!("{path}.prices")));
            }
            p.extend(
                m.budget
                    .validate(&format!("{path}.budget"), m.prices.as_ref()),
            );
            if let Some(k) = &m.kserve {
                if matches!(m.backend, BackendConfig::Kserve(_)) {
                    p.push(format!(
                        "{path}.kserve: a KServe backend's tensors come from its server; declare them only for other backends"
                    ));
                }
                p.extend(k.validate(&format!("{path}.kserve")));
            }
        }
        p.extend(self.quota.validate());
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
            if !matches!(e.as_str(), "health" | "metrics" | "status") {
                p.push(format!(
                    "server.unauthenticated[{i}]: `{e}` is not \"health\", \"metrics\" or \"status\""
                ));
            }
        }
        if let Some(path) = &s.keys_file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    if let Err(problems) = super::tenants::parse(path, &text) {
                        p.extend(
                            problems
                                .into_iter()
                                .map(|e| format!("server.keys_file: {e}")),
                        );
                    }
                }
                Err(e) => p.push(format!("server.keys_file: cannot read `{path}`: {e}")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_pipeline_is_refused_naming_the_model() {
        let Err(problems) = ServeConfig::from_toml(
            "[[models]]\nname = \"chat\"\n[models.backend]\nkind = \"openai-chat\"\n\
             base_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\nuser_template = \"{{ text }}\"\n",
        ) else {
            panic!("a record pipeline in the gateway was accepted");
        };
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("models[0].backend: user_template")),
            "{problems:?}"
        );
    }
}
