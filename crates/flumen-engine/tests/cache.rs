//! The result cache and in-flight deduplication, on a paused clock: identical records
//! share one backend call and later ones are answered from the store; a store that
//! fails or hangs sends records to the backend and loses none, and is left alone
//! for a while after it fails; a leader's own failure
//! (its deadline) is not its followers', a failure the input would meet again is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flumen_cache::MemoryStore;
use flumen_core::{
    Backend, BackendError, BatchResult, CacheKey, Capabilities, ErrorKind, Store, StoreError,
    StoreFuture,
};
use flumen_engine::{CacheConfig, Engine, EngineConfig, STORE_REST};
use tokio::time::{sleep, Instant};

/// Doubles its input after 100 ms a call; 13 is refused (permanent). Counts what it
/// receives, by input.
#[derive(Default)]
struct Double {
    received: Mutex<HashMap<u32, u32>>,
}

impl Double {
    fn received(&self, x: u32) -> u32 {
        self.received.lock().unwrap().get(&x).copied().unwrap_or(0)
    }

    fn total(&self) -> u32 {
        self.received.lock().unwrap().values().sum()
    }
}

impl Backend for Double {
    type Input = u32;
    type Output = u64;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_items: 64,
            ..Capabilities::default()
        }
    }

    fn cache_key(&self, input: &u32) -> Option<Vec<u8>> {
        Some(input.to_le_bytes().to_vec())
    }

    fn encode_output(&self, output: &u64) -> Option<Vec<u8>> {
        Some(output.to_le_bytes().to_vec())
    }

    fn decode_output(&self, bytes: &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }

    async fn call(&self, batch: &[u32]) -> BatchResult<u64> {
        {
            let mut r = self.received.lock().unwrap();
            for x in batch {
                *r.entry(*x).or_default() += 1;
            }
        }
        sleep(Duration::from_millis(100)).await;
        Ok(batch
            .iter()
            .map(|&x| {
                if x == 13 {
                    Err(BackendError::new(ErrorKind::Permanent, "13 is refused"))
                } else {
                    Ok(u64::from(x) * 2)
                }
            })
            .collect())
    }
}

/// A store that fails every operation, or never answers.
struct Broken {
    hang: bool,
}

impl Store for Broken {
    fn kind(&self) -> &'static str {
        "broken"
    }

    fn get<'a>(&'a self, _key: &'a CacheKey) -> StoreFuture<'a, Option<Vec<u8>>> {
        if self.hang {
            Box::pin(std::future::pending())
        } else {
            Box::pin(async { Err(StoreError("refused".into())) })
        }
    }

    fn put<'a>(&'a self, _key: &'a CacheKey, _value: &'a [u8]) -> StoreFuture<'a, ()> {
        if self.hang {
            Box::pin(std::future::pending())
        } else {
            Box::pin(async { Err(StoreError("refused".into())) })
        }
    }
}

fn engine(backend: &Arc<Double>, store: Arc<dyn Store>) -> Engine<Double> {
    Engine::from_arc(
        Arc::clone(backend),
        EngineConfig {
            name: "cache".into(),
            cache: Some(CacheConfig {
                store,
                namespace: "double v1".into(),
                timeout: Duration::from_millis(20),
            }),
            ..EngineConfig::default()
        },
    )
}

/// `inputs` submitted at once, with a deadline of `timeout` each; their outcomes.
async fn submit_all(
    engine: &Engine<Double>,
    inputs: &[u32],
    timeout: Duration,
) -> Vec<Result<u64, flumen_core::Failure>> {
    let deadline = Instant::now() + timeout;
    let pending: Vec<_> = inputs
        .iter()
        .map(|&x| engine.submit(x, Some(deadline)))
        .collect();
    futures::future::join_all(pending).await
}

