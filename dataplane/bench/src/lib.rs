//! `courier bench`: a load generator that speaks the real protocol against any running Courier.
//!
//! Scenarios (one module each): [`throughput`] (1:1 pairs, open-loop or windowed),
//! [`latency_curve`] (`throughput` at several offered rates, one after the other),
//! [`connections`] (idle connections over several source addresses and processes),
//! [`reconnect_storm`] (devices with pending messages reconnecting at once),
//! [`group_fanout`] (one group, many connected devices) and [`crash`] (SIGKILL a local server
//! mid-load and check durability). Every scenario ends with a human summary and, with
//! `--json FILE`, a [`report::Report`] that `courier bench compare a.json b.json` compares.
//!
//! It is not a test suite: it reports numbers and correctness counts (lost, duplicated,
//! out-of-order messages) and fails only when correctness is broken, never on timings.
//!
//! ```text
//! courier bench --data-dir ./courier-data throughput --pairs 8 --rate 20000 --duration 10s
//! ```

pub mod compare;
pub mod connections;
pub mod crash;
pub mod group_fanout;
pub mod latency_curve;
mod metrics;
mod progress;
pub mod receiver;
pub mod reconnect_storm;
pub mod report;
pub mod sender;
mod stats;
pub mod throughput;
mod tokens;
pub mod wire;

use clap::{Args, Subcommand, ValueEnum};
use courier_proto::Encoding;
use std::path::PathBuf;
use std::time::Duration;

pub use report::Report;
pub use tokens::TokenMinter;

/// `courier bench [COMMON FLAGS] <SCENARIO> [SCENARIO FLAGS]`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Flags every scenario takes (they may come before or after the scenario name).
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// The server's WebSocket base URL (`ws://` only). Against a cluster, one per gateway
    /// (repeated or comma-separated): connection `i` of a scenario goes to gateway `i % N`,
    /// so that in `throughput` every sender and its receiver sit on different gateways when
    /// there are two.
    #[arg(
        long,
        global = true,
        env = "COURIER_BENCH_URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080"
    )]
    pub url: Vec<String>,
    /// The server's data directory: tokens are signed with its `jwt-secret`.
    #[arg(long, global = true, env = "COURIER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Sign tokens with this HS256 secret instead of the data directory's.
    #[arg(
        long,
        global = true,
        env = "COURIER_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// WebSocket subprotocol: `json` (courier.v1.json) or `proto` (courier.v1.proto).
    #[arg(long, global = true, value_enum, default_value_t = Protocol::Json)]
    pub protocol: Protocol,
    /// Also write the results as JSON to this file (comparable with `bench compare`).
    #[arg(long, global = true, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// How long the measured phase lasts (e.g. `10s`, `1m`); `latency-curve`: at each rate.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Longest wait for in-flight messages, deliveries and receipts after the measured phase.
    #[arg(long, global = true, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long, global = true)]
    pub no_progress: bool,
}

/// The WebSocket subprotocol the bench speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    Json,
    Proto,
}

impl Protocol {
    pub fn encoding(self) -> Encoding {
        match self {
            Protocol::Json => Encoding::Json,
            Protocol::Proto => Encoding::Proto,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Json => "json",
            Protocol::Proto => "proto",
        }
    }
}

/// The scenarios, and `compare`.
#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// N sender/receiver pairs at an open-loop rate (or as fast as a window allows).
    Throughput(throughput::ThroughputArgs),
    /// `throughput` at several offered rates in turn: latency against offered rate.
    LatencyCurve(latency_curve::LatencyCurveArgs),
    /// Open N idle connections (several source addresses and processes) and hold them.
    Connections(connections::ConnectionsArgs),
    /// N devices with M pending messages each reconnect at once.
    ReconnectStorm(reconnect_storm::ReconnectStormArgs),
    /// One group of G members, D connected devices, S senders: per-delivery latency.
    GroupFanout(group_fanout::GroupFanoutArgs),
    /// Start a local server, SIGKILL it mid-load, restart it, check every `sent` survived.
    Crash(crash::CrashArgs),
    /// Compare two `--json` results: ratios per metric.
    Compare(compare::CompareArgs),
}

/// Runs a scenario; fails when the run found a correctness problem (lost, duplicated or
/// reordered messages) or could not run at all.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let common = args.common;
    let report = match args.scenario {
        Scenario::Throughput(a) => throughput::run(&common, a).await?,
        Scenario::LatencyCurve(a) => latency_curve::run(&common, a).await?,
        Scenario::Connections(a) => match connections::run(&common, a).await? {
            Some(report) => report,
            None => return Ok(()), // a worker process: its parent reports
        },
        Scenario::ReconnectStorm(a) => reconnect_storm::run(&common, a).await?,
        Scenario::GroupFanout(a) => group_fanout::run(&common, a).await?,
        Scenario::Crash(a) => crash::run(&common, a).await?,
        Scenario::Compare(a) => return compare::run(a),
    };
    report.print();
    if let Some(path) = &common.json {
        report.write_json(path)?;
        eprintln!("results written to {}", path.display());
    }
    if !report.problems.is_empty() {
        anyhow::bail!("correctness problems: {}", report.problems.join("; "));
    }
    Ok(())
}

/// A short id that keeps the users of one run apart from every earlier run on the same server.
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{:x}{:x}",
        nanos % 0xff_ffff_ffff,
        std::process::id() % 0xfff
    )
}
