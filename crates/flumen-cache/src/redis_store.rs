//! The Redis store: one multiplexed connection that reconnects by itself.

use std::time::Duration;

use flumen_core::{CacheKey, Store, StoreError, StoreFuture};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Answers in Redis, shared by every worker and gateway replica that uses the same
/// server: keys are `flumen:` followed by the 32 bytes of the cache key, values the
/// answer's bytes, each set with `PX` when there is a TTL.
///
/// Built without a connection: a Redis that is down at start, or goes down later,
/// makes operations fail (each within `timeout`), which the engine counts and
/// answers from the backend; the connection comes back when Redis does.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    ttl: Option<Duration>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("ttl", &self.ttl)
            .finish()
    }
}

fn failed(e: &redis::RedisError) -> StoreError {
    StoreError(format!("redis: {e}"))
}

fn redis_key(key: &CacheKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(7 + key.len());
    k.extend_from_slice(b"flumen:");
    k.extend_from_slice(key);
    k
}

impl RedisStore {
    /// A store at `url` (`redis://host:port/db`; a password in it is never logged).
    /// `timeout` bounds connecting and each answer.
    pub fn new(url: &str, ttl: Option<Duration>, timeout: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| {
            // The URL may hold a password: say what is wrong, not the URL.
            StoreError(format!("redis: the url is not valid ({:?})", e.kind()))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| failed(&e))?;
        Ok(RedisStore { conn, ttl })
    }
}

impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Vec<u8>>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            redis::cmd("GET")
                .arg(redis_key(key))
                .query_async::<Option<Vec<u8>>>(&mut conn)
                .await
                .map_err(|e| failed(&e))
        })
    }

    fn put<'a>(&'a self, key: &'a CacheKey, value: &'a [u8]) -> StoreFuture<'a, ()> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(redis_key(key)).arg(value);
        if let Some(ttl) = self.ttl {
            cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        Box::pin(async move {
            cmd.query_async::<()>(&mut conn)
                .await
                .map_err(|e| failed(&e))
        })
    }
}
