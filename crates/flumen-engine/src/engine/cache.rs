//! The result cache in front of the queue: a record whose answer is in the store is
//! answered from it without reaching the queue; identical records queued or in
//! flight at the same time share one backend slot (in-flight deduplication).
//!
//! A record's path, when its backend gives it a [`cache_key`](flumen_core::Backend::cache_key)
//! (its key: SHA-256 of the engine's namespace — the model's identity — and the
//! input's content):
//!
//! 1. **Lead or follow.** If an identical record is already being looked up or on its
//!    way to the backend, this one waits for that record's answer (a *follower*);
//!    otherwise it *leads* its key.
//! 2. **Look up.** A leader looks its key up in the store, within the store's
//!    timeout. A hit that decodes is its outcome (attempts 0), and its followers'. A
//!    store that fails or times out counts an error and the record goes on as a miss:
//!    a store never fails a record.
//! 3. **Queue, write, then answer.** A leader that missed is queued like any record.
//!    Its success is written to the store (awaited, within the timeout) before its
//!    outcome is given and before the key is freed, so a consumer that commits after
//!    the outcome never commits an answer the store does not hold, and no later
//!    identical record reaches the backend while the store works. Every follower gets
//!    its own copy, decoded from the same bytes.
//!
//! A store that fails or times out is set aside for [`STORE_REST`]: lookups and
//! writes skip it (counted as bypassed) and records go straight to the backend,
//! instead of each paying the timeout; then the next operation tries it again.
//!
//! A leader's failure of a kind that the same input would meet again (invalid input,
//! permanent) is its followers' too, with the leader's attempts. Any other failure
//! (its deadline, overload, an outage) is the leader's own: its followers go back to
//! step 1, one of them leading, each within its own deadline. A follower whose
//! deadline passes first fails with `Timeout` at that deadline. So every record still
//! has exactly one outcome.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flumen_core::{CacheKey, ErrorKind, Failure, Store};
use metrics::{Counter, Gauge};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio::time::{timeout, timeout_at, Instant};

/// How long a store that failed is left alone before it is tried again.
pub const STORE_REST: Duration = Duration::from_secs(1);

/// The result cache of an engine.
#[derive(Clone)]
pub struct CacheConfig {
    /// Where answers are kept.
    pub store: Arc<dyn Store>,
    /// What makes this engine's answers differ from another's for the same input:
    /// the model's identity and the parameters that change its answer. Hashed into
    /// every key, so engines may share a store.
    pub namespace: String,
    /// The longest a lookup or a write may take before the record goes on without
    /// it (a store that is slow is treated as one that failed).
    pub timeout: Duration,
}

impl fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheConfig")
            .field("store", &self.store.kind())
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Counters of a result cache; see [`CacheStats`].
#[derive(Debug, Default)]
pub(crate) struct CacheCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    shared: AtomicU64,
    errors: AtomicU64,
    bypassed: AtomicU64,
}

/// What the result cache has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Records answered from the store.
    pub hits: u64,
    /// Records looked up and not found (or whose lookup failed or was skipped), and
    /// so queued for the backend (where a spent budget or a deadline may still fail
    /// them before they are sent).
    pub misses: u64,
    /// Records answered by an identical record's lookup or call, without a lookup or
    /// a call of their own.
    pub shared: u64,
    /// Store operations that failed or timed out, and entries that did not decode.
    pub errors: u64,
    /// Store operations skipped because the store had just failed (see
    /// [`STORE_REST`]).
    pub bypassed: u64,
}

impl CacheCounters {
    pub(crate) fn snapshot(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            shared: self.shared.load(Relaxed),
            errors: self.errors.load(Relaxed),
            bypassed: self.bypassed.load(Relaxed),
        }
    }
}

/// The cache's metric handles.
struct CacheInstruments {
    hit: Counter,
    miss: Counter,
    shared: Counter,
    get_error: Counter,
    put_error: Counter,
    decode_error: Counter,
    bypassed: Counter,
    up: Gauge,
}

