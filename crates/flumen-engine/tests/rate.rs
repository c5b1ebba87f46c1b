//! An upstream's rate limit on a paused clock: records at three times what 600 calls
//! a minute carry, one record a call, for three minutes — the backend never sees
//! more than 600 calls (plus the half-second burst) in any 60 s, and sees close to
//! that; every record has one outcome (answered, or timed out waiting).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flumen_core::{Backend, BatchResult, Capabilities, ErrorKind};
use flumen_engine::rate::{LocalRate, RateLimits};
use flumen_engine::{BatchConfig, Engine, EngineConfig};
use tokio::time::Instant;

/// Answers after 5 ms; notes when each call came.
#[derive(Default)]
struct Timed {
    calls: Mutex<Vec<Instant>>,
}

impl Backend for Timed {
    type Input = u64;
    type Output = u64;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_items: 1,
            ..Capabilities::default()
        }
    }

    async fn call(&self, batch: &[u64]) -> BatchResult<u64> {
        self.calls.lock().unwrap().push(Instant::now());
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(batch.iter().map(|x| Ok(*x)).collect())
    }
}

#[tokio::test(start_paused = true)]
async fn calls_stay_within_the_upstream_limit_in_every_minute() {
    let backend = Arc::new(Timed::default());
    let t0 = Instant::now();
    let gate = LocalRate::new(
        RateLimits {
            rpm: Some(600.0),
            tpm: None,
        },
        0,
        t0,
    );
    let engine = Engine::from_arc(
        Arc::clone(&backend),
        EngineConfig {
            name: "rate".into(),
            batch: BatchConfig {
                max_items: Some(1),
                ..BatchConfig::default()
            },
            rate: Some(Arc::new(gate)),
            ..EngineConfig::default()
        },
    );
    // 30 records a second (3 x 600 a minute) for 180 s, each due in 5 s.
    let mut records = Vec::new();
    for i in 0..5_400u64 {
        let at = t0 + Duration::from_millis(i * 1_000 / 30);
        tokio::time::sleep_until(at).await;
        let engine = engine.clone();
        records.push(tokio::spawn(async move {
            engine.submit(i, Some(at + Duration::from_secs(5))).await
        }));
    }
    let (mut ok, mut late) = (0, 0);
    for r in records {
        match r.await.unwrap() {
            Ok(_) => ok += 1,
            Err(f) => {
                assert!(
                    matches!(f.kind, ErrorKind::Timeout | ErrorKind::Overloaded),
                    "{f:?}"
                );
                late += 1;
            }
        }
    }
    let calls = backend.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), ok, "one call per answered record");
    let most = (0..calls.len())
        .map(|i| {
            calls[i..]
                .iter()
                .take_while(|t| **t < calls[i] + Duration::from_secs(60))
                .count()
        })
        .max()
        .unwrap();
    eprintln!("{ok} answered, {late} not; at most {most} calls in a minute");
    assert!(most <= 605, "{most} calls within one minute");
    assert!(
        ok >= 3 * 600 - 10,
        "the limit is used: {ok} calls in 3 minutes"
    );
}
