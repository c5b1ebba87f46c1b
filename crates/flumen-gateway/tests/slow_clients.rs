//! The gateway in process, over real sockets: clients that never finish their
//! headers or their bodies are let go at the configured timeouts while everyone else
//! is served, and a connection over `max_connections` gets a clear 503.
//!
//! Real time, since these are real sockets; every wait is bounded, and the only time
//! bounds asserted are relative to the configured timeouts: a stalled connection is
//! not closed before its timeout, and a normal request is answered in far less than
//! one (it never waits behind the stalled ones).

use std::time::Duration;

use flumen_gateway::serve::{start, Running, ServeConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const TIMEOUT_MS: u64 = 2_000;

async fn gateway(server: &str) -> Running {
    let config = ServeConfig::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n\n\
         [[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 1.0\n"
    ))
    .unwrap();
    start(&config).await.unwrap()
}

/// One chat request over a new connection: its status and how long it took.
async fn normal(http: &reqwest::Client, base: &str) -> (u16, Duration) {
    let started = Instant::now();
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "echo", "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), started.elapsed())
}

/// Reads until the gateway closes the connection (bounded): what it sent, and when
/// it closed, from `since`.
async fn until_closed(mut s: TcpStream, since: Instant) -> (String, Duration) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let bound = Duration::from_millis(10 * TIMEOUT_MS);
    loop {
        match tokio::time::timeout(bound, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("a stalled connection was still open after {bound:?}"),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), since.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_headers_and_bodies_are_let_go_while_others_are_served() {
    let running = gateway(&format!(
        "header_timeout_ms = {TIMEOUT_MS}\nbody_timeout_ms = {TIMEOUT_MS}\nmax_connections = 1000"
    ))
    .await;
    let addr = running.addr;
    let base = format!("http://{addr}");
    // A new connection per request, as the stalled ones compete for connections.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for _ in 0..5 {
        assert_eq!(normal(&http, &base).await.0, 200);
    }

    let opened = Instant::now();
    // A kept-alive connection that goes idle after its answer.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut headers = Vec::new();
    let mut bodies = Vec::new();
    for i in 0..400 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            // Headers that never end.
            s.write_all(
                b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n",
            )
            .await
            .unwrap();
            headers.push(s);
        } else {
            // A body that never completes: 10 of 100 bytes.
            s.write_all(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":")
                .await
                .unwrap();
            bodies.push(s);
        }
    }

    // Served throughout, never behind the stalled connections.
    let mut during = Vec::new();
    while opened.elapsed() < Duration::from_millis(TIMEOUT_MS / 2) {
        let (status, took) = normal(&http, &base).await;
        assert_eq!(status, 200);
        during.push(took);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let slowest = during.iter().max().copied().unwrap();
    assert!(
        slowest < Duration::from_millis(TIMEOUT_MS / 2),
        "a normal request took {slowest:?} while 400 connections stalled"
    );

    let header_waits =
        futures::future::join_all(headers.into_iter().map(|s| until_closed(s, opened)));
    let body_waits = futures::future::join_all(bodies.into_iter().map(|s| until_closed(s, opened)));
    let ((idle_sent, idle_after), (header_closes, body_closes)) =
        tokio::join!(until_closed(idle, opened), async {
            tokio::join!(header_waits, body_waits)
        });
    assert!(idle_sent.starts_with("HTTP/1.1 200"), "{idle_sent}");
    assert!(
        idle_after >= Duration::from_millis(TIMEOUT_MS),
        "an idle kept-alive connection closed after {idle_after:?}"
    );
    for (sent, after) in &header_closes {
        // Closed at the header timeout, not before; nothing to answer yet.
        assert!(
            after >= &Duration::from_millis(TIMEOUT_MS),
            "closed after {after:?}"
        );
        assert!(!sent.contains("200 OK"), "{sent}");
    }
    for (sent, after) in &body_closes {
        assert!(
            after >= &Duration::from_millis(TIMEOUT_MS),
            "closed after {after:?}"
        );
        assert!(sent.starts_with("HTTP/1.1 408"), "{sent}");
        let body: Value = serde_json::from_str(sent.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("server.body_timeout_ms"), "{message}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    assert_eq!(normal(&http, &base).await.0, 200, "still serving after");
    running.stopper().stop();
    running.finished().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_limit_is_answered_503_not_left_waiting() {
    let running = gateway("max_connections = 20").await;
    let addr = running.addr;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    // The 21st: a whole request, answered at once with a refusal that says why.
    let mut extra = TcpStream::connect(addr).await.unwrap();
    extra
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = until_closed(extra, Instant::now()).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_lowercase().contains("retry-after: 1"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "too_many_connections");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("server.max_connections"),
        "{body}"
    );
    // The held connections still work, and once they go, new ones are served.
    let mut one = held.pop().unwrap();
    one.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = until_closed(one, Instant::now()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(held);
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");
    let mut tries = 0;
    loop {
        // The gateway notices the closed connections as it reads them: bounded retries.
        let r = http.get(format!("{base}/v1/models")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        tries += 1;
        assert!(
            tries < 50,
            "still refused after the held connections closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stopper().stop();
}

/// The gRPC listener: the same cap (closed at once past it) and the same time for a
/// connection's first bytes.
#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connections_are_capped_and_silent_ones_let_go() {
    let running = gateway(&format!(
        "grpc_listen = \"127.0.0.1:0\"\nmax_connections = 20\nheader_timeout_ms = {TIMEOUT_MS}"
    ))
    .await;
    let addr = running.grpc_addr.unwrap();
    let opened = Instant::now();
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    // Let the listener take the twenty before the twenty-first comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let extra = TcpStream::connect(addr).await.unwrap();
    let (_, after) = until_closed(extra, Instant::now()).await;
    assert!(
        after < Duration::from_millis(TIMEOUT_MS),
        "the connection over the limit stayed open {after:?}"
    );
    for s in held {
        // Silent: closed at the header timeout, not before.
        let (_, after) = until_closed(s, opened).await;
        assert!(
            after >= Duration::from_millis(TIMEOUT_MS),
            "closed after {after:?}"
        );
    }
    running.stopper().stop();
}
