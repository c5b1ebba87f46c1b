//! A real OpenAI-compatible LLM server for the LLM pipeline tests: llama.cpp's
//! `llama-server` with a tiny seeded random-weight model, both built by
//! `scripts/llama.sh` (idempotent; `scripts/test.sh` runs it first).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::{free_port, Killed};

/// A running llama-server.
pub struct Llama {
    /// Its API root (`http://127.0.0.1:PORT/v1`).
    pub base_url: String,
    /// Its root, for `/health` and `/slots`.
    pub root: String,
    _child: Killed,
}

/// Where `scripts/llama.sh` put the server and the model.
fn dir() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/llama.sh");
    let out = Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()
        .expect("bash runs scripts/llama.sh");
    assert!(out.status.success(), "scripts/llama.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

impl Llama {
    /// Starts a server with `slots` parallel slots, once it answers `/health`.
    pub async fn start(slots: u32) -> Llama {
        Llama::start_with(slots, 256).await
    }

    /// Starts a server with `slots` slots whose answers stop at `n_predict` tokens.
    pub async fn start_with(slots: u32, n_predict: u32) -> Llama {
        let dir = dir();
        let port = free_port();
        let child = Killed(
            Command::new(dir.join("bin/llama-server"))
                .args(["-m", dir.join("tiny.gguf").to_str().unwrap()])
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["-np", &slots.to_string(), "-c", &(8192 * slots).to_string()])
                .args(["-t", "2", "--alias", "tiny", "--no-webui", "--slots"])
                // This server reads `max_tokens`, not `max_completion_tokens`: its
                // own cap keeps the random model's free text short.
                .args(["-n", &n_predict.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("llama-server starts"),
        );
        let root = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = reqwest::Client::new();
        loop {
            let ok = client
                .get(format!("{root}/health"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "llama-server did not get ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Llama {
            base_url: format!("{root}/v1"),
            root,
            _child: child,
        }
    }
}
