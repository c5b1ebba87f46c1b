//! One record on its way through a run: read and parsed from its message, turned
//! into the model's input, and written out as an output line or a dead letter (or,
//! refused by the dead-letter sink, a quarantine entry).

use std::path::PathBuf;

use anyhow::{Context, Result};
use flumen_connect::{
    AckToken, ConnectError, FileMode, Patience, Refused, Sink, SinkConfig, SinkRecord,
};
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::setup::KeyBy;
use super::Tally;

/// One record from the source: where it came from, what it holds, when it was read,
/// and the token that acknowledges it once its outcome is written.
pub(super) struct Line {
    pub(super) position: String,
    pub(super) partition: i32,
    pub(super) key: Option<Vec<u8>>,
    pub(super) record: Result<Value, String>,
    pub(super) raw: Vec<u8>,
    pub(super) read_at: Instant,
    pub(super) token: AckToken,
}

pub(super) fn parse_line(message: flumen_connect::Message, max_bytes: usize) -> Line {
    let flumen_connect::Message {
        payload: raw,
        position,
        partition,
        key,
        token,
    } = message;
    let record = if raw.len() > max_bytes {
        Err(format!(
            "{position}: record is {} bytes, over the limit of {max_bytes} (--max-record-bytes, mapping.max_record_bytes)",
            raw.len()
        ))
    } else {
        match std::str::from_utf8(&raw) {
            Err(e) => Err(format!("{position}: invalid UTF-8 ({e})")),
            Ok(text) => serde_json::from_str::<Value>(text)
                .map_err(|e| format!("{position}: invalid JSON: {e}")),
        }
    };
    Line {
        position,
        partition,
        key,
        record,
        raw,
        read_at: Instant::now(),
        token,
    }
}

pub(super) fn model_input(line: &Line, field: Option<&str>) -> Result<Value, String> {
    let record = line.record.as_ref().map_err(Clone::clone)?;
    match field {
        None => Ok(record.clone()),
        Some(f) => record
            .get(f)
            .cloned()
            .ok_or_else(|| format!("{}: field `{f}` is missing", line.position)),
    }
}

/// Which record fields give its priority class and tenant (`--priority-field`,
/// `--tenant-field`, `[mapping] priority` and `tenant`).
#[derive(Debug, Clone, Default)]
pub(super) struct LaneFields {
    pub(super) priority: Option<String>,
    pub(super) tenant: Option<String>,
}

impl LaneFields {
    /// The record's lane, or why its priority field is not a class.
    pub(super) fn lane(&self, line: &Line) -> Result<flumen_engine::Lane, String> {
        let mut lane = flumen_engine::Lane::default();
        let Ok(record) = &line.record else {
            return Ok(lane);
        };
        if let Some(f) = &self.priority {
            let class = match record.get(f) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(flumen_engine::Class::parse(s).ok_or(s.clone())),
                Some(Value::Number(n)) => Some(
                    n.as_u64()
                        .and_then(|n| u8::try_from(n).ok())
                        .and_then(flumen_engine::Class::level)
                        .ok_or(n.to_string()),
                ),
                Some(other) => Some(Err(other.to_string())),
            };
            match class {
                Some(Ok(c)) => lane.class = c,
                Some(Err(v)) => {
                    return Err(format!(
                        "{}: field `{f}`: {v:?} is not a priority class (interactive, default, bulk, or a level 0-7)",
                        line.position
                    ))
                }
                None => {}
            }
        }
        if let Some(f) = &self.tenant {
            lane.tenant = match record.get(f) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.as_str().into()),
                Some(other) => Some(other.to_string().into()),
            };
        }
        Ok(lane)
    }
}

pub(super) fn key_of(line: &Line, key: Option<&KeyBy>) -> String {
    match (key, &line.record) {
        (Some(KeyBy::Partition), _) => line.partition.to_string(),
        (Some(KeyBy::Field(f)), Ok(record)) => {
            record.get(f).map(Value::to_string).unwrap_or_default()
        }
        _ => String::new(),
    }
}

pub(super) fn success_line(line: &Line, output_field: &str, prediction: Value) -> Value {
    match &line.record {
        Ok(Value::Object(map)) => {
            let mut map = map.clone();
            map.insert(output_field.to_owned(), prediction);
            Value::Object(map)
        }
        Ok(other) => {
            let mut map = Map::new();
            map.insert("input".into(), other.clone());
            map.insert(output_field.to_owned(), prediction);
            Value::Object(map)
        }
        Err(_) => unreachable!("a record that did not parse never reaches the backend"),
    }
}

