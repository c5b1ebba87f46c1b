//! The on-disk cache of fetched models: each copy carries a manifest of its files'
//! sha256, written when it is installed and checked again each time it is used.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{check_dir, hex};

/// The manifest file in a cached model directory.
pub(super) const MANIFEST: &str = "flumen-manifest.json";

#[derive(Serialize, Deserialize)]
struct Manifest {
    source: String,
    /// Relative path → lowercase hex sha256.
    files: BTreeMap<String, String>,
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Checks every file of a cached model against the manifest written when it was fetched.
pub(super) fn verify_manifest(dir: &Path) -> Result<(), String> {
    let text =
        std::fs::read_to_string(dir.join(MANIFEST)).map_err(|e| format!("{MANIFEST}: {e}"))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| format!("{MANIFEST}: {e}"))?;
    for (file, want) in &manifest.files {
        let got = sha256_file(&dir.join(file)).map_err(|e| format!("{file}: {e}"))?;
        if &got != want {
            return Err(format!(
                "{file}: sha256 {got} differs from the manifest's {want}"
            ));
        }
    }
    check_dir(dir)
}

pub(super) fn staging_dir(cached: &Path) -> PathBuf {
    let name = cached.file_name().unwrap_or_default().to_string_lossy();
    cached.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Writes the manifest into the staging directory and moves it into place.
pub(super) fn install(staging: &Path, cached: &Path, source: &str) -> Result<(), String> {
    check_dir(staging)?;
    let mut files = BTreeMap::new();
    let mut stack = vec![staging.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(staging).expect("under staging");
                let rel = rel.to_string_lossy().replace('\\', "/");
                files.insert(rel, sha256_file(&path).map_err(|e| e.to_string())?);
            }
        }
    }
    let manifest = Manifest {
        source: source.into(),
        files,
    };
    std::fs::write(
        staging.join(MANIFEST),
        serde_json::to_string_pretty(&manifest).expect("serialisable"),
    )
    .map_err(|e| e.to_string())?;
    // Another process may have installed it meanwhile; replace a stale or partial copy.
    if cached.exists() {
        if verify_manifest(cached).is_ok() {
            return Ok(());
        }
        std::fs::remove_dir_all(cached).map_err(|e| format!("{}: {e}", cached.display()))?;
    }
    std::fs::rename(staging, cached).map_err(|e| format!("{}: {e}", cached.display()))
}
