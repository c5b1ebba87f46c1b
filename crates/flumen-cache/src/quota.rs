//! Token buckets in Redis, shared by every gateway replica that uses the same server:
//! requests and tokens per minute for each tenant and for an upstream provider.
//!
//! One Lua script does a bucket's arithmetic on Redis's own clock (`TIME`), so the
//! replicas' clocks never disagree about a refill. A bucket is a hash (`level`,
//! `at` in ms) that expires once it would be full again. Nothing here keeps time:
//! the callers (the gateway) decide what to do when Redis does not answer.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// The bucket script: `KEYS[1]` the bucket; `ARGV` its capacity, its refill per
/// millisecond, the amount wanted, a mode — `all` (take the amount or nothing),
/// `some` (take what is there, up to the amount, in whole units) or `charge` (take
/// it whatever is left: the level may go below zero) — and the level of a bucket
/// that is not there yet. Returns what was taken and, when short, the milliseconds
/// until the rest would be there.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local mode = ARGV[4]
local b = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(b[1]) or tonumber(ARGV[5])
local at = tonumber(b[2]) or now
if now > at then level = math.min(cap, level + (now - at) * rate) end
local got = 0
if mode == 'charge' then
  got = want
elseif level >= want then
  got = want
elseif mode == 'some' and level >= 1 then
  got = math.floor(level)
end
level = level - got
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(math.max(now, at)))
redis.call('PEXPIRE', KEYS[1], math.ceil((cap - math.min(level, cap)) / rate) + 1000)
local wait = 0
if got < want and mode ~= 'charge' then
  wait = math.ceil((want - got - level) / rate)
end
return {tostring(got), wait}
";

/// How much of a bucket to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// The whole amount, or nothing.
    All,
    /// What is there, up to the amount, in whole units.
    Some,
    /// The amount whatever is left (known only afterwards, like output tokens).
    Charge,
}

/// A bucket's shape: it holds `capacity` and refills `per_minute`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// The most it holds.
    pub capacity: f64,
    /// What it refills each minute, spread evenly.
    pub per_minute: f64,
    /// Whether a bucket not there yet (new, expired, or lost with a Redis that
    /// restarted empty) starts full — a tenant's quota — or empty: an upstream's
    /// limit, which a fresh bucket's burst would otherwise exceed.
    pub starts_full: bool,
}

/// What a take got: the amount taken, and when short, how long until the rest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Taken {
    /// What was taken.
    pub got: f64,
    /// When short, how long until the rest would be there.
    pub wait: Option<Duration>,
}

/// Token buckets in one Redis, under a key prefix.
#[derive(Clone)]
pub struct RedisBuckets {
    conn: ConnectionManager,
    script: redis::Script,
    prefix: String,
}

impl std::fmt::Debug for RedisBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBuckets")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Why Redis did not answer (never the URL: it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaError(pub String);

impl std::fmt::Display for QuotaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QuotaError {}

impl RedisBuckets {
    /// Buckets at `url` (`redis://host:port/db`), their keys starting with `prefix`;
    /// `timeout` bounds connecting and each answer. Connects lazily: a Redis that is
    /// down makes takes fail, each within `timeout`, until it is back.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, QuotaError> {
        let client = redis::Client::open(url)
            .map_err(|e| QuotaError(format!("redis: the url is not valid ({:?})", e.kind())))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| QuotaError(format!("redis: {e}")))?;
        Ok(RedisBuckets {
            conn,
            script: redis::Script::new(SCRIPT),
            prefix: prefix.to_owned(),
        })
    }

    /// Takes `amount` from the bucket `name` of `shape`.
    pub async fn take(
        &self,
        name: &str,
        shape: Shape,
        amount: f64,
        how: Take,
    ) -> Result<Taken, QuotaError> {
        let mut conn = self.conn.clone();
        let mode = match how {
            Take::All => "all",
            Take::Some => "some",
            Take::Charge => "charge",
        };
        let (got, wait): (String, i64) = self
            .script
            .key(format!("{}{name}", self.prefix))
            .arg(shape.capacity)
            .arg(shape.per_minute / 60_000.0)
            .arg(amount)
            .arg(mode)
            .arg(if shape.starts_full {
                shape.capacity
            } else {
                0.0
            })
            .invoke_async(&mut conn)
            .await
            .map_err(|e| QuotaError(format!("redis: {e}")))?;
        let got: f64 = got.parse().unwrap_or(0.0);
        Ok(Taken {
            got,
            wait: (wait > 0).then(|| Duration::from_millis(wait as u64)),
        })
    }
}
