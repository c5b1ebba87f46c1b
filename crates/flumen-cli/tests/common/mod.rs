//! Helpers shared by the CLI's tests: free ports, child processes killed on drop,
//! and for the connector tests (Kafka, NATS) workers stopped by SIGTERM or SIGKILL
//! and the records they carry, and a loopback proxy that simulates a broker outage.
#![allow(dead_code, clippy::disallowed_methods)] // each test file uses a part; real time

pub mod llama;
pub mod proxy;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

/// A child process killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A run refused for bad options: exit status 2, and every name in `names` (a flag
/// or a config path) in its stderr.
pub fn names_every_problem(out: &std::process::Output, names: &[&str]) {
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for name in names {
        assert!(err.contains(name), "{name} not named in: {err}");
    }
}

/// A loopback port for a child to listen on (see [`flumen_kserve::server::free_port`]).
pub fn free_port() -> u16 {
    flumen_kserve::server::free_port().expect("a free loopback port")
}

/// A child's output, once it has exited successfully (else its stderr is shown).
pub fn succeeded(out: std::io::Result<std::process::Output>) -> std::process::Output {
    let out = out.expect("the command starts");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `flumen serve CONFIG`, once it listens on `port` (waiting at most 60 s).
pub fn serve(config: &Path, port: u16) -> Killed {
    let gateway = Killed(
        Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args(["serve", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .expect("flumen serve starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "flumen serve did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    gateway
}

/// `flumen run CONFIG --quiet`, its stderr shown.
pub fn worker(config: &Path) -> Killed {
    Killed(
        Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args(["run", config.to_str().unwrap(), "--quiet"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("flumen starts"),
    )
}

/// SIGTERM, then waits: a graceful stop drains, writes, commits and exits.
pub fn stop(mut w: Killed) -> ExitStatus {
    let pid = w.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = w.0.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "flumen did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Records per test.
pub const N: usize = 10_000;

/// `{"id": i, "text": "record i"}` for i in 0..N.
pub fn records() -> Vec<Vec<u8>> {
    (0..N)
        .map(|i| format!("{{\"id\": {i}, \"text\": \"record {i}\"}}").into_bytes())
        .collect()
}

/// Four records that must be dead-lettered, each for its own reason.
pub fn bad_records() -> Vec<Vec<u8>> {
    vec![
        b"{not json".to_vec(),
        b"{\"id\": \"no-text\"}".to_vec(),
        vec![b'{', 0xff, 0xfe, b'}'],
        format!("{{\"text\": \"{}\"}}", "x".repeat(5_000)).into_bytes(),
    ]
}

/// The reasons `bad_records` must be dead-lettered with (max_record_bytes = 4096).
pub const BAD_REASONS: [&str; 4] = [
    "invalid JSON",
    "field `text` is missing",
    "invalid UTF-8",
    "over the limit of 4096",
];

pub fn ids(values: &[Value]) -> Vec<u64> {
    values.iter().filter_map(|v| v["id"].as_u64()).collect()
}