/// What a record cost, for `--usage-field`.
pub(super) fn usage(receipt: &flumen_engine::Receipt) -> Value {
    let mut u = Map::new();
    u.insert("input_tokens".into(), receipt.input_tokens.into());
    u.insert("output_tokens".into(), receipt.output_tokens.into());
    if let Some(cost) = receipt.cost {
        u.insert("cost".into(), cost.into());
    }
    u.insert("cached".into(), receipt.from_cache.into());
    Value::Object(u)
}

/// A dead letter: where the record came from, its size, the record itself when it is
/// at most `excerpt_bytes` long (else its first `excerpt_bytes` as `excerpt`), and why
/// it failed (`kind`: an [`flumen_core::ErrorKind`], or `sink_refused`).
fn dead_letter(
    line: &Line,
    kind: &str,
    message: &str,
    attempts: u32,
    excerpt_bytes: usize,
) -> Value {
    let mut doc = json!({
        "source": line.position,
        "size": line.raw.len(),
    });
    if line.raw.len() <= excerpt_bytes {
        doc["record"] = match &line.record {
            Ok(v) => v.clone(),
            Err(_) => Value::String(String::from_utf8_lossy(&line.raw).into_owned()),
        };
    } else {
        // Cut at a character boundary where the bytes are UTF-8.
        let mut cut = excerpt_bytes;
        while cut > 0 && std::str::from_utf8(&line.raw[..cut]).is_err() && excerpt_bytes - cut < 4 {
            cut -= 1;
        }
        doc["excerpt"] = String::from_utf8_lossy(&line.raw[..cut])
            .into_owned()
            .into();
        doc["truncated"] = true.into();
    }
    doc["error"] = json!({
        "kind": kind,
        "message": message,
        "attempts": attempts,
    });
    if let Some(n) = line
        .position
        .strip_prefix("line ")
        .and_then(|n| n.parse::<u64>().ok())
    {
        doc["line"] = n.into();
    }
    doc
}

pub(super) fn failure_line(
    line: &Line,
    failure: &flumen_core::Failure,
    excerpt_bytes: usize,
) -> Value {
    dead_letter(
        line,
        failure.kind.as_str(),
        &failure.message,
        failure.attempts,
        excerpt_bytes,
    )
}

/// The quarantine file, opened when first needed: dead letters that the dead-letter
/// sink refused, so that they are not lost.
pub(super) struct Quarantine {
    pub(super) path: PathBuf,
    pub(super) sync: bool,
    pub(super) sink: Option<Sink>,
}

impl Quarantine {
    pub(super) async fn write(&mut self, docs: Vec<Value>) -> Result<()> {
        if docs.is_empty() {
            return Ok(());
        }
        if self.sink.is_none() {
            let config = SinkConfig::File {
                path: self.path.clone(),
                mode: Some(FileMode::Append),
            };
            let sink = Sink::open(&config, "quarantine", FileMode::Append, Patience::default())
                .await
                .with_context(|| {
                    format!("cannot open the quarantine file {}", self.path.display())
                })?;
            self.sink = Some(sink.syncing(self.sync));
        }
        let n = docs.len();
        let records = docs.iter().map(|d| sink_record(None, d));
        let sink = self.sink.as_mut().expect("opened above");
        sink.write(records.collect())
            .await
            .with_context(|| format!("cannot write the quarantine file {}", self.path.display()))?;
        metrics::counter!("flumen_quarantined_total").increment(n as u64);
        eprintln!(
            "flumen: {n} dead letters refused by the dead-letter sink written to {}",
            self.path.display()
        );
        Ok(())
    }
}

/// One chunk of outcomes on its way out: the outputs for the sink, the dead letters
/// (for the dead-letter sink, or the sink when there is none), and the documents
/// behind them, to build a dead letter or a quarantine entry from a refusal.
#[derive(Default)]
pub(super) struct Outgoing {
    pub(super) outputs: Vec<SinkRecord>,
    /// Per output: the record's index in the chunk, and its failure document when
    /// the output is one (no dead-letter sink).
    pub(super) behind: Vec<(usize, Option<Value>)>,
    pub(super) letters: Vec<SinkRecord>,
    pub(super) letter_docs: Vec<Value>,
}

