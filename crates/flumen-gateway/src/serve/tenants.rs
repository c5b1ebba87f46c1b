//! Tenants: API keys from a file (`server.keys_file`), each naming a tenant with its
//! priority class, share weight, RPM and TPM quotas and a cap on pending records.
//!
//! ```toml
//! [[tenants]]
//! name = "search"
//! keys_sha256 = ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
//! class = "interactive"   # the most urgent it may ask for (default: "default")
//! weight = 2              # its share against the other tenants of its class
//! rpm = 600               # requests per minute
//! tpm = 200000            # tokens per minute (input, then output as answered)
//! max_pending = 2000      # its records in the engines at once
//! ```
//!
//! Keys are stored as the hex SHA-256 of the key (`printf %s "$KEY" | sha256sum`):
//! API keys are long random strings, so a plain hash is what a stolen file must be
//! inverted through. A caller's key is hashed and compared with every stored digest
//! in constant time, without stopping at a match. The file is read again on SIGHUP
//! and when it changes (checked each second); a file with errors is refused whole —
//! every error reported at once, with its line — and the keys before it stay. The
//! quotas' buckets belong to the tenant's name, so a reload neither refills nor
//! empties them, and requests in flight keep the tenant they came with.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use flumen_engine::rate::Bucket;
use flumen_engine::Class;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// One tenant, as its file entry says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tenant {
    pub(crate) name: Arc<str>,
    /// The most urgent class its requests may ask for; theirs when they ask none.
    pub(crate) class: Class,
    pub(crate) weight: f64,
    pub(crate) rpm: Option<u32>,
    pub(crate) tpm: Option<u64>,
    pub(crate) max_pending: Option<usize>,
    keys: Vec<[u8; 32]>,
}

/// What a tenant's requests use up: kept by name across reloads.
#[derive(Debug)]
pub(crate) struct Usage {
    pub(crate) rpm: Mutex<Option<Bucket>>,
    pub(crate) tpm: Mutex<Option<Bucket>>,
    pub(crate) pending: AtomicUsize,
    /// The shared store's outage its local buckets were last drained for.
    pub(crate) drained_for: std::sync::atomic::AtomicU64,
}

/// A tenant with its usage.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) tenant: Tenant,
    pub(crate) usage: Arc<Usage>,
}

/// The tenants of one reading of the file.
#[derive(Debug, Default)]
pub(crate) struct Tenants {
    entries: Vec<Arc<Entry>>,
}

