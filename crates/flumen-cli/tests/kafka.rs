//! `flumen run` against a real Kafka-protocol broker (tansu, installed from PyPI by
//! `scripts/kafka.sh`): 10,000 records end to end, per-partition order, bad records
//! to the dead-letter topic, a worker killed with SIGKILL and restarted, and two
//! workers in one consumer group.
#![cfg(feature = "kafka")]
// Tests wait on child processes and a broker with real time.
#![allow(clippy::disallowed_methods)]

use std::collections::{HashMap, HashSet};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use flumen_connect::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use flumen_connect::rdkafka::client::DefaultClientContext;
use flumen_connect::rdkafka::config::ClientConfig;
use flumen_connect::rdkafka::consumer::{BaseConsumer, Consumer};
use flumen_connect::rdkafka::message::Message;
use flumen_connect::rdkafka::producer::{FutureProducer, FutureRecord};
use flumen_connect::rdkafka::util::Timeout;
use serde_json::Value;

mod common;
use common::{bad_records, free_port, ids, records, stop, worker, Killed, BAD_REASONS, N};

fn tansu() -> PathBuf {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/kafka.sh"))
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A fresh in-memory broker on a free port.
fn broker() -> (Killed, String) {
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(tansu())
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tansu starts");
    let guard = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "tansu did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    (guard, format!("127.0.0.1:{port}"))
}

async fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    for r in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
}

/// Produces `payloads` keyed by index; returns (partition, offset) of each.
async fn produce(brokers: &str, topic: &str, payloads: &[Vec<u8>]) -> Vec<(i32, i64)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut out = Vec::with_capacity(payloads.len());
    for chunk in payloads.chunks(1_000) {
        let base = out.len();
        let sends = chunk.iter().enumerate().map(|(i, p)| {
            let key = (base + i).to_string();
            let producer = &producer;
            async move {
                producer
                    .send(
                        FutureRecord::to(topic).payload(p).key(&key),
                        Timeout::After(Duration::from_secs(30)),
                    )
                    .await
            }
        });
        for r in futures::future::join_all(sends).await {
            let d = r.map_err(|(e, _)| e).unwrap();
            out.push((d.partition, d.offset));
        }
    }
    out
}

/// Everything on `topic` so far (a fresh consumer without a group, from the start),
/// read until `stop` says enough or `limit` passes.
fn read_all(
    brokers: &str,
    topic: &str,
    partitions: i32,
    limit: Duration,
    stop: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{topic}-{}", free_port()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut list = flumen_connect::rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition_offset(topic, p, flumen_connect::rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&list).unwrap();
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    while Instant::now() < deadline && !stop(&out) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let mut v: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                // The record's Kafka key, for the tests that check keys are kept.
                if let Some(key) = m.key() {
                    v["_key"] = String::from_utf8_lossy(key).into();
                }
                out.push(v);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out
}

fn pipeline(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flumen-kafka-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A worker whose stderr lines are collected.
fn logged_worker(config: &std::path::Path) -> (Killed, Log) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["run", config.to_str().unwrap(), "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flumen starts");
    let stderr = child.stderr.take().unwrap();
    let log: Log = Default::default();
    let sink = std::sync::Arc::clone(&log);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap().push(line);
        }
    });
    (Killed(child), log)
}

/// The partitions a worker last said it was assigned (empty after a revocation).
fn assigned(log: &Log) -> HashSet<i32> {
    let log = log.lock().unwrap();
    let last = log
        .iter()
        .rev()
        .find(|l| l.contains("assigned partitions") || l.contains("revoked partitions"));
    match last {
        Some(l) if l.contains("assigned") => l
            .rsplit('[')
            .next()
            .unwrap()
            .trim_end_matches(']')
            .split(',')
            .filter_map(|p| p.trim().parse().ok())
            .collect(),
        _ => HashSet::new(),
    }
}

/// A pipeline: Kafka `in` → sim backend → Kafka `out`, failures to `dead`.
fn config(brokers: &str, group: &str, out: &str, sim: &str, operator: &str) -> String {
    format!(
        "[source]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"in\"\ngroup = \"{group}\"\ncommit_interval_ms = 100\n\
         properties = {{ \"session.timeout.ms\" = \"6000\", \"heartbeat.interval.ms\" = \"500\" }}\n\n\
         [sink]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{out}\"\n\n\
         [dead_letter]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"dead\"\n\n\
         [mapping]\ninput = \"text\"\nmax_record_bytes = 4096\n\n\
         [backend]\nkind = \"sim\"\n{sim}\n\n[operator]\n{operator}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_in_partition_order_and_bad_ones_to_the_dead_letter_topic() {
    let (_broker, brokers) = broker();
    create_topics(&brokers, &[("in", 4), ("out", 1), ("dead", 1)]).await;
    let mut payloads = records();
    // Bad input among the good: malformed JSON, no `text`, invalid UTF-8, oversize.
    payloads.extend(bad_records());
    let placed = produce(&brokers, "in", &payloads).await;

    let cfg = pipeline(
        "order.toml",
        &config(
            &brokers,
            "g-order",
            "out",
            "a_ms = 2.0\nb_ms = 0.02\nslots = 2\nmax_batch = 64",
            "order = \"partition\"\ncapacity = 500",
        ),
    );
    let w = worker(&cfg);
    let out = read_all(&brokers, "out", 1, Duration::from_secs(180), |v| {
        v.len() >= N
    });
    let dead = read_all(&brokers, "dead", 1, Duration::from_secs(30), |v| {
        v.len() >= 4
    });
    let status = stop(w);
    assert!(status.success(), "graceful stop: {status}");

    let got = ids(&out);
    assert_eq!(got.len(), N, "one output per record");
    let unique: HashSet<u64> = got.iter().copied().collect();
    assert_eq!(unique.len(), N, "no duplicates in a clean run");
    // Per-partition order: within each source partition, outputs come in offset order.
    let mut last: HashMap<i32, i64> = HashMap::new();
    for id in &got {
        let (p, o) = placed[*id as usize];
        if let Some(prev) = last.insert(p, o) {
            assert!(o > prev, "partition {p}: offset {o} after {prev}");
        }
    }
    // Each output keeps its input's key (the producer keyed records by index).
    for v in &out {
        assert_eq!(v["_key"], Value::from(v["id"].to_string()), "{v}");
    }
    assert_eq!(dead.len(), 4, "{dead:#?}");
    let dead_keys: HashSet<&str> = dead.iter().filter_map(|d| d["_key"].as_str()).collect();
    let bad_keys: HashSet<String> = (N..N + 4).map(|i| i.to_string()).collect();
    assert_eq!(
        dead_keys,
        bad_keys.iter().map(String::as_str).collect(),
        "dead letters keep their keys"
    );
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| format!("{} {}", d["error"]["kind"], d["error"]["message"]))
        .collect();
    for want in BAD_REASONS {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "{want} in {reasons:#?}"
        );
    }
    assert!(dead
        .iter()
        .all(|d| d["source"].as_str().unwrap().starts_with("in/")));
}