/// A JSON document as a sink writes it.
fn sink_record(key: Option<Vec<u8>>, doc: &Value) -> SinkRecord {
    SinkRecord {
        key,
        payload: serde_json::to_vec(doc).expect("JSON values serialize"),
    }
}

impl Outgoing {
    /// An output for the sink: record `i`'s prediction, or its failure (`failed`: the
    /// document is kept, to quarantine it should the sink refuse it).
    pub(super) fn output(&mut self, i: usize, key: Option<Vec<u8>>, doc: Value, failed: bool) {
        self.outputs.push(sink_record(key, &doc));
        self.behind.push((i, failed.then_some(doc)));
    }

    pub(super) fn letter(&mut self, key: Option<Vec<u8>>, doc: Value) {
        self.letters.push(sink_record(key, &doc));
        self.letter_docs.push(doc);
    }
}

/// A refused dead letter, for the quarantine file: the letter and why it was refused.
fn quarantined(mut doc: Value, reason: &str) -> Value {
    doc["quarantined"] = reason.into();
    doc
}

/// Where a run's outcomes go.
pub(super) struct Writers {
    pub(super) sink: Sink,
    /// Failures go here when there is one, else to `sink`.
    pub(super) dead: Option<Sink>,
    pub(super) quarantine: Quarantine,
}

/// How a chunk's write ended.
pub(super) enum Written {
    /// Every record's outcome is durable somewhere: it may be acknowledged.
    All,
    /// The reader of stdout went away.
    ReaderGone,
}

/// A sink's answer, with a closed stdout told apart.
fn wrote(result: Result<Vec<Refused>, ConnectError>, what: &str) -> Result<Option<Vec<Refused>>> {
    match result {
        Ok(refused) => Ok(Some(refused)),
        Err(ConnectError::Closed(_)) => Ok(None),
        Err(e) => Err(anyhow::Error::from(e).context(format!("cannot write the {what}"))),
    }
}

impl Writers {
    /// Writes one chunk: its outputs to the sink; its dead letters, with a dead letter
    /// for each output the sink refused, to the dead-letter sink (or the sink); the
    /// dead letters refused there to the quarantine file. On `Ok(Written::All)` every
    /// record of `lines` has its outcome in exactly one of them; on an error nothing
    /// may be acknowledged.
    pub(super) async fn write(
        &mut self,
        mut out: Outgoing,
        lines: &[Line],
        excerpt_bytes: usize,
        tally: &mut Tally,
    ) -> Result<Written> {
        let keys: Vec<Option<Vec<u8>>> = out.outputs.iter().map(|r| r.key.clone()).collect();
        let outputs = std::mem::take(&mut out.outputs);
        let Some(refused) = wrote(self.sink.write(outputs).await, "output")? else {
            return Ok(Written::ReaderGone);
        };
        let mut quarantine = Vec::new();
        for r in refused {
            metrics::counter!("flumen_sink_refused_total", "sink" => "sink").increment(1);
            let (i, failure) = (out.behind[r.index].0, out.behind[r.index].1.take());
            match failure {
                // A failure the sink refused (no dead-letter sink): nowhere else to go.
                Some(doc) => {
                    tally.quarantined += 1;
                    quarantine.push(quarantined(doc, &r.reason));
                }
                None => {
                    tally.ok -= 1;
                    tally.refused += 1;
                    let doc = dead_letter(&lines[i], "sink_refused", &r.reason, 0, excerpt_bytes);
                    out.letter(keys[r.index].clone(), doc);
                }
            }
        }
        let letters = std::mem::take(&mut out.letters);
        let to = self.dead.as_mut().unwrap_or(&mut self.sink);
        let Some(refused) = wrote(to.write(letters).await, "dead-letter output")? else {
            return Ok(Written::ReaderGone);
        };
        for r in refused {
            metrics::counter!("flumen_sink_refused_total", "sink" => "dead_letter").increment(1);
            tally.quarantined += 1;
            quarantine.push(quarantined(out.letter_docs[r.index].take(), &r.reason));
        }
        self.quarantine.write(quarantine).await?;
        Ok(Written::All)
    }
}
