//! `connections`: open N idle connections, spread over source addresses 127.0.0.1..127.0.0.K
//! (past the ~28,000 ephemeral ports of one address) and over P client processes (one process
//! may hold at most 20,000 open files here), hold them, and report the server's memory per
//! connection (from `/metrics`) and the connect rate.
//!
//! The parent re-executes its own binary (`<exe> bench connections --worker-index I ...`) for
//! every process. A worker connects its share, prints one JSON line (`WorkerReport`) on
//! stdout, holds its connections until its stdin closes, then exits.

use super::metrics::Scrape;
use super::progress;
use super::report::Report;
use super::stats::{ErrorCounts, Latency};
use super::wire::{self, Endpoint, Incoming};
use super::{CommonArgs, TokenMinter, run_id};
use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Args)]
pub struct ConnectionsArgs {
    /// Idle connections in total.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Client processes sharing them (each may hold at most ~20,000 open files).
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// Spread connections over 127.0.0.1..127.0.0.K (loopback servers).
    #[arg(long, default_value_t = 4)]
    pub source_addrs: usize,
    /// Connection attempts in flight per process.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// How long to hold the connections open once all are up.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// Internal: run as worker I of a parent bench (connect, report, hold until stdin closes).
    #[arg(long, hide = true)]
    pub worker_index: Option<usize>,
    /// Internal: the parent's run id.
    #[arg(long, hide = true)]
    pub run: Option<String>,
    /// Internal: the first connection index of this worker.
    #[arg(long, hide = true, default_value_t = 0)]
    pub first: usize,
}

/// What a worker prints once its connections are up.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    pub connected: u64,
    pub failed: u64,
    pub connect_secs: f64,
    pub connect_ms: Option<super::report::LatencySummary>,
    pub errors: std::collections::BTreeMap<String, u64>,
}

/// The one server whose memory per connection this scenario measures.
fn one_server(common: &CommonArgs) -> anyhow::Result<&str> {
    match common.url.as_slice() {
        [url] => Ok(url),
        _ => {
            anyhow::bail!("connections measures one server's memory per connection: give one --url")
        }
    }
}

/// Connects `count` devices (indices `first..first+count`), keeps them open and reading.
async fn connect_all(
    common: &CommonArgs,
    args: &ConnectionsArgs,
    run: &str,
    count: usize,
    show_progress: bool,
) -> anyhow::Result<(WorkerReport, Vec<tokio::task::JoinHandle<()>>)> {
    let endpoint =
        Arc::new(Endpoint::resolve(one_server(common)?, common.protocol.encoding()).await?);
    let minter = Arc::new(TokenMinter::from_args(common)?);
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let bar = progress::bar(
        count as u64,
        "connections",
        !show_progress || common.no_progress,
    );
    let start = Instant::now();
    let source_addrs = args.source_addrs;
    let mut attempts = Vec::with_capacity(count);
    for index in args.first..args.first + count {
        let (endpoint, minter, permits, bar) = (
            endpoint.clone(),
            minter.clone(),
            permits.clone(),
            bar.clone(),
        );
        let user = format!("b{run}c{index}");
        attempts.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let began = Instant::now();
            let local = endpoint.source_addr(index, source_addrs);
            let token = minter.token(&user, "d")?;
            let (socket, _) = endpoint.connect(&token, local).await?;
            bar.inc(1);
            anyhow::Ok((socket, began.elapsed()))
        }));
    }
    let mut report = WorkerReport::default();
    let mut errors = ErrorCounts::default();
    let mut latency = Latency::new();
    let mut holders = Vec::with_capacity(count);
    for attempt in attempts {
        match attempt.await? {
            Ok((socket, took)) => {
                latency.record(took);
                report.connected += 1;
                let encoding = endpoint.encoding;
                // Keep reading (answers pings, drops catch-up and live frames) until closed.
                holders.push(tokio::spawn(async move {
                    let (_writer, mut reader) = socket.split();
                    while let Incoming::Frame(_) | Incoming::Control =
                        wire::decode(encoding, reader.next().await)
                    {}
                }));
            }
            Err(e) => {
                report.failed += 1;
                errors.add(&error_kind(&e));
            }
        }
    }
    bar.finish_and_clear();
    report.connect_secs = start.elapsed().as_secs_f64();
    report.connect_ms = Some(latency.summary());
    report.errors = errors.0;
    Ok((report, holders))
}

/// A short name for a connect failure, for the error table.
fn error_kind(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    if text.contains("HTTP") {
        "rejected".into()
    } else if text.contains("file") || text.contains("Too many open files") {
        "out_of_files".into()
    } else if text.contains("bind") || text.contains("Address") {
        "address".into()
    } else if text.contains("within") {
        "timeout".into()
    } else {
        "connect".into()
    }
}

/// The parent, or (with `--worker-index`) a worker. A worker returns `None`.
pub async fn run(common: &CommonArgs, args: ConnectionsArgs) -> anyhow::Result<Option<Report>> {
    if args.worker_index.is_some() {
        worker(common, &args).await?;
        return Ok(None);
    }
    parent(common, args).await.map(Some)
}