impl Tenants {
    /// The tenant whose key `key` is, compared in constant time with every digest.
    pub(crate) fn identify(&self, key: &str) -> Option<Arc<Entry>> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for entry in &self.entries {
            for k in &entry.tenant.keys {
                let differ = k.iter().zip(&digest).fold(0u8, |d, (a, b)| d | (a ^ b));
                if differ == 0 {
                    found = Some(Arc::clone(entry));
                }
            }
        }
        found
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| &*e.tenant.name)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    #[serde(default)]
    tenants: Vec<TenantToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantToml {
    name: toml::Spanned<String>,
    keys_sha256: toml::Spanned<Vec<toml::Spanned<String>>>,
    class: Option<toml::Spanned<String>>,
    weight: Option<toml::Spanned<f64>>,
    rpm: Option<toml::Spanned<u32>>,
    tpm: Option<toml::Spanned<u64>>,
    max_pending: Option<toml::Spanned<usize>>,
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Parses a keys file: its tenants, or every problem, each with its line.
pub(crate) fn parse(shown: &str, text: &str) -> Result<Vec<Tenant>, Vec<String>> {
    let line =
        |span: std::ops::Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
    // The parser's message and line, never its excerpt of the file: a key pasted
    // where its digest belongs would be printed whole.
    let file: FileToml = toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|s| format!("line {}: ", line(s)))
            .unwrap_or_default();
        vec![format!("{shown}: {at}{}", e.message().trim_end())]
    })?;
    let mut problems = Vec::new();
    let mut names = HashMap::new();
    let mut digests: HashMap<[u8; 32], String> = HashMap::new();
    let mut tenants = Vec::new();
    for t in file.tenants {
        let name = t.name.get_ref().trim().to_owned();
        let at = line(t.name.span());
        if name.is_empty() {
            problems.push(format!("{shown}: line {at}: name: must not be empty"));
        } else if let Some(first) = names.insert(name.clone(), at) {
            problems.push(format!(
                "{shown}: line {at}: name: `{name}` is already the name of the tenant at line {first}"
            ));
        }
        let mut keys = Vec::new();
        if t.keys_sha256.get_ref().is_empty() {
            problems.push(format!(
                "{shown}: line {}: keys_sha256: `{name}` has no key",
                line(t.keys_sha256.span())
            ));
        }
        for k in t.keys_sha256.get_ref() {
            let at = line(k.span());
            match hex32(k.get_ref()) {
                None => problems.push(format!(
                    "{shown}: line {at}: keys_sha256: `{}` is not a SHA-256 digest (64 hex digits; printf %s \"$KEY\" | sha256sum)",
                    excerpt(k.get_ref())
                )),
                Some(d) => {
                    if let Some(other) = digests.insert(d, name.clone()) {
                        problems.push(format!(
                            "{shown}: line {at}: keys_sha256: this key is also `{other}`'s; a key names one tenant"
                        ));
                    }
                    keys.push(d);
                }
            }
        }
        let class = match &t.class {
            None => Class::DEFAULT,
            Some(c) => Class::parse(c.get_ref()).unwrap_or_else(|| {
                problems.push(format!(
                    "{shown}: line {}: class: `{}` is not a class (interactive, default, bulk, or a level 0-7)",
                    line(c.span()),
                    c.get_ref()
                ));
                Class::DEFAULT
            }),
        };
        let weight = t.weight.as_ref().map_or(1.0, |w| *w.get_ref());
        if let Some(w) = &t.weight {
            if !(w.get_ref().is_finite() && *w.get_ref() > 0.0 && *w.get_ref() <= 1e6) {
                problems.push(format!(
                    "{shown}: line {}: weight: must be above 0 (and at most 1e6), not {}",
                    line(w.span()),
                    w.get_ref()
                ));
            }
        }
        for (field, zero) in [
            (
                "rpm",
                t.rpm
                    .as_ref()
                    .filter(|v| *v.get_ref() == 0)
                    .map(|v| v.span()),
            ),
            (
                "tpm",
                t.tpm
                    .as_ref()
                    .filter(|v| *v.get_ref() == 0)
                    .map(|v| v.span()),
            ),
            (
                "max_pending",
                t.max_pending
                    .as_ref()
                    .filter(|v| *v.get_ref() == 0)
                    .map(|v| v.span()),
            ),
        ] {
            if let Some(span) = zero {
                problems.push(format!(
                    "{shown}: line {}: {field}: must be > 0",
                    line(span)
                ));
            }
        }
        tenants.push(Tenant {
            name: Arc::from(name.as_str()),
            class,
            weight,
            rpm: t.rpm.map(|v| v.into_inner()),
            tpm: t.tpm.map(|v| v.into_inner()),
            max_pending: t.max_pending.map(|v| v.into_inner()),
            keys,
        });
    }
    if tenants.is_empty() {
        // Most likely a file caught half written, or emptied by mistake: nobody's
        // key would work.
        problems.push(format!(
            "{shown}: names no tenant ([[tenants]] with name and keys_sha256)"
        ));
    }
    if problems.is_empty() {
        Ok(tenants)
    } else {
        Err(problems)
    }
}

