//! `loadgen`: drives roomvisor, the limit server (`benches/limit`) and the Socket.IO peer
//! (`benches/peer`) with the same load shapes, and prints what it measured as a table and as
//! JSON; `loadgen report` turns a set of those JSON files into BENCHMARKS.md.
//!
//!     loadgen run --url http://127.0.0.1:4000 --pid 1234 --name roomvisor --scenario fanout
//!     loadgen run --url http://127.0.0.1:4000 --pid 1234 --name durable --scenario stored-rooms \
//!         --data-dir target/data
//!     loadgen report --out BENCHMARKS.md results/*.json

mod client;
mod health;
mod presence;
mod procmem;
mod protocol;
mod report;
mod scenario;
mod stats;
mod traffic;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};

use protocol::Protocol;
use scenario::{Scenario, Shape};
use stats::Metrics;

#[derive(Parser)]
#[command(about = "Load generator for roomvisor and the servers it is measured against")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one scenario against one server.
    Run(RunArgs),
    /// Writes the comparison table from the JSON results of `run`.
    Report {
        /// Where to write the Markdown.
        #[arg(long, default_value = "BENCHMARKS.md")]
        out: PathBuf,
        /// The command that produced the results, quoted in the report.
        #[arg(long, default_value = "benches/run.sh")]
        command: String,
        results: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The server's base URL; several, comma-separated, spread the clients over the nodes
    /// of a cluster (client i uses URL i mod n).
    #[arg(long, default_value = "http://127.0.0.1:4000", value_delimiter = ',')]
    url: Vec<String>,
    #[arg(long, value_enum, default_value = "phoenix")]
    protocol: Protocol,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// The server's pid, for memory readings from /proc (its children count as workers).
    #[arg(long)]
    pid: Option<u32>,
    /// The server's data directory (the gateway's `--data-dir`), whose files' sizes
    /// stored-rooms reports.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// What to call the server in the results.
    #[arg(long, default_value = "roomvisor")]
    name: String,
    /// Overrides of the scenario's preset, for smoke runs.
    #[arg(long)]
    clients: Option<usize>,
    #[arg(long)]
    rooms: Option<usize>,
    #[arg(long)]
    seconds: Option<f64>,
    #[arg(long)]
    concurrency: Option<usize>,
    /// Pushes a sender keeps unanswered when sending as fast as it can.
    #[arg(long)]
    window: Option<usize>,
    /// Also write the result here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The server under test.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub protocol: Protocol,
    pub urls: Vec<String>,
    pub pid: Option<u32>,
    pub data_dir: Option<PathBuf>,
}

impl Target {
    /// Where client `id` connects.
    pub fn url_for(&self, id: u64) -> &str {
        let n = self.urls.len().max(1);
        self.urls.get(id as usize % n).map(String::as_str).unwrap_or("http://127.0.0.1:4000")
    }

    pub async fn connect(&self, id: u64) -> Result<client::Client, client::Error> {
        client::Client::connect(self.protocol, self.url_for(id), id).await
    }

    /// Distinguishes this run's room names from an earlier run's against the same server.
    pub fn clock_tag(&self) -> u128 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
    }
}

/// One scenario against one server, as written to JSON and read back by `report`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub server: String,
    pub scenario: String,
    pub shape: serde_json::Value,
    pub metrics: Metrics,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => run(args),
        Command::Report { out, command, results } => match report::write(&out, &command, &results) {
            Ok(()) => {
                println!("wrote {}", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("loadgen report: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(args: RunArgs) -> ExitCode {
    raise_open_file_limit();
    let mut shape: Shape = args.scenario.preset();
    shape.clients = args.clients.unwrap_or(shape.clients);
    shape.rooms = args.rooms.unwrap_or(shape.rooms);
    shape.seconds = args.seconds.unwrap_or(shape.seconds);
    shape.concurrency = args.concurrency.unwrap_or(shape.concurrency).max(1);
    shape.window = args.window.unwrap_or(shape.window).max(1);
    let target = Target {
        name: args.name,
        protocol: args.protocol,
        urls: args.url,
        pid: args.pid,
        data_dir: args.data_dir,
    };
    let scenario_name = serde_json::to_value(args.scenario)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    eprintln!("loadgen: {scenario_name} against {} at {} ({shape:?})", target.name, target.urls.join(", "));

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadgen: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics = match runtime.block_on(args.scenario.run(&target, &shape)) {
        Ok(metrics) => metrics,
        Err(e) => {
            eprintln!("loadgen: {scenario_name} against {} failed: {e}", target.name);
            return ExitCode::FAILURE;
        }
    };
    // Client tasks may still be closing sockets; they must not hold the exit.
    runtime.shutdown_background();

    println!("{scenario_name} against {}:", target.name);
    for metric in &metrics.0 {
        println!("  {:<52} {:>12.2} {}", metric.name, metric.value, metric.unit);
    }
    let result = RunResult {
        server: target.name,
        scenario: scenario_name,
        shape: serde_json::to_value(&shape).unwrap_or_default(),
        metrics,
    };
    if let Some(path) = args.json {
        let written = serde_json::to_string_pretty(&result)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(&path, json));
        if let Err(e) = written {
            eprintln!("loadgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let errors = result.metrics.get("errors").unwrap_or(0.0);
    if errors > 0.0 {
        eprintln!("loadgen: {errors} errors during the run");
    }
    ExitCode::SUCCESS
}

/// Thousands of sockets need more descriptors than a login shell's usual soft limit.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