async fn worker(common: &CommonArgs, args: &ConnectionsArgs) -> anyhow::Result<()> {
    let run = args
        .run
        .clone()
        .context("--run is required with --worker-index")?;
    let (report, holders) = connect_all(common, args, &run, args.connections, false).await?;
    println!("{}", serde_json::to_string(&report)?);
    // Hold until the parent closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    })
    .await?;
    for holder in holders {
        holder.abort();
    }
    Ok(())
}

/// One worker process: its stdin (closing it ends the worker) and its report line.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    report: std::sync::mpsc::Receiver<anyhow::Result<WorkerReport>>,
}

fn spawn_worker(
    common: &CommonArgs,
    args: &ConnectionsArgs,
    secret: &[u8],
    run: &str,
    index: usize,
    first: usize,
    count: usize,
) -> anyhow::Result<Worker> {
    let exe = std::env::current_exe().context("cannot find the bench's own executable")?;
    let mut child = Command::new(&exe)
        .arg("bench")
        .args([
            "--url",
            one_server(common)?,
            "--protocol",
            common.protocol.name(),
        ])
        .arg("connections")
        .args(["--connections", &count.to_string()])
        .args(["--source-addrs", &args.source_addrs.to_string()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .args(["--worker-index", &index.to_string(), "--run", run])
        .args(["--first", &first.to_string(), "--no-progress"])
        .env(
            "COURIER_JWT_SECRET",
            String::from_utf8_lossy(secret).as_ref(),
        )
        .env_remove("COURIER_DATA_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start worker {}", exe.display()))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().context("worker without stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let result = match BufReader::new(stdout).read_line(&mut line) {
            Ok(n) if n > 0 => serde_json::from_str::<WorkerReport>(line.trim())
                .with_context(|| format!("worker printed {line:?}")),
            _ => Err(anyhow::anyhow!("worker exited without a report")),
        };
        let _ = tx.send(result);
    });
    Ok(Worker {
        child,
        stdin,
        report: rx,
    })
}

async fn parent(common: &CommonArgs, args: ConnectionsArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.processes > 0, "--processes must be at least 1");
    let endpoint = Endpoint::resolve(one_server(common)?, common.protocol.encoding()).await?;
    let minter = TokenMinter::from_args(common)?;
    let run = run_id();
    let mut report = Report::new("connections", common);
    report.param("connections", args.connections);
    report.param("processes", args.processes);
    report.param("source_addrs", args.source_addrs);
    report.param("hold_secs", args.hold.as_secs_f64());

    let before = Scrape::fetch(&endpoint.http_base()).await?;
    let start = Instant::now();
    let per = args.connections.div_ceil(args.processes);
    let mut workers = Vec::new();
    let mut first = 0;
    for index in 0..args.processes {
        let count = per.min(args.connections - first);
        if count == 0 {
            break;
        }
        workers.push(spawn_worker(
            common,
            &args,
            minter.secret(),
            &run,
            index,
            first,
            count,
        )?);
        first += count;
    }
    let bar = progress::bar(workers.len() as u64, "processes ready", common.no_progress);
    let mut reports = Vec::new();
    for worker in &workers {
        let receiver = &worker.report;
        let result = tokio::task::block_in_place(|| {
            receiver
                .recv()
                .map_err(|_| anyhow::anyhow!("worker ended without a report"))
        })
        .and_then(|r| r);
        bar.inc(1);
        reports.push(result);
    }
    bar.finish_and_clear();
    let all_up = start.elapsed().as_secs_f64();
    tokio::time::sleep(args.hold).await;
    let after = Scrape::fetch(&endpoint.http_base()).await;
    for worker in &mut workers {
        worker.stdin.take(); // closing stdin ends the worker
    }
    for worker in &mut workers {
        let _ = tokio::task::block_in_place(|| worker.child.wait());
    }
    let after = after?;

    let mut connected = 0;
    let mut failed = 0;
    let mut slowest = 0f64;
    for result in reports {
        match result {
            Ok(r) => {
                connected += r.connected;
                failed += r.failed;
                slowest = slowest.max(r.connect_secs);
                for (code, n) in r.errors {
                    *report.errors.entry(code).or_default() += n;
                }
            }
            Err(e) => {
                failed += 1;
                report.problem(format!("a worker failed: {e:#}"));
            }
        }
    }
    let gauge = |s: &Scrape, name: &str| s.get(name).unwrap_or(0.0);
    let conns_delta = gauge(&after, "courier_gateway_connections")
        - gauge(&before, "courier_gateway_connections");
    let rss_delta = gauge(&after, "courier_process_resident_memory_bytes")
        - gauge(&before, "courier_process_resident_memory_bytes");
    report.metric("connect_per_sec", connected as f64 / slowest.max(1e-6));
    report.metric("all_up_secs", all_up);
    report.metric("server_connections_delta", conns_delta);
    report.metric(
        "server_rss_before_bytes",
        gauge(&before, "courier_process_resident_memory_bytes"),
    );
    report.metric(
        "server_rss_after_bytes",
        gauge(&after, "courier_process_resident_memory_bytes"),
    );
    if conns_delta > 0.0 {
        report.metric("server_bytes_per_connection", rss_delta / conns_delta);
    }
    report.count("connected", connected);
    report.count("failed", failed);
    if failed > 0 {
        report.problem(format!(
            "{failed} of {} connections failed",
            args.connections
        ));
    }
    Ok(report)
}