impl CacheInstruments {
    fn new(engine: &str, store: &'static str) -> Self {
        use crate::telemetry::{CACHE_BYPASSED, CACHE_ERRORS, CACHE_LOOKUPS, CACHE_STORE_UP};
        let lookup = |r: &'static str| metrics::counter!(CACHE_LOOKUPS, "engine" => engine.to_owned(), "store" => store, "result" => r);
        let error = |op: &'static str| metrics::counter!(CACHE_ERRORS, "engine" => engine.to_owned(), "store" => store, "op" => op);
        CacheInstruments {
            hit: lookup("hit"),
            miss: lookup("miss"),
            shared: lookup("shared"),
            get_error: error("get"),
            put_error: error("put"),
            decode_error: error("decode"),
            bypassed: metrics::counter!(CACHE_BYPASSED, "engine" => engine.to_owned(), "store" => store),
            up: metrics::gauge!(CACHE_STORE_UP, "engine" => engine.to_owned(), "store" => store),
        }
    }
}

/// What a leader hands its followers: the answer's bytes, or a failure the same
/// input would meet again.
pub(crate) type Shared = Result<Arc<Vec<u8>>, Failure>;

type Followers = Vec<oneshot::Sender<Shared>>;

/// An engine's result cache: the store, and the records on their way to the backend.
pub(crate) struct Cache {
    store: Arc<dyn Store>,
    namespace: String,
    timeout: Duration,
    in_flight: Mutex<HashMap<CacheKey, Followers>>,
    /// Until when the store is left alone after a failure.
    resting: Mutex<Option<Instant>>,
    pub(crate) counters: CacheCounters,
    instruments: CacheInstruments,
}

/// What a lookup found.
pub(crate) enum Lookup {
    /// The stored bytes.
    Hit(Vec<u8>),
    /// Nothing (or the store failed, counted).
    Miss,
}

/// Whether a missed record leads its key's call or follows another's.
pub(crate) enum Role<'a> {
    /// Queue the record; hand its answer to the followers through the guard.
    Leader(LeaderGuard<'a>),
    /// Wait for the leader's answer.
    Follower(oneshot::Receiver<Shared>),
}

/// A leader's claim on its key. Dropped without [`LeaderGuard::answer`] (the leader
/// failed, or its submitter went away), it frees the key and drops the followers'
/// senders, so each follower goes on alone.
pub(crate) struct LeaderGuard<'a> {
    cache: &'a Cache,
    /// Taken when the key is freed, so that it is freed once: after that, a new
    /// leader of the same key may hold it.
    key: Option<CacheKey>,
}

impl LeaderGuard<'_> {
    /// Gives every follower the answer, and frees the key.
    pub(crate) fn answer(self, bytes: Vec<u8>) {
        self.hand_over(Ok(Arc::new(bytes)));
    }

    /// Gives every follower the leader's failure, one the same input would meet
    /// again, and frees the key.
    pub(crate) fn fail(self, failure: &Failure) {
        let failure = Failure::new(
            failure.kind,
            format!("{} (an identical record's outcome)", failure.message),
            failure.attempts,
        );
        self.hand_over(Err(failure));
    }

    fn hand_over(mut self, shared: Shared) {
        let Some(key) = self.key.take() else { return };
        for f in self.cache.release(&key) {
            let _ = f.send(shared.clone());
        }
    }
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            drop(self.cache.release(&key));
        }
    }
}

impl Cache {
    pub(crate) fn new(config: &CacheConfig, engine: &str) -> Self {
        Cache {
            store: Arc::clone(&config.store),
            namespace: config.namespace.clone(),
            timeout: config.timeout,
            in_flight: Mutex::new(HashMap::new()),
            resting: Mutex::new(None),
            counters: CacheCounters::default(),
            instruments: {
                let i = CacheInstruments::new(engine, config.store.kind());
                i.up.set(1.0);
                i
            },
        }
    }

    /// Whether the store may be used now: not while it rests after a failure
    /// (counted as bypassed).
    fn usable(&self) -> bool {
        let mut resting = self.resting.lock().expect("cache rest lock");
        match *resting {
            Some(until) if Instant::now() < until => {
                self.counters.bypassed.fetch_add(1, Relaxed);
                self.instruments.bypassed.increment(1);
                false
            }
            Some(_) => {
                *resting = None;
                true
            }
            None => true,
        }
    }

