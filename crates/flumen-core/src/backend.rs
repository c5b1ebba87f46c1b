use std::future::Future;

use crate::BackendError;

/// The result of one backend call: either one result per input item, in input
/// order (a batch may partly fail), or one error for the whole batch.
pub type BatchResult<O> = Result<Vec<Result<O, BackendError>>, BackendError>;

/// What a record costs the backend, beyond counting as one item.
///
/// The batcher bounds a batch by items, by bytes and by tokens (a token budget
/// like TEI's `max_batch_tokens`); a backend that does not care returns zeros.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ItemCost {
    /// Payload bytes (for request-size limits).
    pub bytes: u64,
    /// Model tokens, or any other unit the backend charges by.
    pub tokens: u64,
}

/// What the engine needs to know to plan calls to a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// The most items one call may carry (1 for a backend that takes one record per call).
    pub max_batch_items: usize,
    /// The most bytes one call may carry, if the backend has such a limit.
    pub max_batch_bytes: Option<u64>,
    /// The most tokens one call may carry, if the backend has such a limit.
    pub max_batch_tokens: Option<u64>,
    /// Whether calling twice with the same inputs is harmless (allows retries and hedging).
    pub idempotent: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            max_batch_items: 1,
            max_batch_bytes: None,
            max_batch_tokens: None,
            idempotent: true,
        }
    }
}

/// A model backend: takes a batch of inputs, returns one result per input.
///
/// The engine owns the inputs and lends them to each call, so a failed item can be
/// sent again without the backend cloning anything it does not need to. A minimal
/// implementation:
///
/// ```
/// use flumen_core::{Backend, BatchResult, Capabilities};
///
/// struct Upper;
///
/// impl Backend for Upper {
///     type Input = String;
///     type Output = String;
///
///     fn capabilities(&self) -> Capabilities {
///         Capabilities { max_batch_items: 32, ..Capabilities::default() }
///     }
///
///     async fn call(&self, batch: &[String]) -> BatchResult<String> {
///         Ok(batch.iter().map(|s| Ok(s.to_uppercase())).collect())
///     }
/// }
/// ```
pub trait Backend: Send + Sync + 'static {
    /// One record's input to the model.
    type Input: Send + Sync + 'static;
    /// One record's prediction.
    type Output: Send + 'static;

    /// Limits and properties the engine plans batches and retries with.
    fn capabilities(&self) -> Capabilities;

    /// The cost of one input beyond counting as one item. Zero by default.
    fn cost(&self, _input: &Self::Input) -> ItemCost {
        ItemCost::default()
    }

    /// The input tokens a provider bills for this input, when they differ from
    /// [`cost`](Backend::cost)'s tokens (which may include a completion budget, for
    /// rate limits); `None` (the default): the same.
    fn billed_input_tokens(&self, _input: &Self::Input) -> Option<u64> {
        None
    }

    /// The most output tokens this input's answer may cost (a chat model's
    /// `max_tokens`), for a spending budget's reservation. Zero by default (the
    /// answer costs nothing beyond the input: embeddings, tensors).
    fn max_output_tokens(&self, _input: &Self::Input) -> u64 {
        0
    }

    /// The output tokens an answer cost, as the backend reports or estimates them;
    /// zero by default.
    fn output_tokens(&self, _output: &Self::Output) -> u64 {
        0
    }

    /// The bytes that decide this input's answer, for the engine's result cache
    /// (hashed with the model's identity into the key). `None`, the default: this
    /// input is never cached. A backend whose answers are sampled (chat) should
    /// return `None` unless its user asked for caching.
    fn cache_key(&self, _input: &Self::Input) -> Option<Vec<u8>> {
        None
    }

    /// A prediction as bytes for the cache; `None` (the default) keeps it out.
    fn encode_output(&self, _output: &Self::Output) -> Option<Vec<u8>> {
        None
    }

    /// A prediction read back from [`encode_output`](Backend::encode_output)'s
    /// bytes; `None` if they do not decode (the engine then calls the backend).
    fn decode_output(&self, _bytes: &[u8]) -> Option<Self::Output> {
        None
    }

    /// Runs the model on a batch. Must return exactly one result per input, in
    /// order; a different count is treated as a permanent error for the whole batch.
    fn call(&self, batch: &[Self::Input])
        -> impl Future<Output = BatchResult<Self::Output>> + Send;
}
