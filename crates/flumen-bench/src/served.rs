//! `flumen serve` in its own process, as the benchmarks that measure it from outside
//! run it: this checkout's release binary, killed when dropped.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

/// The `flumen` binary of this checkout, built (release) if missing or stale.
///
/// # Panics
/// When the build fails.
pub fn flumen_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bin = root.join("target/release/flumen");
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "flumen-cli",
            "--bin",
            "flumen",
        ])
        .current_dir(&root)
        .status()
        .expect("cargo runs");
    assert!(status.success() && bin.exists(), "building flumen failed");
    bin
}

/// `flumen serve` in its own process, killed when dropped.
pub struct Served(pub Child);

impl Served {
    /// `flumen serve CONFIG` (its stderr discarded), once it listens on `port`.
    ///
    /// # Panics
    /// When it does not start, or does not listen within 30 s.
    pub async fn start(config: &Path, port: u16) -> Served {
        let served = Served(
            Command::new(flumen_binary())
                .arg("serve")
                .arg(config)
                .stderr(Stdio::null())
                .spawn()
                .expect("flumen serve starts"),
        );
        let up = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < up, "flumen serve did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        served
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
