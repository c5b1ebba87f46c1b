//! `flumen`: runs a stream of JSONL records through a model backend.

mod progress;
mod run;
mod telemetry;
mod toml_keys;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use telemetry::LogFormat;

/// Flumen: a streaming-native AI inference runtime.
#[derive(Debug, Parser)]
#[command(name = "flumen", version, about)]
struct Cli {
    /// How logs are written to stderr: `text` (for people) or `json` (one object a
    /// line, for machines). What is logged: `RUST_LOG` (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    traces: telemetry::TraceArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run JSONL records from a file or stdin, or a pipeline file's source (a file,
    /// Kafka, NATS JetStream), through a backend; write one JSON line per record (its
    /// prediction, or its failure) to stdout, a file or the pipeline's sink.
    #[command(after_long_help = RUN_HELP)]
    Run(Box<run::RunArgs>),
    /// Serve models over OpenAI-compatible and KServe v2 HTTP endpoints, batching
    /// every caller's requests together.
    Serve {
        /// The gateway's TOML configuration (`[server]`, `[[models]]`).
        config: std::path::PathBuf,
    },
    /// The main job in one command: 1,000 built-in review records through the
    /// embedded all-MiniLM-L6-v2, written as JSONL with their embeddings, with progress.
    Demo {
        /// Where to write the records with their embeddings.
        #[arg(long, short, default_value = "demo-embeddings.jsonl")]
        output: std::path::PathBuf,
    },
    /// Run the side-by-side benchmark suite (Flumen and the baselines on one
    /// simulated backend) and write a Markdown report with SVG plots.
    Bench(BenchArgs),
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// 3 s windows instead of 10 s, at most two runs of an unstable point (about 4.5 minutes on 2 cores).
    #[arg(long)]
    quick: bool,
    /// Where to write report.md and the plots.
    #[arg(long, default_value = "bench-report")]
    out: std::path::PathBuf,
    /// Latency objective for goodput, ms.
    #[arg(long, default_value_t = 500)]
    slo_ms: u64,
}

async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let options = flumen_bench::suite::SuiteOptions {
        quick: args.quick,
        slo: std::time::Duration::from_millis(args.slo_ms),
        ..Default::default()
    };
    eprintln!(
        "flumen bench: running the {} suite…",
        if args.quick { "quick" } else { "full" }
    );
    let report = flumen_bench::suite::run(&options).await;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    std::fs::write(args.out.join("report.md"), &report.markdown)
        .context("cannot write report.md")?;
    for (name, svg) in &report.plots {
        std::fs::write(args.out.join(name), svg).with_context(|| format!("cannot write {name}"))?;
    }
    eprintln!(
        "flumen bench: wrote {}",
        args.out.join("report.md").display()
    );
    Ok(ExitCode::SUCCESS)
}

const RUN_HELP: &str = "\
Pipeline files:
  `flumen run pipeline.toml` (or `--config pipeline.toml`) reads a TOML file with
  [source] (kind = file | stdin | kafka | nats), [sink] and an optional [dead_letter]
  (kind = file | stdout | kafka | nats), [mapping] (input, output, max_record_bytes),
  [delivery] (excerpt_bytes, quarantine, max_outage_s), [backend], [engine] and
  [operator]. A file is a pipeline file when it is named *.toml or is TOML with a
  [backend] table; otherwise it is JSONL input. Beside a pipeline file only the flags
  that say where records go and how the run reports are accepted (-o, --dead-letter,
  --field, --output-field, --max-record-bytes, --excerpt-bytes, --quarantine,
  --max-outage-s, --metrics-addr, --fail-on-dead-letter, --quiet); the others are
  refused, since the file configures them. Examples: examples/config/kafka.toml,
  examples/config/nats.toml.

Delivery:
  A Kafka or NATS message is acknowledged only after its outcome (prediction or dead
  letter) is written: at least once. File sinks then append (a restart keeps what was
  written; a torn last line is cut). An output the sink refuses (too large) becomes a
  dead letter; a dead letter the dead-letter sink refuses goes to the quarantine file.
  An unreachable broker is waited out (--max-outage-s to give up). SIGINT/SIGTERM
  stops reading, finishes what is in flight and exits; a file run so cut short exits
  130 (SIGINT) or 143 (SIGTERM).";

/// The demo's records: the same reviews as `examples/data/reviews.jsonl`.
const SAMPLE: &[u8] = include_bytes!("../../../examples/data/reviews.jsonl");

async fn demo(output: std::path::PathBuf) -> anyhow::Result<ExitCode> {
    let mut argv = vec![
        "flumen run".to_owned(),
        "--field".into(),
        "text".into(),
        "--output".into(),
    ];
    argv.push(output.display().to_string());
    #[derive(Parser)]
    struct DemoRun {
        #[command(flatten)]
        run: run::RunArgs,
    }
    let args = DemoRun::try_parse_from(argv)?.run;
    eprintln!(
        "flumen demo: embedding {} review records with all-MiniLM-L6-v2, in process, into {}",
        SAMPLE.iter().filter(|b| **b == b'\n').count(),
        output.display()
    );
    let code = run::run(args, run::Input::Builtin(SAMPLE)).await?;
    eprintln!(
        "flumen demo: done; each line of {} is a review with its 384-float `prediction`",
        output.display()
    );
    Ok(code)
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let typed = |m: &clap::ArgMatches, id: &str| {
        m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
    };
    let explicit_ratio = typed(&matches, "trace_sample_ratio")
        || matches
            .subcommand()
            .is_some_and(|(_, m)| typed(m, "trace_sample_ratio"));
    let telemetry = match telemetry::init(cli.log_format, &cli.traces, explicit_ratio) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("flumen: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let (Command::Run(args), Some(("run", m))) = (&mut cli.command, matches.subcommand()) {
        // Which flags were typed, not defaulted: a pipeline file refuses those it sets.
        args.explicit = m
            .ids()
            .filter(|id| {
                m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|id| id.to_string())
            .collect();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flumen: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match cli.command {
        Command::Run(args) => runtime.block_on(run::run(*args, run::Input::FromArgs)),
        Command::Demo { output } => runtime.block_on(demo(output)),
        Command::Bench(args) => runtime.block_on(bench(args)),
        Command::Serve { config } => runtime
            .block_on(flumen_gateway::serve::serve(&config))
            .map(|()| ExitCode::SUCCESS),
    };
    // Not waiting for what cannot be cancelled (a read of stdin blocks until a line
    // comes): an interrupted `flumen run` on a terminal exits at once.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    let code = match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<flumen_config::BadConfig>().is_some() => {
            eprintln!("flumen: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("flumen: {e:#}");
            ExitCode::from(1)
        }
    };
    // The traces still buffered are sent before the process goes.
    telemetry.shutdown();
    code
}
