//! The Redis store against a real redis-server: answers round-trip and expire; a
//! server that is killed makes operations fail within the timeout (never hang), and
//! the store works again once the server is back, without being rebuilt.

use std::time::Duration;

use flumen_cache::server::RedisServer;
use flumen_cache::RedisStore;
use flumen_core::Store;

#[tokio::test]
async fn round_trips_fails_fast_while_down_and_comes_back() {
    let port = flumen_kserve::server::free_port().unwrap();
    let mut redis = RedisServer::start(port).unwrap();
    let timeout = Duration::from_millis(500);
    let store = RedisStore::new(&redis.url(), Some(Duration::from_millis(300)), timeout).unwrap();

    store.put(&[1; 32], b"answer").await.unwrap();
    assert_eq!(
        store.get(&[1; 32]).await.unwrap().as_deref(),
        Some(&b"answer"[..])
    );
    assert_eq!(store.get(&[2; 32]).await.unwrap(), None);
    // PX 300: gone after it (Redis's own clock, so a real wait, bounded).
    let mut expired = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if store.get(&[1; 32]).await.unwrap().is_none() {
            expired = true;
            break;
        }
    }
    assert!(expired, "the entry outlived its TTL by 1.7 s");

    redis.kill();
    for _ in 0..3 {
        let got = tokio::time::timeout(timeout * 4, store.get(&[1; 32])).await;
        assert!(
            got.is_ok(),
            "a lookup against a dead Redis hung past 4× the timeout"
        );
        assert!(got.unwrap().is_err(), "a dead Redis answered");
        assert!(store.put(&[3; 32], b"x").await.is_err());
    }

    redis.restart().unwrap();
    let mut back = false;
    for _ in 0..100 {
        if store.put(&[4; 32], b"again").await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        back,
        "the store did not reconnect within 5 s of Redis restarting"
    );
    assert_eq!(
        store.get(&[4; 32]).await.unwrap().as_deref(),
        Some(&b"again"[..])
    );
}
