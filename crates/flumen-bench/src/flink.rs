//! The Flink test jobs (`SqlJob`, `StreamJob` in integrations/flink/src/test), run
//! on Flink 2.3's own jars as a local cluster in one JVM: for the Flink tests and
//! `cargo bench --bench flink`. `scripts/flink.sh` fetches the jars and builds the
//! provider and the jobs.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Flink's jars, the provider's jar and the test jobs, as one classpath.
///
/// # Panics
/// When `scripts/flink.sh` has not built them, saying so.
pub fn classpath() -> String {
    let deps = std::env::var_os("FLUMEN_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".deps"));
    let lib = deps.join("flink/lib");
    let jar = root().join("target/flink/flumen-flink.jar");
    assert!(
        lib.is_dir() && jar.exists(),
        "Flink or the provider is missing: run `bash scripts/flink.sh` (scripts/test.sh does)"
    );
    let mut parts: Vec<PathBuf> = std::fs::read_dir(&lib)
        .expect("Flink's lib folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jar"))
        .collect();
    parts.sort();
    parts.push(jar);
    parts.push(root().join("target/flink/test-classes"));
    std::env::join_paths(parts)
        .expect("paths without separators")
        .into_string()
        .expect("a UTF-8 classpath")
}

/// A test job, `main` being `SqlJob` or `StreamJob`, with these `key=value`
/// arguments (see each job's documentation).
pub fn job(main: &str, args: &[String]) -> Command {
    let mut c = Command::new("java");
    c.arg("-cp")
        .arg(classpath())
        .arg(format!("io.flumen.flink.{main}"))
        .args(args);
    c
}
