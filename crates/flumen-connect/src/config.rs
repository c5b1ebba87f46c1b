//! Sources and sinks as configured in a pipeline's TOML (`[source]`, `[sink]`,
//! `[dead_letter]`), chosen by `kind`, with every problem reported with its path.

use std::path::PathBuf;

use serde::Deserialize;

/// `[source]`.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// `kind = "file"`: JSONL, one record per line.
    File {
        /// The file.
        path: PathBuf,
    },
    /// `kind = "stdin"`.
    Stdin,
    /// `kind = "kafka"`.
    Kafka(KafkaSource),
    /// `kind = "nats"`.
    Nats(NatsSource),
}

/// How a file sink opens its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileMode {
    /// Keep what is there and add to it: a restarted pipeline whose source
    /// acknowledges (Kafka, NATS) must not lose outputs its commits cover. A torn last
    /// line (a crash in the middle of a write, never acknowledged) is cut off first.
    Append,
    /// Start the file anew (a file or stdin source, which a rerun reads again from
    /// the start).
    Truncate,
}

/// `[sink]` or `[dead_letter]`.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    /// `kind = "file"`.
    File {
        /// The file.
        path: PathBuf,
        /// `append` or `truncate`; by default `append` when the source acknowledges
        /// (Kafka, NATS) and `truncate` otherwise.
        mode: Option<FileMode>,
    },
    /// `kind = "stdout"`.
    Stdout,
    /// `kind = "kafka"`.
    Kafka(KafkaSink),
    /// `kind = "nats"`.
    Nats(NatsSink),
}

/// A Kafka consumer group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSource {
    /// `host:port,…`.
    pub brokers: String,
    /// The topic to read.
    pub topic: String,
    /// The consumer group; processes in one group share the partitions.
    pub group: String,
    /// Where a new group starts: `earliest` (default) or `latest`.
    #[serde(default)]
    pub start: Option<String>,
    /// Milliseconds between offset commits (default 500; a final commit at the end).
    #[serde(default)]
    pub commit_interval_ms: Option<u64>,
    /// Extra librdkafka properties.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
}

/// A Kafka topic to produce to (acks = all).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSink {
    /// `host:port,…`.
    pub brokers: String,
    /// The topic.
    pub topic: String,
    /// Extra librdkafka properties.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
}

/// A NATS JetStream durable pull consumer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSource {
    /// `nats://host:port`.
    pub url: String,
    /// The stream to read.
    pub stream: String,
    /// The durable consumer's name; processes on one durable share the messages.
    pub consumer: String,
    /// Seconds before an unacknowledged message is redelivered (default 30).
    #[serde(default)]
    pub ack_wait_s: Option<u64>,
    /// Processes that share this durable consumer (default 1): the default
    /// `max_ack_pending` is `capacity × (workers + 1)`, so that every worker can fill
    /// its pipeline and a restarted one gets work while a killed one's messages wait
    /// out `ack_wait`.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Messages delivered and not yet acknowledged, across all workers on the
    /// durable, at most (overrides the default from `workers`). Set when the durable
    /// is created; an existing durable keeps its own.
    #[serde(default)]
    pub max_ack_pending: Option<i64>,
}

/// A NATS JetStream subject to publish to (each publish acknowledged).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSink {
    /// `nats://host:port`.
    pub url: String,
    /// The subject (a stream must capture it).
    pub subject: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathOnly {
    path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSink {
    path: PathBuf,
    #[serde(default)]
    mode: Option<FileMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Nothing {}

fn split_kind<'de, D: serde::Deserializer<'de>>(
    d: D,
    kinds: &str,
) -> Result<(String, toml::Table), D::Error> {
    use serde::de::Error;
    let mut table = toml::Table::deserialize(d)?;
    match table.remove("kind") {
        Some(toml::Value::String(k)) => Ok((k, table)),
        Some(other) => Err(D::Error::custom(format!("kind: `{other}` is not a string"))),
        None => Err(D::Error::custom(format!("kind: missing ({kinds})"))),
    }
}

fn section<T: serde::de::DeserializeOwned, E: serde::de::Error>(t: toml::Table) -> Result<T, E> {
    T::deserialize(t).map_err(|e| E::custom(e.to_string().trim_end()))
}

impl<'de> Deserialize<'de> for SourceConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const KINDS: &str = "file, stdin, kafka or nats";
        let (kind, t) = split_kind(d, KINDS)?;
        Ok(match kind.as_str() {
            "file" => SourceConfig::File {
                path: section::<PathOnly, _>(t)?.path,
            },
            "stdin" => {
                section::<Nothing, _>(t)?;
                SourceConfig::Stdin
            }
            "kafka" => SourceConfig::Kafka(section(t)?),
            "nats" => SourceConfig::Nats(section(t)?),
            other => {
                return Err(serde::de::Error::custom(format!(
                    "kind: `{other}` is not {KINDS}"
                )))
            }
        })
    }
}

