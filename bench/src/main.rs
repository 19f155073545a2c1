//! `palaver-bench`: the load generator for Palaver gateways. It speaks the
//! real protocol over real TLS, like the phones do. `run` coordinates worker
//! processes (the hidden `worker` subcommand of this same binary), each
//! driving thousands of connections from its own source address, and merges
//! their histograms into one report; `merge` combines the reports of runs
//! made in parts on several machines. See bench/README.md.

mod coordinator;
mod hist;
mod ipc;
mod plot;
mod report;
mod settings;
mod sys;
mod tls;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "palaver-bench",
    version,
    about = "Load generator and reports for Palaver gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario against a gateway (flags, or a scenario file plus flags).
    Run(Box<coordinator::RunArgs>),
    /// Merge the reports of a run made in parts (`run --part K/M`) on several machines.
    Merge {
        /// report.json files, one per part.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// Write the merged report.json and plots here.
        #[arg(long)]
        out: PathBuf,
    },
    /// Internal: one worker process (plan on stdin, JSON lines on stdout).
    #[command(hide = true)]
    Worker,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => coordinator::run(*args),
        Cmd::Merge { reports, out } => merge(&reports, &out),
        Cmd::Worker => worker::main(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palaver-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn merge(paths: &[PathBuf], out: &std::path::Path) -> anyhow::Result<()> {
    let reports = paths
        .iter()
        .map(|p| report::Report::read_json(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let merged = report::Report::merge(reports)?;
    print!("{}", merged.table());
    coordinator::write_out_dir(&merged, out)
}
