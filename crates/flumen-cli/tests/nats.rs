//! `flumen run` against a real NATS JetStream server (Debian's nats-server, installed
//! by `scripts/system.sh`): 10,000 records end to end with bad ones dead-lettered, a
//! worker killed with SIGKILL and restarted, two workers on one durable consumer, a
//! server outage waited out, and a stopped worker handing its messages back.
#![cfg(feature = "nats")]
// Tests wait on child processes and a server with real time.
#![allow(clippy::disallowed_methods)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use flumen_connect::async_nats::{self, jetstream};
use futures::StreamExt;
use serde_json::Value;

mod common;
use common::proxy::Proxy;
use common::{bad_records, free_port, ids, records, stop, worker, Killed, BAD_REASONS, N};

struct Server {
    _child: Killed,
    url: String,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh JetStream server, storing in a scratch directory. The server picks its own
/// port and writes it to a ports file once it accepts clients: a port picked here and
/// handed over could be taken by another socket in between.
fn server(name: &str) -> Server {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let ok = Command::new("bash")
        .arg(format!("{root}/scripts/system.sh"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "scripts/system.sh installs nats-server");
    let dir = std::env::temp_dir().join(format!("flumen-nats-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ports = dir.join("ports");
    std::fs::create_dir_all(&ports).unwrap();
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
        .arg(dir.join("store"))
        .arg("--ports_file_dir")
        .arg(&ports)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts");
    let file = ports.join(format!("nats-server_{}.ports", child.id()));
    let mut child = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = loop {
        let url = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v["nats"][0].as_str().map(str::to_owned));
        if let Some(url) = url {
            break url;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("nats-server exited before it listened: {status}");
        }
        assert!(Instant::now() < deadline, "nats-server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    };
    Server {
        _child: child,
        url,
        dir,
    }
}

/// A JetStream context on the server, retrying the first connection for a while: on a
/// loaded machine a server that has just started may still refuse or reset it.
async fn js(url: &str) -> jetstream::Context {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match async_nats::connect(url).await {
            Ok(client) => return jetstream::new(client),
            Err(e) if Instant::now() < deadline => {
                eprintln!("nats: connecting to {url}: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot connect to {url}: {e}"),
        }
    }
}

async fn streams(js: &jetstream::Context, names: &[(&str, &str)]) {
    for (name, subject) in names {
        js.create_stream(jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![subject.to_string()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

async fn publish(js: &jetstream::Context, subject: &str, payloads: Vec<Vec<u8>>) {
    for chunk in payloads.chunks(500) {
        let mut acks = Vec::new();
        for p in chunk {
            acks.push(
                js.publish(subject.to_string(), p.clone().into())
                    .await
                    .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap();
        }
    }
}

/// The pipeline's durable consumer on `IN`, as the server sees it.
async fn durable(js: &jetstream::Context) -> jetstream::consumer::Info {
    js.get_stream("IN")
        .await
        .unwrap()
        .consumer_info("flumen")
        .await
        .unwrap()
}

/// Messages in `stream` now.
async fn count(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// Waits until `stream` holds at least `n` messages (or `limit` passes), then reads
/// them all.
async fn read(js: &jetstream::Context, stream: &str, n: u64, limit: Duration) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    while count(js, stream).await < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total = count(js, stream).await;
    let s = js.get_stream(stream).await.unwrap();
    let consumer: jetstream::consumer::PullConsumer = s
        .create_consumer(jetstream::consumer::pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < total {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("messages keep coming")
            .unwrap()
            .unwrap();
        out.push(serde_json::from_slice(&m.payload).unwrap());
    }
    out
}

fn pipeline(name: &str, url: &str, out: &str, sim: &str, extra: &str) -> PathBuf {
    pipeline_with_ack_wait(name, url, out, sim, extra, 3)
}

/// [`pipeline`] with the source's `ack_wait_s` given.
fn pipeline_with_ack_wait(
    name: &str,
    url: &str,
    out: &str,
    sim: &str,
    extra: &str,
    ack_wait_s: u64,
) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flumen-nats-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "[source]\nkind = \"nats\"\nurl = \"{url}\"\nstream = \"IN\"\nconsumer = \"flumen\"\nack_wait_s = {ack_wait_s}\n\n\
             [sink]\nkind = \"nats\"\nurl = \"{url}\"\nsubject = \"{out}\"\n\n\
             [dead_letter]\nkind = \"nats\"\nurl = \"{url}\"\nsubject = \"dead\"\n\n\
             [mapping]\ninput = \"text\"\nmax_record_bytes = 4096\n\n\
             [backend]\nkind = \"sim\"\n{sim}\n\n[operator]\n{extra}\n"
        ),
    )
    .unwrap();
    path
}

const FAST: &str = "a_ms = 2.0\nb_ms = 0.02\nslots = 2\nmax_batch = 64";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_through_jetstream_and_bad_ones_to_the_dead_letter_subject() {
    let s = server("e2e");
    let js = js(&s.url).await;
    streams(&js, &[("IN", "in"), ("OUT", "out"), ("DEAD", "dead")]).await;
    let mut payloads = records();
    payloads.extend(bad_records());
    publish(&js, "in", payloads).await;

    let w = worker(&pipeline("e2e.toml", &s.url, "out", FAST, "capacity = 500"));
    let out = read(&js, "OUT", N as u64, Duration::from_secs(120)).await;
    let dead = read(&js, "DEAD", 4, Duration::from_secs(30)).await;
    assert!(stop(w).success(), "graceful stop");
    let got = ids(&out);
    assert_eq!(got.len(), N);
    assert_eq!(
        got.iter().collect::<HashSet<_>>().len(),
        N,
        "each record once"
    );
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| d["error"]["message"].to_string())
        .collect();
    for want in BAD_REASONS {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "{want} in {reasons:#?}"
        );
    }
    // Everything was acknowledged: nothing left pending on the durable consumer.
    let info = durable(&js).await;
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_and_restarted_loses_nothing() {
    let s = server("crash");
    let js = js(&s.url).await;
    streams(&js, &[("IN", "in"), ("OUT", "out"), ("DEAD", "dead")]).await;
    publish(&js, "in", records()).await;
    let capacity = 200;
    let cfg = pipeline(
        "crash.toml",
        &s.url,
        "out",
        "a_ms = 20.0\nb_ms = 0.5\nslots = 1\nmax_batch = 32",
        &format!("capacity = {capacity}"),
    );
    let mut first = worker(&cfg);
    let before = read(&js, "OUT", 3_000, Duration::from_secs(120))
        .await
        .len();
    assert!(before >= 3_000);
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let second = worker(&cfg);
    // Unacknowledged messages come back after ack_wait (3 s).
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut all;
    loop {
        all = read(&js, "OUT", 0, Duration::ZERO).await;
        if ids(&all).into_iter().collect::<HashSet<_>>().len() >= N || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(stop(second).success());
    let unique = ids(&all).into_iter().collect::<HashSet<_>>().len();
    assert_eq!(unique, N, "every input has an output after the restart");
    let duplicates = all.len() - N;
    eprintln!(
        "nats crash test: {before} outputs before SIGKILL, {} in all, {duplicates} duplicates",
        all.len()
    );
    // At most what was unacknowledged at the kill: max_ack_pending = capacity.
    assert!(
        duplicates <= capacity,
        "{duplicates} duplicates exceed max_ack_pending {capacity}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_one_durable_consumer_share_the_stream() {
    let s = server("share");
    let js = js(&s.url).await;
    streams(
        &js,
        &[
            ("IN", "in"),
            ("OUTA", "out-a"),
            ("OUTB", "out-b"),
            ("DEAD", "dead"),
        ],
    )
    .await;
    let a = pipeline("a.toml", &s.url, "out-a", FAST, "capacity = 300");
    let b = pipeline("b.toml", &s.url, "out-b", FAST, "capacity = 300");
    let (wa, wb) = (worker(&a), worker(&b));
    publish(&js, "in", records()).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&js, "OUTA").await + count(&js, "OUTB").await < N as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(stop(wa).success() && stop(wb).success());
    let (oa, ob) = (
        ids(&read(&js, "OUTA", 0, Duration::ZERO).await),
        ids(&read(&js, "OUTB", 0, Duration::ZERO).await),
    );
    let (sa, sb): (HashSet<u64>, HashSet<u64>) =
        (oa.iter().copied().collect(), ob.iter().copied().collect());
    eprintln!(
        "nats scale-out: worker a {} records, worker b {}",
        sa.len(),
        sb.len()
    );
    assert!(!sa.is_empty() && !sb.is_empty(), "both workers got a share");
    assert!(sa.is_disjoint(&sb), "no record processed by both");
    assert_eq!(sa.len() + sb.len(), N);
    assert_eq!(oa.len() + ob.len(), N, "nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_acknowledges_nothing_and_a_later_run_delivers_everything() {
    let s = server("sinkfail");
    let js = js(&s.url).await;
    streams(&js, &[("IN", "in"), ("OUT", "out"), ("DEAD", "dead")]).await;
    publish(&js, "in", records()).await;
    // No stream captures `nowhere`: every publish is refused. The sink waits for the
    // stream as for an outage, here for at most 3 s, then gives up naming the subject.
    let bad = pipeline(
        "bad-sink.toml",
        &s.url,
        "nowhere",
        FAST,
        "capacity = 500\n\n[delivery]\nmax_outage_s = 3",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["run", bad.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot write the output"), "{err}");
    assert!(
        err.contains("subject nowhere") && err.contains("max_outage_s = 3"),
        "{err}"
    );
    let info = durable(&js).await;
    assert_eq!(info.ack_floor.stream_sequence, 0, "nothing acknowledged");

    let good = worker(&pipeline(
        "good-sink.toml",
        &s.url,
        "out",
        FAST,
        "capacity = 500",
    ));
    let all = read(&js, "OUT", N as u64, Duration::from_secs(120)).await;
    assert!(stop(good).success());
    let got = ids(&all);
    assert_eq!(
        got.iter().collect::<HashSet<_>>().len(),
        N,
        "every record delivered"
    );
    assert_eq!(got.len(), N, "and once");
}

/// Reads `OUT` until its outputs carry every id in 0..N (or `limit` passes); returns
/// them all, duplicates included.
async fn every_id(js: &jetstream::Context, limit: Duration) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    loop {
        if count(js, "OUT").await >= N as u64 {
            let all = read(js, "OUT", 0, Duration::ZERO).await;
            if ids(&all).into_iter().collect::<HashSet<_>>().len() >= N {
                return all;
            }
        }
        if Instant::now() > deadline {
            return read(js, "OUT", 0, Duration::ZERO).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until `stream` holds at least `n` messages, failing after `limit`.
async fn at_least(js: &jetstream::Context, stream: &str, n: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while count(js, stream).await < n {
        assert!(
            Instant::now() < deadline,
            "{stream} did not reach {n} messages"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A server unreachable for 10 s mid-stream (connections cut, new ones refused) is
/// waited out: the worker keeps running, reconnects when the server is back, and
/// every record gets its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_of_ten_seconds_is_waited_out_and_nothing_is_lost() {
    let s = server("outage");
    let js = js(&s.url).await;
    streams(&js, &[("IN", "in"), ("OUT", "out"), ("DEAD", "dead")]).await;
    publish(&js, "in", records()).await;
    let server_port: u16 = s
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a port in {}", s.url));
    let proxy = Proxy::start(
        free_port(),
        std::net::SocketAddr::from(([127, 0, 0, 1], server_port)),
    )
    .await;
    let url = format!("nats://127.0.0.1:{}", proxy.port());
    let mut w = worker(&pipeline(
        "outage.toml",
        &url,
        "out",
        "a_ms = 5.0\nb_ms = 0.2\nslots = 1\nmax_batch = 32",
        "capacity = 200",
    ));
    // Outputs read through this test's own connection, straight to the server.
    at_least(&js, "OUT", 2_000, Duration::from_secs(120)).await;
    let before = count(&js, "OUT").await;

    proxy.pause().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        w.0.try_wait().unwrap().is_none(),
        "the worker exited during a 10 s outage"
    );
    proxy.resume().await;

    let all = every_id(&js, Duration::from_secs(180)).await;
    assert!(stop(w).success(), "graceful stop after the outage");
    let unique = ids(&all).into_iter().collect::<HashSet<_>>().len();
    eprintln!(
        "nats outage test: {before} outputs before the outage, {} in all, {} duplicates",
        all.len(),
        all.len() - unique
    );
    assert_eq!(unique, N, "{} missing after the outage", N - unique);
}

/// A worker stopped with SIGTERM hands back the messages it pulled but did not
/// finish, so the next worker on the durable consumer starts on them at once rather
/// than waiting out ack_wait (30 s here): without that, the pulled messages fill
/// max_ack_pending and the server sends the new worker nothing until they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_hands_back_its_messages_and_the_next_starts_at_once() {
    let s = server("handback");
    let js = js(&s.url).await;
    streams(&js, &[("IN", "in"), ("OUT", "out"), ("DEAD", "dead")]).await;
    publish(&js, "in", records()).await;
    let ack_wait_s = 30;
    // Slow, so plenty of work remains when the first worker stops.
    let cfg = pipeline_with_ack_wait(
        "handback.toml",
        &s.url,
        "out",
        "a_ms = 20.0\nb_ms = 0.5\nslots = 1\nmax_batch = 16",
        "capacity = 50",
        ack_wait_s,
    );
    let a = worker(&cfg);
    at_least(&js, "OUT", 1_000, Duration::from_secs(120)).await;
    assert!(stop(a).success(), "graceful stop of the first worker");
    let after_a = count(&js, "OUT").await;

    let t = Instant::now();
    let b = worker(&cfg);
    // Bounded past ack_wait, so a worker that waits it out is measured, not hung on.
    let limit = Duration::from_secs(ack_wait_s + 30);
    while count(&js, "OUT").await <= after_a {
        assert!(
            t.elapsed() < limit,
            "the second worker wrote nothing in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = t.elapsed();
    eprintln!(
        "nats hand-back test: {after_a} outputs from the first worker, the second's first \
         output {:.2} s after it started",
        first.as_secs_f64()
    );
    assert!(
        first < Duration::from_secs(ack_wait_s / 2),
        "the second worker's first output took {first:?}, ack_wait is {ack_wait_s} s"
    );

    let all = every_id(&js, Duration::from_secs(180)).await;
    assert!(stop(b).success(), "graceful stop of the second worker");
    let unique = ids(&all).into_iter().collect::<HashSet<_>>().len();
    assert_eq!(unique, N, "{} missing after the hand-back", N - unique);
}
