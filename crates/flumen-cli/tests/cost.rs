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
        count(&summary, " misses"),
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

/// What each record cost, in its output (`--usage-field`), and a token budget that
/// runs out mid-run: the records after it fail with `budget_exhausted`, none is
/// lost, repeats are answered from the cache at no cost, and the summary adds up.
#[test]
fn usage_per_record_and_a_token_budget_through_the_embedded_model() {
    let dir = std::env::temp_dir().join(format!("flumen-usage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("budget.toml");
    // Ordered, so that the records before the budget ran out are answered and those
    // after are not, in input order.
    std::fs::write(
        &config,
        "[backend]\nkind = \"embedded\"\n\n[operator]\norder = \"ordered\"\ncapacity = 8\n\n\
         [mapping]\ninput = \"text\"\n\n\
         [prices]\ninput_per_million = 0.02\n\n\
         [budget]\ntokens = 600\nname = \"test-tokens\"\n",
    )
    .unwrap();
    // 300 records over 150 texts: each text twice, ten records apart.
    let mut input = String::new();
    for i in 0..300 {
        let t = (i / 20) * 10 + i % 10;
        input.push_str(&format!(
            "{{\"id\": {i}, \"text\": \"review number {t} of a product\"}}\n"
        ));
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--usage-field",
            "usage",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flumen starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let summary = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 300, "{summary}");
    let (mut ok, mut cached, mut spent, mut cost) = (0, 0, 0u64, 0.0);
    let mut exhausted = 0;
    for (i, l) in lines.iter().enumerate() {
        // A dead letter carries its record whole.
        let id = l.get("error").map_or(&l["id"], |_| &l["record"]["id"]);
        assert_eq!(id, i as u64, "ordered: {l}");
        if let Some(e) = l.get("error") {
            assert_eq!(e["kind"], "budget_exhausted", "{l}");
            assert!(
                e["message"]
                    .as_str()
                    .unwrap()
                    .contains("budget `test-tokens`"),
                "{l}"
            );
            exhausted += 1;
            continue;
        }
        ok += 1;
        assert_eq!(l["prediction"].as_array().unwrap().len(), 384);
        let u = &l["usage"];
        let tokens = u["input_tokens"].as_u64().unwrap();
        assert!(tokens >= 6, "{u}");
        assert_eq!(u["output_tokens"], 0);
        if u["cached"] == true {
            cached += 1;
            assert_eq!(u["cost"], 0.0, "{u}");
        } else {
            spent += tokens;
            cost += u["cost"].as_f64().unwrap();
        }
    }
    eprintln!("{summary}");
    // The budget holds (embeddings cost exactly their input: no overshoot), and is
    // used up to less than one record's tokens.
    assert!(spent <= 600 && spent + 20 > 600, "spent {spent}");
    assert!(exhausted > 0 && ok + exhausted == 300);
    assert!(cached > 0, "repeats come from the cache");
    assert!(
        (cost - spent as f64 * 0.02 / 1e6).abs() < 1e-9,
        "cost {cost}"
    );
    assert!(
        summary.contains(&format!("{spent} tokens sent")),
        "{summary}"
    );
    assert!(
        summary.contains("budget `test-tokens`: 600 tokens of 600 tokens spent")
            || summary.contains(&format!(
                "budget `test-tokens`: {spent} tokens of 600 tokens spent"
            )),
        "{summary}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