fn unique(values: &[Value]) -> usize {
    ids(values).into_iter().collect::<HashSet<u64>>().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_and_restarted_loses_nothing() {
    let (_broker, brokers) = broker();
    create_topics(&brokers, &[("in", 4), ("out", 1), ("dead", 1)]).await;
    produce(&brokers, "in", &records()).await;
    let capacity = 200;
    let cfg = pipeline(
        "crash.toml",
        &config(
            &brokers,
            "g-crash",
            "out",
            "a_ms = 20.0\nb_ms = 0.5\nslots = 1\nmax_batch = 32",
            &format!("capacity = {capacity}"),
        ),
    );
    let mut first = worker(&cfg);
    let before = read_all(&brokers, "out", 1, Duration::from_secs(120), |v| {
        v.len() >= 3_000
    });
    assert!(before.len() >= 3_000, "the first worker made progress");
    first.0.kill().unwrap(); // SIGKILL: no drain, no final commit
    first.0.wait().unwrap();
    let written_before_kill = read_all(&brokers, "out", 1, Duration::from_secs(5), |_| false).len();

    let second = worker(&cfg);
    let all = read_all(&brokers, "out", 1, Duration::from_secs(180), |v| {
        unique(v) >= N
    });
    assert!(stop(second).success());
    assert_eq!(
        unique(&all),
        N,
        "every input has an output after the restart"
    );
    let duplicates = all.len() - N;
    eprintln!(
        "crash test: {written_before_kill} outputs before SIGKILL, {} in all, {duplicates} duplicates",
        all.len()
    );
    // Only what was in flight at the kill can be seen twice: records in the operator
    // (capacity), plus those written since the last commit (100 ms of output and one
    // ready chunk of at most 512).
    assert!(
        duplicates <= capacity + 512 + 200,
        "{duplicates} duplicates exceed the in-flight window"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_in_one_group_share_the_partitions() {
    let (_broker, brokers) = broker();
    create_topics(
        &brokers,
        &[("in", 4), ("out-a", 1), ("out-b", 1), ("dead", 1)],
    )
    .await;
    let sim = "a_ms = 2.0\nb_ms = 0.05\nslots = 2\nmax_batch = 64";
    let a = pipeline(
        "a.toml",
        &config(&brokers, "g-share", "out-a", sim, "capacity = 500"),
    );
    let b = pipeline(
        "b.toml",
        &config(&brokers, "g-share", "out-b", sim, "capacity = 500"),
    );
    let ((wa, la), (wb, lb)) = (logged_worker(&a), logged_worker(&b));

    // Wait until the workers' latest assignments split the 4 partitions between them,
    // so the split is settled before the first record exists.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (pa, pb) = (assigned(&la), assigned(&lb));
        if !pa.is_empty() && !pb.is_empty() && pa.is_disjoint(&pb) && pa.len() + pb.len() == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group never split the partitions: {pa:?} {pb:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    produce(&brokers, "in", &records()).await;
    let read = |topic: &str| read_all(&brokers, topic, 1, Duration::from_secs(5), |_| false);
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut out_a, mut out_b);
    loop {
        out_a = ids(&read("out-a"));
        out_b = ids(&read("out-b"));
        if out_a.len() + out_b.len() >= N || Instant::now() > deadline {
            break;
        }
    }
    assert!(stop(wa).success() && stop(wb).success());
    let (sa, sb): (HashSet<u64>, HashSet<u64>) = (
        out_a.iter().copied().collect(),
        out_b.iter().copied().collect(),
    );
    eprintln!(
        "scale-out: worker a {} records, worker b {}",
        sa.len(),
        sb.len()
    );
    assert!(!sa.is_empty() && !sb.is_empty(), "both workers got a share");
    assert!(sa.is_disjoint(&sb), "no record processed by both");
    assert_eq!(sa.len() + sb.len(), N, "together they cover the input");
    assert_eq!(out_a.len() + out_b.len(), N, "and nothing twice");
}
