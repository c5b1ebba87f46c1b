//! The result cache's store: where the engine keeps answers by the hash of what
//! decides them (the model's identity and the input's content).
//!
//! The engine owns the policy (what is a key, when to look up, when to write, what a
//! failure means: never a failed record, always a call to the backend instead); a
//! store only keeps bytes under 32-byte keys. Stores: in memory, in a local file,
//! in Redis (the `flumen-cache` crate), or any other.

use std::future::Future;
use std::pin::Pin;

/// A key: the SHA-256 of the model's identity and the input's content.
pub type CacheKey = [u8; 32];

/// What a store's operation returns, boxed so that stores can be trait objects.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A store that could not answer (unreachable, timed out, corrupt). The engine
/// counts it and calls the backend instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Where cached answers live.
pub trait Store: Send + Sync + 'static {
    /// The store's kind (`memory`, `file`, `redis`): the `store` label on its metrics.
    fn kind(&self) -> &'static str;

    /// The bytes kept under `key`, or `None`.
    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Vec<u8>>>;

    /// Keeps `value` under `key` (replacing what was there).
    fn put<'a>(&'a self, key: &'a CacheKey, value: &'a [u8]) -> StoreFuture<'a, ()>;
}