#[tokio::test(start_paused = true)]
async fn identical_records_share_one_call_and_later_ones_come_from_the_store() {
    let backend = Arc::new(Double::default());
    let engine = engine(&backend, Arc::new(MemoryStore::new(1 << 20, None)));
    // 1,000 records over 50 distinct inputs, all at once.
    let inputs: Vec<u32> = (0..1_000).map(|i| (i * 7919) % 50 + 100).collect();
    let out = submit_all(&engine, &inputs, Duration::from_secs(5)).await;
    for (x, r) in inputs.iter().zip(&out) {
        assert_eq!(r.as_ref().unwrap(), &(u64::from(*x) * 2), "input {x}");
    }
    for x in 100..150 {
        assert_eq!(
            backend.received(x),
            1,
            "input {x} reached the backend more than once"
        );
    }
    let s = engine.cache_stats().unwrap();
    assert_eq!(
        (s.misses, s.hits + s.shared, s.errors),
        (50, 950, 0),
        "{s:?}"
    );

    // Later, the same inputs again: all from the store, none to the backend.
    let out = submit_all(&engine, &inputs, Duration::from_secs(5)).await;
    assert!(out.iter().all(Result::is_ok));
    assert_eq!(backend.total(), 50);
    assert_eq!(engine.cache_stats().unwrap().misses, 50);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_fails_or_hangs_sends_records_to_the_backend_and_loses_none() {
    for hang in [false, true] {
        let backend = Arc::new(Double::default());
        let engine = engine(&backend, Arc::new(Broken { hang }));
        let inputs: Vec<u32> = (0..200).map(|i| i % 20).collect();
        for round in 1..=2 {
            let out = submit_all(&engine, &inputs, Duration::from_secs(5)).await;
            for (x, r) in inputs.iter().zip(&out) {
                match r {
                    Ok(y) => assert_eq!(*y, u64::from(*x) * 2),
                    Err(f) => assert!(*x == 13 && f.kind == ErrorKind::Permanent, "{x}: {f}"),
                }
            }
            // In-flight sharing still works; the store remembers nothing.
            assert_eq!(backend.total(), 20 * round, "hang={hang}");
        }
        let s = engine.cache_stats().unwrap();
        // Each leader's lookup, and each successful leader's write, 78 in all: the
        // first failed (a refusal), or the first round's 20 lookups, all waiting
        // together, timed out; the store was left alone for the rest.
        assert_eq!((s.hits, s.misses), (0, 40), "hang={hang}: {s:?}");
        let failed = if hang { 20 } else { 1 };
        assert_eq!(
            (s.errors, s.bypassed),
            (failed, 78 - failed),
            "hang={hang}: {s:?}"
        );
        // Once the store has rested, it is tried again.
        sleep(STORE_REST).await;
        assert!(engine.submit(1, None).await.is_ok());
        assert_eq!(
            engine.cache_stats().unwrap().errors,
            failed + 1,
            "hang={hang}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_leaders_deadline_is_its_own_and_a_refusal_is_shared() {
    let backend = Arc::new(Double::default());
    let engine = engine(&backend, Arc::new(MemoryStore::new(1 << 20, None)));
    // The leader cannot make 50 ms; its follower, with 1 s, leads next and is answered.
    let now = Instant::now();
    let leader = engine.submit(7, Some(now + Duration::from_millis(50)));
    let follower = engine.submit(7, Some(now + Duration::from_secs(1)));
    let (l, f) = futures::join!(leader, follower);
    assert_eq!(l.unwrap_err().kind, ErrorKind::Timeout);
    assert_eq!(f.unwrap(), 14);

    // A follower whose deadline passes first fails at its own deadline.
    let leader = engine.submit(8, Some(now + Duration::from_secs(1)));
    let follower = engine.submit(8, Some(Instant::now() + Duration::from_millis(30)));
    let (l, f) = futures::join!(leader, follower);
    assert_eq!(l.unwrap(), 16);
    assert_eq!(f.unwrap_err().kind, ErrorKind::Timeout);

    // 13 is refused: one call, and every identical record in flight gets the refusal.
    let out = submit_all(&engine, &[13; 10], Duration::from_secs(5)).await;
    assert_eq!(backend.received(13), 1);
    for r in out {
        let f = r.unwrap_err();
        assert_eq!(f.kind, ErrorKind::Permanent);
        assert!(f.message.contains("13 is refused"), "{f}");
    }
}
