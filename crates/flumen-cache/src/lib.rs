//! Stores for Flumen's result cache ([`flumen_core::Store`]): where the engine keeps
//! answers by the hash of the model's identity and the input.
//!
//! - [`MemoryStore`]: in this process, bounded by bytes, with a time to live (moka,
//!   a concurrent cache with TinyLFU admission). The embedded default.
//! - [`FileStore`] (feature `file`): a local file that survives restarts, for one
//!   machine (redb, an embedded ACID key-value store); writes are grouped into one
//!   durable transaction by a writer thread.
//! - [`RedisStore`] (feature `redis`): Redis, shared by many workers and gateway
//!   replicas; reconnects by itself.
//!
//! - [`quota::RedisBuckets`] (feature `redis`): token buckets in Redis, for quotas
//!   that hold across gateway replicas.
//!
//! Stores only keep bytes. What a failure means is the engine's business: a lookup
//! or a write that fails or times out is counted, and the record goes to the backend.

mod memory;
pub use memory::MemoryStore;

#[cfg(feature = "file")]
mod file;
#[cfg(feature = "file")]
pub use file::FileStore;

#[cfg(feature = "redis")]
mod redis_store;
#[cfg(feature = "redis")]
pub use redis_store::RedisStore;

#[cfg(feature = "redis")]
pub mod quota;

#[cfg(feature = "test-support")]
pub mod server;

/// Milliseconds since the Unix epoch, for expiry times that outlive the process.
#[cfg(feature = "file")]
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