/// The first characters of what was given where a digest was expected: enough to
/// find it, not a whole secret pasted by mistake.
fn excerpt(s: &str) -> String {
    let cut: String = s.chars().take(8).collect();
    if cut.len() < s.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

/// The keys file and its current tenants.
pub(crate) struct KeyStore {
    path: PathBuf,
    current: RwLock<Arc<Tenants>>,
    /// Each tenant's usage by name, kept across reloads.
    usage: Mutex<HashMap<Arc<str>, Arc<Usage>>>,
    /// What the file looked like when last read (length, modification time).
    seen: Mutex<Option<(u64, std::time::SystemTime)>>,
    /// The share of each quota this replica's buckets hold (see `quota.rs`).
    share: f64,
}

impl KeyStore {
    /// Reads `path`; every problem at once when it cannot be used. The tenants'
    /// buckets here hold `share` of their quotas.
    pub(crate) fn open(path: &Path, share: f64) -> Result<KeyStore, Vec<String>> {
        let store = KeyStore {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(Tenants::default())),
            usage: Mutex::new(HashMap::new()),
            seen: Mutex::new(None),
            share,
        };
        store.reload()?;
        Ok(store)
    }

    /// The tenants now.
    pub(crate) fn tenants(&self) -> Arc<Tenants> {
        Arc::clone(&self.current.read().expect("tenants lock"))
    }

    /// Reads the file again: the new tenants, or every problem (the old stay).
    pub(crate) fn reload(&self) -> Result<usize, Vec<String>> {
        let shown = self.path.display().to_string();
        let meta = std::fs::metadata(&self.path).ok();
        *self.seen.lock().expect("seen lock") = meta
            .as_ref()
            .and_then(|m| Some((m.len(), m.modified().ok()?)));
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| vec![format!("{shown}: cannot read: {e}")])?;
        let tenants = parse(&shown, &text)?;
        let now = Instant::now();
        let mut usage = self.usage.lock().expect("usage lock");
        let names: HashSet<Arc<str>> = tenants.iter().map(|t| Arc::clone(&t.name)).collect();
        usage.retain(|name, _| names.contains(name));
        let entries: Vec<Arc<Entry>> = tenants
            .into_iter()
            .map(|tenant| {
                let u = usage
                    .entry(Arc::clone(&tenant.name))
                    .or_insert_with(|| {
                        Arc::new(Usage {
                            rpm: Mutex::new(None),
                            tpm: Mutex::new(None),
                            pending: AtomicUsize::new(0),
                            drained_for: std::sync::atomic::AtomicU64::new(0),
                        })
                    })
                    .clone();
                let fit = |bucket: &Mutex<Option<Bucket>>, limit: Option<f64>| {
                    let mut b = bucket.lock().expect("bucket lock");
                    *b = match (b.take(), limit) {
                        (_, None) => None,
                        (Some(mut old), Some(l)) => {
                            old.reshape(l * self.share, l * self.share, now);
                            Some(old)
                        }
                        (None, Some(l)) => Some(Bucket::per_minute(l * self.share, now)),
                    };
                };
                fit(&u.rpm, tenant.rpm.map(f64::from));
                fit(&u.tpm, tenant.tpm.map(|t| t as f64));
                Arc::new(Entry { tenant, usage: u })
            })
            .collect();
        let n = entries.len();
        *self.current.write().expect("tenants lock") = Arc::new(Tenants { entries });
        Ok(n)
    }

    /// Whether the file looks different from when it was last read.
    fn changed(&self) -> bool {
        let now = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)));
        now != *self.seen.lock().expect("seen lock")
    }

    /// Reloads on SIGHUP and when the file changes (looked at each second), until
    /// the store is dropped everywhere else.
    pub(crate) fn watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                let signalled = match &mut hangup {
                    Some(h) => tokio::select! {
                        _ = h.recv() => true,
                        () = tokio::time::sleep(Duration::from_secs(1)) => false,
                    },
                    None => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        false
                    }
                };
                #[cfg(not(unix))]
                let signalled = {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    false
                };
                let Some(store) = weak.upgrade() else {
                    return;
                };
                if signalled || store.changed() {
                    let read = store.reload();
                    let result = if read.is_ok() { "read" } else { "refused" };
                    metrics::counter!("flumen_keys_file_reloads_total", "result" => result)
                        .increment(1);
                    match read {
                        Ok(n) => tracing::info!(
                            file = %store.path.display(),
                            tenants = n,
                            "flumen serve: keys file read again"
                        ),
                        Err(problems) => tracing::error!(
                            file = %store.path.display(),
                            "flumen serve: keys file refused, the previous keys stay: {}",
                            problems.join("; ")
                        ),
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn a_good_file_names_its_tenants_and_keys_identify_them() {
        let text = format!(
            "[[tenants]]\nname = \"search\"\nkeys_sha256 = [\"{}\", \"{}\"]\nclass = \"interactive\"\nweight = 2\nrpm = 600\n\n\
             [[tenants]]\nname = \"backfill\"\nkeys_sha256 = [\"{}\"]\nclass = \"bulk\"\ntpm = 1000\nmax_pending = 50\n",
            digest("k-search-1"),
            digest("k-search-2").to_uppercase(),
            digest("k-backfill")
        );
        let tenants = parse("keys.toml", &text).unwrap();
        assert_eq!(tenants.len(), 2);
        assert_eq!(tenants[0].class, Class::INTERACTIVE);
        assert_eq!(tenants[0].weight, 2.0);
        assert_eq!(tenants[1].max_pending, Some(50));
        let set = Tenants {
            entries: tenants
                .into_iter()
                .map(|tenant| {
                    Arc::new(Entry {
                        tenant,
                        usage: Arc::new(Usage {
                            rpm: Mutex::new(None),
                            tpm: Mutex::new(None),
                            pending: AtomicUsize::new(0),
                            drained_for: std::sync::atomic::AtomicU64::new(0),
                        }),
                    })
                })
                .collect(),
        };
        let who = |k| set.identify(k).map(|e| e.tenant.name.to_string());
        assert_eq!(who("k-search-1").as_deref(), Some("search"));
        assert_eq!(who("k-search-2").as_deref(), Some("search"));
        assert_eq!(who("k-backfill").as_deref(), Some("backfill"));
        assert_eq!(who("k-search-3"), None);
        assert_eq!(who(""), None);
    }

    #[test]
    fn every_error_of_a_file_is_reported_with_its_line() {
        let good = digest("a");
        let text = format!(
            "[[tenants]]\nname = \"a\"\nkeys_sha256 = [\"{good}\"]\n\n\
             [[tenants]]\nname = \"b\"\nkeys_sha256 = [\"not-a-hash-at-all\"]\n\n\
             [[tenants]]\nname = \"a\"\nkeys_sha256 = [\"{}\"]\nclass = \"urgent\"\nweight = 0\n\n\
             [[tenants]]\nname = \"c\"\nkeys_sha256 = [\"{good}\"]\nrpm = 0\n",
            digest("b")
        );
        let problems = parse("keys.toml", &text).unwrap_err();
        let expect = [
            ("line 7", "not a SHA-256 digest"),
            ("line 10", "`a` is already the name of the tenant at line 2"),
            ("line 12", "`urgent` is not a class"),
            ("line 13", "weight"),
            ("line 17", "also `a`'s"),
            ("line 18", "rpm: must be > 0"),
        ];
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
        for ((line, what), p) in expect.iter().zip(&problems) {
            assert!(p.starts_with(&format!("keys.toml: {line}:")), "{p}");
            assert!(p.contains(what), "{p}");
        }
        // A secret pasted where its digest belongs is not echoed whole.
        assert!(
            !problems[0].contains("not-a-hash-at-all"),
            "{}",
            problems[0]
        );
        // The parser's own errors keep their line and lose their excerpt.
        let pasted = parse(
            "keys.toml",
            "[[tenants]]\nname = \"a\"\nkeys_sha256 = [\"x\"]\nkey = \"sk-live-secret\"\n",
        )
        .unwrap_err();
        assert!(pasted[0].starts_with("keys.toml: line 4:"), "{pasted:?}");
        assert!(pasted[0].contains("`key`"), "{pasted:?}");
        assert!(!pasted[0].contains("sk-live-secret"), "{pasted:?}");
        let empty = parse("keys.toml", "# nothing yet\n").unwrap_err();
        assert!(empty[0].contains("names no tenant"), "{empty:?}");
    }
}
