//! The in-memory store: moka's concurrent cache, bounded by bytes, with a TTL.

use std::sync::Arc;
use std::time::Duration;

use flumen_core::{CacheKey, Store, StoreFuture};
use moka::sync::Cache;

/// Answers kept in this process: at most `max_bytes` (keys and values, weighed
/// by their length), each for at most `ttl`.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<CacheKey, Arc<[u8]>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.cache.entry_count())
            .field("bytes", &self.cache.weighted_size())
            .finish()
    }
}

impl MemoryStore {
    /// A store of at most `max_bytes`, whose entries expire `ttl` after they were
    /// written (`None`: only when evicted for room).
    pub fn new(max_bytes: u64, ttl: Option<Duration>) -> Self {
        let mut builder =
            Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_k: &CacheKey, v: &Arc<[u8]>| {
                    u32::try_from(v.len() + std::mem::size_of::<CacheKey>()).unwrap_or(u32::MAX)
                });
        if let Some(ttl) = ttl {
            builder = builder.time_to_live(ttl);
        }
        MemoryStore {
            cache: builder.build(),
        }
    }

    /// Entries now (approximate while evictions are pending).
    pub fn entries(&self) -> u64 {
        self.cache.entry_count()
    }
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Vec<u8>>> {
        let found = self.cache.get(key).map(|v| v.to_vec());
        Box::pin(std::future::ready(Ok(found)))
    }

    fn put<'a>(&'a self, key: &'a CacheKey, value: &'a [u8]) -> StoreFuture<'a, ()> {
        self.cache.insert(*key, Arc::from(value));
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> CacheKey {
        [i; 32]
    }

    #[tokio::test]
    async fn keeps_what_it_is_given_within_its_bytes() {
        let store = MemoryStore::new(10 * 1024, None);
        store.put(&key(1), b"one").await.unwrap();
        assert_eq!(
            store.get(&key(1)).await.unwrap().as_deref(),
            Some(&b"one"[..])
        );
        assert_eq!(store.get(&key(2)).await.unwrap(), None);
        // 100 entries of 1 KiB do not fit in 10 KiB: the store stays within its bound.
        for i in 0..100u8 {
            store.put(&key(i), &[i; 1024]).await.unwrap();
        }
        store.cache.run_pending_tasks();
        assert!(store.cache.weighted_size() <= 10 * 1024, "{store:?}");
        assert!(store.entries() <= 10, "{store:?}");
    }
}
