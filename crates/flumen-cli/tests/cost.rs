//! `flumen run` with its result cache in a real Redis that is killed mid-run and
//! restarted: no record is lost or fails (lookups and writes fail or are skipped, the
//! records go to the model), and the cache works again once Redis is back.
// The test waits on a child process with real time.
#![allow(clippy::disallowed_methods)]

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use flumen_cache::server::RedisServer;
use serde_json::Value;

mod common;

/// The number in `"… N …"` after `label`, from the run's summary.
fn count(summary: &str, label: &str) -> u64 {
    let at = summary
        .find(label)
        .unwrap_or_else(|| panic!("{label} not in {summary}"));
    summary[..at]
        .split(|c: char| !c.is_ascii_digit())
        .rfind(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no number before {label} in {summary}"))
}

#[test]
fn redis_killed_mid_run_loses_nothing_and_the_cache_comes_back_with_it() {
    let mut redis = RedisServer::start(common::free_port()).unwrap();
    let dir = std::env::temp_dir().join(format!("flumen-cache-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("redis.toml");
    // One record at a time (capacity 1), so that no record shares an identical one's
    // call: each is a hit or a miss of the store.
    std::fs::write(
        &config,
        format!(
            "[backend]\nkind = \"sim\"\na_ms = 0.5\nb_ms = 0.01\n\n\
             [operator]\ncapacity = 1\n\n[mapping]\ninput = \"text\"\n\n\
             [cache]\nenabled = true\nstore = \"redis\"\nurl = \"{}\"\ntimeout_ms = 200\n",
            redis.url()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flumen starts");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut outputs = Vec::new();
    // Three phases over 100 texts: 1,000 records with Redis up, 1,000 with it killed,
    // 2,000 after it restarted (empty).
    let ends = [1_000, 2_000, 4_000];
    for phase in 0..3 {
        let mut chunk = String::new();
        let start = if phase == 0 { 0 } else { ends[phase - 1] };
        for i in start..ends[phase] {
            chunk.push_str(&format!(
                "{{\"id\": {i}, \"text\": \"text {}\"}}\n",
                i % 100
            ));
        }
        stdin.write_all(chunk.as_bytes()).unwrap();
        stdin.flush().unwrap();
        while outputs.len() < ends[phase] {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .expect("the run answers each phase within a minute");
            outputs.push(serde_json::from_str::<Value>(&line).unwrap());
        }
        match phase {
            0 => redis.kill(),
            1 => redis.restart().unwrap(),
            _ => {}
        }
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let summary = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{summary}");

    let mut ids = HashSet::new();
    for o in &outputs {
        let id = o["id"].as_u64().unwrap();
        assert!(ids.insert(id), "record {id} came out twice");
        assert_eq!(o["prediction"], format!("text {}", id % 100), "record {id}");
    }
    assert_eq!(ids.len(), 4_000);
    assert!(summary.contains("4000 ok, failed: none"), "{summary}");

    let (hits, misses, errors, skipped) = (
        count(&summary, " hits"),
        count(&summary, " to the backend"),
        count(&summary, " store errors"),
        count(&summary, " lookups and writes skipped"),
    );
    // Up: 100 misses, 900 hits. Down: every lookup fails or is skipped (the store
    // rests a second after each failure), every record goes to the model. Back
    // (empty): from the first lookup after its rest, the cache fills and hits again —
    // the first phase alone cannot make more than 900 hits.
    assert!(misses >= 1_100, "{summary}");
    assert!(errors >= 1, "{summary}");
    assert!(
        errors + skipped >= 1_000,
        "every lookup while Redis was down fails: {summary}"
    );
    assert!(
        hits >= 900 + 500,
        "the cache works again after Redis restarts: {summary}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