impl<'de> Deserialize<'de> for SinkConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const KINDS: &str = "file, stdout, kafka or nats";
        let (kind, t) = split_kind(d, KINDS)?;
        Ok(match kind.as_str() {
            "file" => {
                let FileSink { path, mode } = section(t)?;
                SinkConfig::File { path, mode }
            }
            "stdout" => {
                section::<Nothing, _>(t)?;
                SinkConfig::Stdout
            }
            "kafka" => SinkConfig::Kafka(section(t)?),
            "nats" => SinkConfig::Nats(section(t)?),
            other => {
                return Err(serde::de::Error::custom(format!(
                    "kind: `{other}` is not {KINDS}"
                )))
            }
        })
    }
}

fn check_url(p: &mut Vec<String>, path: &str, url: &str, schemes: &[&str]) {
    if !schemes.iter().any(|s| url.starts_with(s)) {
        p.push(format!(
            "{path}: `{url}` must start with {}",
            schemes.join(" or ")
        ));
    }
}

fn not_empty(p: &mut Vec<String>, path: &str, v: &str) {
    if v.trim().is_empty() {
        p.push(format!("{path}: must not be empty"));
    }
}

impl SourceConfig {
    /// The `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::File { .. } => "file",
            SourceConfig::Stdin => "stdin",
            SourceConfig::Kafka(_) => "kafka",
            SourceConfig::Nats(_) => "nats",
        }
    }

    /// Every problem, each under `path` (`source.topic: must not be empty`).
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        feature_check(&mut p, path, self.kind());
        match self {
            SourceConfig::File { .. } | SourceConfig::Stdin => {}
            SourceConfig::Kafka(k) => {
                not_empty(&mut p, &format!("{path}.brokers"), &k.brokers);
                not_empty(&mut p, &format!("{path}.topic"), &k.topic);
                not_empty(&mut p, &format!("{path}.group"), &k.group);
                if let Some(s) = k
                    .start
                    .as_deref()
                    .filter(|s| !matches!(*s, "earliest" | "latest"))
                {
                    p.push(format!("{path}.start: `{s}` is not earliest or latest"));
                }
                if k.commit_interval_ms == Some(0) {
                    p.push(format!("{path}.commit_interval_ms: must be > 0"));
                }
            }
            SourceConfig::Nats(n) => {
                check_url(
                    &mut p,
                    &format!("{path}.url"),
                    &n.url,
                    &["nats://", "tls://"],
                );
                not_empty(&mut p, &format!("{path}.stream"), &n.stream);
                not_empty(&mut p, &format!("{path}.consumer"), &n.consumer);
                if n.ack_wait_s == Some(0) {
                    p.push(format!("{path}.ack_wait_s: must be > 0"));
                }
                if n.workers == Some(0) {
                    p.push(format!("{path}.workers: must be > 0"));
                }
                if n.max_ack_pending.is_some_and(|m| m <= 0) {
                    p.push(format!("{path}.max_ack_pending: must be > 0"));
                }
            }
        }
        p
    }
}

impl SinkConfig {
    /// The `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::File { .. } => "file",
            SinkConfig::Stdout => "stdout",
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Nats(_) => "nats",
        }
    }

    /// Every problem, each under `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        feature_check(&mut p, path, self.kind());
        match self {
            SinkConfig::File { .. } | SinkConfig::Stdout => {}
            SinkConfig::Kafka(k) => {
                not_empty(&mut p, &format!("{path}.brokers"), &k.brokers);
                not_empty(&mut p, &format!("{path}.topic"), &k.topic);
            }
            SinkConfig::Nats(n) => {
                check_url(
                    &mut p,
                    &format!("{path}.url"),
                    &n.url,
                    &["nats://", "tls://"],
                );
                not_empty(&mut p, &format!("{path}.subject"), &n.subject);
            }
        }
        p
    }
}

fn feature_check(p: &mut Vec<String>, path: &str, kind: &str) {
    #[allow(clippy::match_like_matches_macro)] // the arms differ by features
    let built = match kind {
        "kafka" => cfg!(feature = "kafka"),
        "nats" => cfg!(feature = "nats"),
        _ => true,
    };
    if !built {
        p.push(format!(
            "{path}.kind: `{kind}` needs flumen built with the `{kind}` feature"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Doc {
        source: SourceConfig,
        sink: SinkConfig,
    }

    #[test]
    fn every_problem_is_named_with_its_path() {
        let doc: Doc = toml::from_str(
            "[source]\nkind = \"kafka\"\nbrokers = \"\"\ntopic = \"t\"\ngroup = \"\"\nstart = \"middle\"\n\n[sink]\nkind = \"nats\"\nurl = \"http://x\"\nsubject = \"s\"\n",
        )
        .unwrap();
        let mut p = doc.source.validate("source");
        p.extend(doc.sink.validate("sink"));
        for want in ["source.brokers", "source.group", "source.start", "sink.url"] {
            assert!(p.iter().any(|x| x.starts_with(want)), "{want} in {p:#?}");
        }
        let err = toml::from_str::<Doc>(
            "[source]\nkind = \"file\"\npath = \"a\"\ncolour = 1\n[sink]\nkind = \"stdout\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("colour"), "{err}");
        let err = toml::from_str::<Doc>("[source]\nkind = \"ftp\"\n[sink]\nkind = \"stdout\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`ftp` is not file, stdin, kafka or nats"),
            "{err}"
        );
    }
}
