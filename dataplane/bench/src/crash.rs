//! `crash`: the durability check as a scenario. Starts a local `courier serve` (`--server-bin`,
//! `--data-dir`), sends from several devices as fast as a window allows, SIGKILLs the server
//! mid-loop, restarts it on the same data directory and checks that every `sent` it gave is
//! stored with the same seq, that seqs are dense and that nothing is duplicated.

use super::report::Report;
use super::sender::{AckedSend, Pace, SenderPlan, Target, run_sender};
use super::stats::{Live, Phase};
use super::wire::{Endpoint, connect_synced};
use super::{CommonArgs, TokenMinter, progress, run_id};
use anyhow::Context;
use clap::Args;
use courier_client::Client;
use courier_proto::EventPayload;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Longest wait for the server's ready line.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Args)]
pub struct CrashArgs {
    /// The `courier` binary to start (`serve --listen 127.0.0.1:0 --data-dir DIR`).
    #[arg(long)]
    pub server_bin: PathBuf,
    /// Sending devices, one conversation each.
    #[arg(long, default_value_t = 4)]
    pub pairs: usize,
    /// Sends awaiting `sent` per device.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// SIGKILL once this many sends were acknowledged (or when --duration is over).
    #[arg(long, default_value_t = 2000)]
    pub kill_after: u64,
    /// Extra flag for the server (repeatable); rate limits are switched off by default.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
}

/// A `courier serve` child process.
struct LocalServer {
    child: Child,
    addr: SocketAddr,
}

