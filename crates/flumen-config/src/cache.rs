//! `[cache]`: the result cache — whether it is on, and its store.
//!
//! ```toml
//! [cache]
//! enabled = true            # default: on for deterministic backends (see below)
//! store = "memory"          # memory (default) | file | redis
//! max_mb = 256              # memory: its bound, MiB
//! ttl_s = 86400             # entries expire this long after they were written (default: never)
//! path = "answers.redb"     # file
//! url = "redis://127.0.0.1:6379"  # redis
//! timeout_ms = 100          # a lookup or a write slower than this is skipped
//! version = "2"             # change it to stop using what is stored (part of every key)
//! ```
//!
//! On by default for backends whose answer is a function of the input: the embedded
//! model, OpenAI-compatible embeddings, and a KServe model with `deterministic = true`.
//! Off by default for chat (sampled), the generic HTTP backend and the simulator (a
//! cost model: caching it would hide the costs it models); `enabled = true` turns it
//! on for them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flumen_core::Store;
use flumen_engine::CacheConfig;
use serde::Deserialize;

use crate::backend::BackendConfig;

/// `[cache]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    /// On or off; default: on for deterministic backends.
    pub enabled: Option<bool>,
    /// `memory` (default), `file` or `redis`.
    pub store: Option<String>,
    /// The memory store's bound, MiB (default 256).
    pub max_mb: Option<u64>,
    /// Entries expire this long after they were written, s (default: never; the
    /// memory store still evicts for room).
    pub ttl_s: Option<u64>,
    /// The file store's file.
    pub path: Option<PathBuf>,
    /// Redis's URL: `redis://[:password@]host:port[/db]`.
    pub url: Option<String>,
    /// The longest a lookup or a write may take, ms (default 100): a slower store is
    /// skipped, the record goes to the backend.
    pub timeout_ms: Option<u64>,
    /// Part of every key: change it to stop using what is stored (a model whose
    /// weights changed under the same name, say).
    pub version: Option<String>,
}

/// Stores already opened, by what identifies them, so that models of one gateway
/// share a file (which one process may open only once) or a Redis connection.
#[derive(Default)]
pub struct Stores(HashMap<String, Arc<dyn Store>>);

impl CacheSection {
    /// Every problem at once, each with its path.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        match self.store.as_deref().unwrap_or("memory") {
            "memory" => {
                if self.max_mb == Some(0) {
                    p.push(format!("{path}.max_mb: must be > 0"));
                }
            }
            "file" => {
                if self.path.is_none() {
                    p.push(format!("{path}.path: the file store needs a file"));
                }
            }
            "redis" => match &self.url {
                None => p.push(format!("{path}.url: the redis store needs a url")),
                Some(u) if !u.starts_with("redis://") => p.push(format!(
                    "{path}.url: must start with redis:// (rediss:// is not supported)"
                )),
                Some(_) => {}
            },
            other => p.push(format!(
                "{path}.store: `{other}` is not memory, file or redis"
            )),
        }
        if self.timeout_ms == Some(0) {
            p.push(format!("{path}.timeout_ms: must be > 0"));
        }
        if self.ttl_s == Some(0) {
            p.push(format!(
                "{path}.ttl_s: must be > 0 (leave it out to keep entries)"
            ));
        }
        p
    }

    /// Whether the cache is on for `backend`.
    pub fn enabled_for(&self, backend: &BackendConfig) -> bool {
        self.enabled.unwrap_or_else(|| deterministic(backend))
    }

    /// The engine's cache for `backend`, opening its store (or reusing one in
    /// `stores`); `None` when off.
    pub fn build(
        &self,
        backend: &BackendConfig,
        stores: &mut Stores,
    ) -> Result<Option<CacheConfig>, String> {
        if !self.enabled_for(backend) {
            return Ok(None);
        }
        let timeout = Duration::from_millis(self.timeout_ms.unwrap_or(100));
        let ttl = self.ttl_s.map(Duration::from_secs);
        let kind = self.store.as_deref().unwrap_or("memory");
        // A store is shared by models that name the same one with the same TTL and
        // timeout (both belong to the store); the same file with other settings is
        // refused when it is opened twice.
        let id = match kind {
            "file" => format!("file:{:?} ttl={ttl:?}", self.path),
            "redis" => format!(
                "redis:{} ttl={ttl:?} timeout={timeout:?}",
                self.url.as_deref().unwrap_or_default()
            ),
            // One memory store per engine: its bound is the engine's.
            _ => format!("memory:{}", stores.0.len()),
        };
        let store = match stores.0.get(&id) {
            Some(s) => Arc::clone(s),
            None => {
                let s = self.open(kind, ttl, timeout)?;
                stores.0.insert(id, Arc::clone(&s));
                s
            }
        };
        let mut namespace = identity(backend);
        if let Some(v) = &self.version {
            namespace.push_str(" version=");
            namespace.push_str(v);
        }
        Ok(Some(CacheConfig {
            store,
            namespace,
            timeout,
        }))
    }

    fn open(
        &self,
        kind: &str,
        ttl: Option<Duration>,
        timeout: Duration,
    ) -> Result<Arc<dyn Store>, String> {
        match kind {
            #[cfg(feature = "file-cache")]
            "file" => {
                let path = self
                    .path
                    .as_deref()
                    .unwrap_or_else(|| "flumen-cache.redb".as_ref());
                flumen_cache::FileStore::open(path, ttl)
                    .map(|s| Arc::new(s) as Arc<dyn Store>)
                    .map_err(|e| format!("cache.path: {e}"))
            }
            #[cfg(feature = "redis-cache")]
            "redis" => {
                flumen_cache::RedisStore::new(self.url.as_deref().unwrap_or_default(), ttl, timeout)
                    .map(|s| Arc::new(s) as Arc<dyn Store>)
                    .map_err(|e| format!("cache.url: {e}"))
            }
            "memory" => Ok(Arc::new(flumen_cache::MemoryStore::new(
                self.max_mb.unwrap_or(256) << 20,
                ttl,
            ))),
            other => {
                let _ = (ttl, timeout);
                Err(format!(
                    "cache.store: `{other}` needs flumen built with the `{other}-cache` feature"
                ))
            }
        }
    }
}

