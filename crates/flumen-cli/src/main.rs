//! `flumen`: runs a stream of JSONL records through a model backend.

mod backends;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Flumen: a streaming-native AI inference runtime.
#[derive(Debug, Parser)]
#[command(name = "flumen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run JSONL records from a file or stdin through a backend; write one JSON line
    /// per record (its prediction, or its failure) to stdout.
    Run(run::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Command::Run(args) => runtime.block_on(run::run(args)),
    };
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<run::BadConfig>().is_some() => {
            eprintln!("flumen: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("flumen: {e:#}");
            ExitCode::from(1)
        }
    }
}