    /// The store answered: it is up.
    fn answered(&self) {
        self.instruments.up.set(1.0);
    }

    /// The store failed: counted, and left alone for a while.
    fn failed(&self, op: &Counter) {
        self.counters.errors.fetch_add(1, Relaxed);
        op.increment(1);
        self.instruments.up.set(0.0);
        *self.resting.lock().expect("cache rest lock") = Some(Instant::now() + STORE_REST);
    }

    /// The key of an input's content in this engine's namespace.
    pub(crate) fn key(&self, content: &[u8]) -> CacheKey {
        let mut h = Sha256::new();
        h.update((self.namespace.len() as u64).to_le_bytes());
        h.update(self.namespace.as_bytes());
        h.update(content);
        h.finalize().into()
    }

    /// Looks `key` up, within the store's timeout.
    pub(crate) async fn get(&self, key: &CacheKey) -> Lookup {
        if !self.usable() {
            return Lookup::Miss;
        }
        match timeout(self.timeout, self.store.get(key)).await {
            Ok(Ok(found)) => {
                self.answered();
                found.map_or(Lookup::Miss, Lookup::Hit)
            }
            Ok(Err(_)) | Err(_) => {
                self.failed(&self.instruments.get_error);
                Lookup::Miss
            }
        }
    }

    /// Writes an answer, within the store's timeout and the record's deadline; a
    /// failure is counted, never passed on.
    pub(crate) async fn put(&self, key: &CacheKey, bytes: &[u8], deadline: Option<Instant>) {
        if !self.usable() {
            return;
        }
        let mut until = Instant::now() + self.timeout;
        if let Some(d) = deadline {
            until = until.min(d);
        }
        match timeout_at(until, self.store.put(key, bytes)).await {
            Ok(Ok(())) => self.answered(),
            Ok(Err(_)) | Err(_) => self.failed(&self.instruments.put_error),
        }
    }

    pub(crate) fn hit(&self) {
        self.counters.hits.fetch_add(1, Relaxed);
        self.instruments.hit.increment(1);
    }

    pub(crate) fn miss(&self) {
        self.counters.misses.fetch_add(1, Relaxed);
        self.instruments.miss.increment(1);
    }

    pub(crate) fn shared(&self) {
        self.counters.shared.fetch_add(1, Relaxed);
        self.instruments.shared.increment(1);
    }

    /// Stored bytes that did not decode: counted, and the record goes on as a miss.
    pub(crate) fn undecodable(&self) {
        self.counters.errors.fetch_add(1, Relaxed);
        self.instruments.decode_error.increment(1);
    }

    /// Leads `key`'s call, or follows the one on its way.
    pub(crate) fn join(&self, key: CacheKey) -> Role<'_> {
        let mut map = self.in_flight.lock().expect("cache in-flight lock");
        match map.get_mut(&key) {
            Some(followers) => {
                let (tx, rx) = oneshot::channel();
                followers.push(tx);
                Role::Follower(rx)
            }
            None => {
                map.insert(key, Vec::new());
                Role::Leader(LeaderGuard {
                    cache: self,
                    key: Some(key),
                })
            }
        }
    }

    fn release(&self, key: &CacheKey) -> Followers {
        self.in_flight
            .lock()
            .expect("cache in-flight lock")
            .remove(key)
            .unwrap_or_default()
    }
}

/// Waits for a leader's answer until `deadline`: `Ok(Some)` what the leader handed
/// over, `Ok(None)` the leader went away without (lead or follow again), `Err` the
/// deadline passed first.
pub(crate) async fn follow(
    rx: oneshot::Receiver<Shared>,
    deadline: Option<Instant>,
) -> Result<Option<Shared>, Failure> {
    let answer = match deadline {
        Some(d) => timeout_at(d, rx).await.map_err(|_| {
            Failure::new(
                ErrorKind::Timeout,
                "the deadline passed while an identical record's call was in flight",
                0,
            )
        })?,
        None => rx.await,
    };
    Ok(answer.ok())
}