/// Whether a backend's answer is a function of its input alone.
fn deterministic(backend: &BackendConfig) -> bool {
    match backend {
        BackendConfig::Embedded(_) | BackendConfig::OpenaiEmbeddings(_) => true,
        BackendConfig::Kserve(k) => k.deterministic,
        BackendConfig::Onnx(_) => true,
        BackendConfig::Sim(_) | BackendConfig::OpenaiChat(_) | BackendConfig::Http(_) => false,
    }
}

/// What makes a backend's answer to an input what it is: the model and the
/// settings that change the answer (not timeouts, limits or credentials, which
/// never appear here).
fn identity(backend: &BackendConfig) -> String {
    match backend {
        BackendConfig::Embedded(e) => format!(
            "embedded dir={:?} hub={:?} max_seq_length={:?} normalize={:?}",
            e.dir, e.hub, e.max_seq_length, e.normalize
        ),
        BackendConfig::Sim(_) => "sim".into(),
        BackendConfig::Kserve(k) => format!(
            "kserve url={} model={} version={:?} input={:?} output={:?}",
            k.url, k.model, k.version, k.input, k.output
        ),
        BackendConfig::OpenaiEmbeddings(o) => format!(
            "openai-embeddings url={} model={} dimensions={:?} max_context_tokens={:?} overflow={:?}",
            o.base_url, o.model, o.dimensions, o.max_context_tokens, o.overflow
        ),
        // A schema file counts by its content: edit it and old answers no longer count.
        BackendConfig::OpenaiChat(o) => format!(
            "openai-chat url={} model={} system_prompt={:?} temperature={:?} max_completion_tokens={:?} max_context_tokens={:?} overflow={:?} user_template={:?} response_schema={:?} response_schema_file={:?} max_repairs={:?}",
            o.base_url, o.model, o.system_prompt, o.temperature, o.max_completion_tokens, o.max_context_tokens, o.overflow,
            o.user_template, o.response_schema.as_ref().map(toml::Value::to_string),
            o.response_schema_file.as_ref().map(|f| std::fs::read_to_string(f).unwrap_or_default()), o.max_repairs
        ),
        BackendConfig::Onnx(o) => o.identity(),
        BackendConfig::Http(h) => format!(
            "http url={} mode={:?} template={} result={} item={:?}",
            h.url, h.mode, h.template, h.result, h.item
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FileConfig;

    #[test]
    fn on_for_deterministic_backends_and_every_problem_named() {
        let embedded = FileConfig::parse("p", "[backend]\nkind = \"embedded\"\n").unwrap();
        let sim = FileConfig::parse("p", "[backend]\nkind = \"sim\"\n").unwrap();
        assert!(CacheSection::default().enabled_for(&embedded.backend));
        assert!(!CacheSection::default().enabled_for(&sim.backend));
        let bad = FileConfig::parse(
            "p",
            "[backend]\nkind = \"sim\"\n[cache]\nstore = \"redis\"\nurl = \"http://x\"\ntimeout_ms = 0\nttl_s = 0\n",
        )
        .unwrap()
        .validate();
        for path in ["cache.url", "cache.timeout_ms", "cache.ttl_s"] {
            assert!(bad.iter().any(|p| p.starts_with(path)), "{path}: {bad:?}");
        }
        let bad = FileConfig::parse(
            "p",
            "[backend]\nkind = \"sim\"\n[cache]\nstore = \"disk\"\n",
        )
        .unwrap()
        .validate();
        assert!(bad[0].starts_with("cache.store: `disk`"), "{bad:?}");
    }

    #[test]
    fn models_differ_in_their_keys_and_stores_are_shared() {
        let a = FileConfig::parse(
            "p",
            "[backend]\nkind = \"kserve\"\nurl = \"http://h\"\nmodel = \"a\"\ndeterministic = true\n",
        )
        .unwrap();
        let b = FileConfig::parse(
            "p",
            "[backend]\nkind = \"kserve\"\nurl = \"http://h\"\nmodel = \"b\"\ndeterministic = true\n",
        )
        .unwrap();
        let mut stores = Stores::default();
        let ca = a.cache.build(&a.backend, &mut stores).unwrap().unwrap();
        let cb = b.cache.build(&b.backend, &mut stores).unwrap().unwrap();
        assert_ne!(ca.namespace, cb.namespace);
        // Two memory stores (one per engine).
        assert!(!Arc::ptr_eq(&ca.store, &cb.store));
        let versioned = CacheSection {
            version: Some("2".into()),
            ..CacheSection::default()
        };
        let cv = versioned.build(&a.backend, &mut stores).unwrap().unwrap();
        assert_ne!(ca.namespace, cv.namespace);
    }
}