impl LocalServer {
    fn start(bin: &Path, data_dir: &Path, extra: &[String]) -> anyhow::Result<LocalServer> {
        let mut child = Command::new(bin)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args([
                "--user-sends-per-sec",
                "0",
                "--connection-frames-per-sec",
                "0",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stderr = child.stderr.take().context("server without stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Text logs (`... courier ready on ADDR ...`) or JSON logs (`"courier ready on ADDR"`).
                if let Some(rest) = line.split("courier ready on ").nth(1) {
                    let addr = rest
                        .split(|c: char| c.is_whitespace() || c == '"')
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "the server did not print `courier ready on` within {START_TIMEOUT:?}"
                );
            }
        };
        let addr = addr
            .parse()
            .with_context(|| format!("unexpected address in the ready line: {addr}"))?;
        Ok(LocalServer { child, addr })
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// SIGKILL: no chance to flush or drain.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the restarted server holds for one conversation.
#[derive(Default)]
struct Verdict {
    stored: u64,
    lost: u64,
    moved: u64,
    duplicates: u64,
    gaps: u64,
    stored_unacked: u64,
}

/// Reads the whole conversation back and checks it against the acknowledged sends.
async fn verify(
    client: &mut Client,
    sender_device: (&str, &str),
    acked: &[AckedSend],
) -> anyhow::Result<Verdict> {
    let mut verdict = Verdict::default();
    let Some(conversation) = acked.first().map(|a| a.conversation_id.clone()) else {
        return Ok(verdict);
    };
    let mut by_id: HashMap<String, u64> = HashMap::new();
    let mut expected_seq = 1;
    let mut after = 0;
    loop {
        let page = client.fetch(&conversation, after, Some(1000)).await?;
        for event in &page.events {
            if event.seq != expected_seq {
                verdict.gaps += 1;
            }
            expected_seq = event.seq + 1;
            after = event.seq;
            if let EventPayload::Message { client_msg_id, .. } = &event.payload
                && (event.sender.user.as_str(), event.sender.device.as_str()) == sender_device
            {
                verdict.stored += 1;
                if by_id.insert(client_msg_id.clone(), event.seq).is_some() {
                    verdict.duplicates += 1;
                }
            }
        }
        if page.events.is_empty() || after >= page.head_seq {
            break;
        }
    }
    let acked_ids: HashMap<&str, u64> = acked
        .iter()
        .map(|a| (a.client_msg_id.as_str(), a.seq))
        .collect();
    for (id, seq) in &acked_ids {
        match by_id.get(*id) {
            None => verdict.lost += 1,
            Some(stored) if stored != seq => verdict.moved += 1,
            Some(_) => {}
        }
    }
    verdict.stored_unacked = by_id
        .keys()
        .filter(|id| !acked_ids.contains_key(id.as_str()))
        .count() as u64;
    Ok(verdict)
}

pub async fn run(common: &CommonArgs, args: CrashArgs) -> anyhow::Result<Report> {
    let data_dir = common
        .data_dir
        .clone()
        .context("crash needs --data-dir (where the local server keeps its data)")?;
    anyhow::ensure!(args.pairs > 0, "--pairs must be at least 1");
    let mut report = Report::new("crash", common);
    report.param("pairs", args.pairs);
    report.param("window", args.window);
    report.param("kill_after", args.kill_after);

    let mut server = LocalServer::start(&args.server_bin, &data_dir, &args.server_args)?;
    report.url = server.url();
    let minter = TokenMinter::from_args(common)?;
    let endpoint = Endpoint::resolve(&server.url(), common.protocol.encoding()).await?;
    let run = run_id();
    let sender_user = |i: usize| format!("b{run}a{i}");
    let connections = futures::future::try_join_all((0..args.pairs).map(|i| {
        let (endpoint, minter, user) = (&endpoint, &minter, sender_user(i));
        async move { connect_synced(endpoint, &minter.token(&user, "d")?, None).await }
    }))
    .await?;
    let live = Arc::new(Live::default());
    let (_phase_tx, phase_rx) = watch::channel(Phase::Run);
    let mut tasks = Vec::new();
    for (i, (writer, reader)) in connections.into_iter().enumerate() {
        let plan = SenderPlan {
            targets: vec![Target::User(format!("b{run}z{i}"))],
            count: None,
            pace: Pace::Window(args.window.max(1)),
            max_in_flight: args.window.max(1),
            body_bytes: 32,
            track_receipts: false,
            record_acked: true,
        };
        let task = run_sender(
            writer,
            reader,
            endpoint.encoding,
            plan,
            live.clone(),
            phase_rx.clone(),
        );
        tasks.push(tokio::spawn(task));
    }
    let start = Instant::now();
    let bar = progress::bar(args.kill_after, "acked before SIGKILL", common.no_progress);
    while Live::get(&live.acked) < args.kill_after && start.elapsed() < common.duration {
        bar.set_position(Live::get(&live.acked));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bar.finish_and_clear();
    server.kill9();
    let load_secs = start.elapsed().as_secs_f64();
    let mut acked: Vec<Vec<AckedSend>> = Vec::new();
    let mut in_flight = 0;
    for task in tasks {
        let outcome = task.await?;
        in_flight += outcome.unacked;
        acked.push(outcome.acked_list);
    }
    let total_acked: u64 = acked.iter().map(|a| a.len() as u64).sum();

    let restart = Instant::now();
    let server = LocalServer::start(&args.server_bin, &data_dir, &args.server_args)?;
    let restart_secs = restart.elapsed().as_secs_f64();
    let mut totals = Verdict::default();
    for (i, list) in acked.iter().enumerate() {
        let user = sender_user(i);
        let token = minter.token(&user, "verify")?;
        let mut client = Client::connect(&server.url(), &token, endpoint.encoding).await?;
        let v = verify(&mut client, (&user, "d"), list).await?;
        client.close().await;
        totals.stored += v.stored;
        totals.lost += v.lost;
        totals.moved += v.moved;
        totals.duplicates += v.duplicates;
        totals.gaps += v.gaps;
        totals.stored_unacked += v.stored_unacked;
    }
    drop(server);

    report.metric(
        "acked_msgs_per_sec_before_kill",
        total_acked as f64 / load_secs,
    );
    report.metric("restart_secs", restart_secs);
    let counts = BTreeMap::from([
        ("acked", total_acked),
        ("in_flight_at_kill", in_flight),
        ("stored", totals.stored),
        ("stored_unacked", totals.stored_unacked),
        ("lost", totals.lost),
        ("seq_changed", totals.moved),
        ("duplicates", totals.duplicates),
        ("gaps", totals.gaps),
    ]);
    for (name, value) in counts {
        report.count(name, value);
    }
    if total_acked == 0 {
        report.problem("no send was acknowledged before the kill".into());
    }
    for (name, value, what) in [
        (
            "lost",
            totals.lost,
            "acknowledged messages missing after restart",
        ),
        (
            "seq_changed",
            totals.moved,
            "acknowledged messages stored under another seq",
        ),
        (
            "duplicates",
            totals.duplicates,
            "client_msg_ids stored twice",
        ),
        ("gaps", totals.gaps, "holes in the seqs"),
    ] {
        if value > 0 {
            report.problem(format!("{value} {what} ({name})"));
        }
    }
    Ok(report)
}
