//! `throughput`: N pairs of devices (sender user `s<i>`, receiver user `r<i>` of this run);
//! every message goes send -> `sent` -> `event` -> delivered `ack` -> `receipt`.

use super::metrics::Scrape;
use super::progress;
use super::receiver::{ReceiverOutcome, ReceiverPlan, Redial, run_receiver};
use super::report::Report;
use super::sender::{Pace, SenderOutcome, SenderPlan, Target, run_sender};
use super::stats::{Live, Phase};
use super::wire::{Cursors, Gateways, PushOption};
use super::{CommonArgs, TokenMinter, run_id};
use clap::Args;
use courier_proto::Sender;
use futures::future::try_join_all;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// `--window`'s default: sends awaiting `sent` per sender when pacing by window (`--rate 0`).
pub const DEFAULT_WINDOW: usize = 64;

#[derive(Debug, Clone, Args)]
pub struct ThroughputArgs {
    /// Sender/receiver pairs (one direct conversation each).
    #[arg(long, default_value_t = 8)]
    pub pairs: usize,
    /// Total target rate, messages per second (open loop); 0 = as fast as `--window` allows.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// With `--rate 0`: sends awaiting `sent`, per sender.
    #[arg(long, default_value_t = DEFAULT_WINDOW)]
    pub window: usize,
    #[command(flatten)]
    pub pair_options: PairOptions,
}

/// How each pair sends and connects; shared by `throughput` and `latency-curve`.
#[derive(Debug, Clone, Args)]
pub struct PairOptions {
    /// Open loop: most sends awaiting `sent` per sender before the schedule waits.
    #[arg(long, default_value_t = 10_000)]
    pub max_in_flight: usize,
    /// Size of each text body, bytes.
    #[arg(long, default_value_t = 32)]
    pub body_bytes: usize,
    /// Spread connections over 127.0.0.1..127.0.0.K (loopback servers).
    #[arg(long, default_value_t = 1)]
    pub source_addrs: usize,
    /// Receivers acknowledge every event in its own frame, as a naive client does (by
    /// default, one ack per conversation for the events that arrived together).
    #[arg(long)]
    pub ack_each_event: bool,
    #[command(flatten)]
    pub push: PushOption,
}

pub async fn run(common: &CommonArgs, args: ThroughputArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.pairs > 0, "--pairs must be at least 1");
    anyhow::ensure!(args.rate >= 0.0, "--rate must not be negative");
    let PairOptions {
        max_in_flight,
        body_bytes,
        source_addrs,
        ack_each_event,
        push,
    } = args.pair_options;
    let gateways = Gateways::resolve(&common.url, common.protocol.encoding()).await?;
    let minter = TokenMinter::from_args(common)?;
    let run = run_id();
    let mut report = Report::new("throughput", common);
    report.param("pairs", args.pairs);
    report.param("rate", args.rate);
    report.param("window", args.window);
    report.param("body_bytes", body_bytes);
    report.param("ack_each_event", ack_each_event);
    report.param("push_provider", push.push_provider.clone());
    report.param("duration_secs", common.duration.as_secs_f64());

    let http = reqwest::Client::new();
    // Pair i: user `s<i>` sends from device `d` to user `r<i>`'s device `d`.
    let user = |i: usize, role: &str| format!("b{run}{role}{i}");
    let connect = |i: usize, role: &'static str| {
        let index = i * 2 + usize::from(role == "r");
        let (endpoint, minter, push, http) = (gateways.of(index), &minter, &push, &http);
        let user = user(i, role);
        let local = endpoint.source_addr(index, source_addrs);
        async move {
            let token = minter.token(&user, "d")?;
            let (writer, reader, _) = push.connect(http, endpoint, &token, local).await?;
            anyhow::Ok((writer, reader))
        }
    };
    let receivers = try_join_all((0..args.pairs).map(|i| connect(i, "r"))).await?;
    let senders = try_join_all((0..args.pairs).map(|i| connect(i, "s"))).await?;

    let writer_before = WriterSample::fetch(&gateways.of(0).http_base()).await;
    let live = Arc::new(Live::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    let start = Instant::now() + Duration::from_millis(20);
    let pace = if args.rate > 0.0 {
        Pace::OpenLoop {
            start,
            interval: Duration::from_secs_f64(args.pairs as f64 / args.rate),
        }
    } else {
        Pace::Window(args.window.max(1))
    };
    let mut receiver_tasks = Vec::new();
    for (i, (writer, reader)) in receivers.into_iter().enumerate() {
        let index = i * 2 + 1;
        let endpoint = gateways.of(index);
        let plan = ReceiverPlan {
            cursors: Cursors::default(), // a new user: no conversation yet
            ack: true,
            ack_each_event,
            until_sync_done: false,
            redial: Some(Redial {
                endpoint: endpoint.clone(),
                token: minter.token(&user(i, "r"), "d")?,
                local: endpoint.source_addr(index, source_addrs),
            }),
        };
        let task = run_receiver(
            writer,
            reader,
            gateways.encoding(),
            plan,
            live.clone(),
            phase_rx.clone(),
        );
        receiver_tasks.push(tokio::spawn(task));
    }
    let mut sender_tasks = Vec::new();
    for (i, (writer, reader)) in senders.into_iter().enumerate() {
        let plan = SenderPlan {
            targets: vec![Target::User(user(i, "r"))],
            count: None,
            pace: pace.staggered(i, args.pairs),
            max_in_flight: max_in_flight.max(1),
            body_bytes,
            track_receipts: true,
            record_acked: false,
        };
        let task = run_sender(
            writer,
            reader,
            gateways.encoding(),
            plan,
            live.clone(),
            phase_rx.clone(),
        );
        sender_tasks.push(tokio::spawn(task));
    }

    // Measured phase.
    let bar = progress::timed_phase(start, common.duration, common.no_progress, |elapsed| {
        format!(
            "{:.0} acked/s, {:.0} delivered/s",
            Live::get(&live.acked) as f64 / elapsed,
            Live::get(&live.delivered) as f64 / elapsed
        )
    })
    .await;
    let measured = start.elapsed().as_secs_f64();
    let (acked_at_end, delivered_at_end, receipted_at_end) = (
        Live::get(&live.acked),
        Live::get(&live.delivered),
        Live::get(&live.receipted),
    );
    bar.finish_and_clear();
    let writer_after = WriterSample::fetch(&gateways.of(0).http_base()).await;

    // Drain: senders finish their in-flight sends and wait for receipts.
    let _ = phase_tx.send(Phase::Drain);
    let drain_start = Instant::now();
    let drain_end = drain_start + common.drain_timeout;
    while Live::get(&live.senders_done) < args.pairs as u64 && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = Live::get(&live.senders_done) == args.pairs as u64;
    let drain_secs = drain_start.elapsed().as_secs_f64();
    let _ = phase_tx.send(Phase::Stop);

    let mut sent = SenderOutcome::default();
    let mut received = ReceiverOutcome::default();
    let (mut closed, mut lost) = (0, 0);
    for (i, (sender, receiver)) in sender_tasks.into_iter().zip(receiver_tasks).enumerate() {
        let (sender, (receiver, _, _)) = (sender.await?, receiver.await?);
        closed += u64::from(sender.closed.is_some()) + u64::from(receiver.closed.is_some());
        // Pair by pair: one pair's surplus never hides another's loss.
        let from = Sender {
            user: user(i, "s"),
            device: "d".into(),
        };
        lost += receiver.missing(&[(from, sender.acked)]);
        sent.merge(&sender);
        received.merge(&receiver);
    }

    report.metric("target_msgs_per_sec", args.rate);
    report.metric("acked_msgs_per_sec", acked_at_end as f64 / measured);
    report.metric("delivered_msgs_per_sec", delivered_at_end as f64 / measured);
    report.metric("receipted_msgs_per_sec", receipted_at_end as f64 / measured);
    report.metric("drain_secs", drain_secs);
    if let (Some(before), Some(after)) = (writer_before, writer_after) {
        before.report_until(&after, &mut report);
    }
    report.latency("send_ack", &sent.send_ack);
    report.send_ack_by_second = sent.send_ack_by_second.seconds_from(start);
    report.latency("send_lateness", &sent.send_lateness);
    report.latency("delivery", &received.delivery);
    report.latency("receipt", &sent.receipt);
    sent.report_correctness(&mut report);
    for (name, value) in [
        ("delivered", received.delivered),
        ("redelivered", received.redelivered),
        ("stored_twice", received.stored_twice),
        ("gaps", received.gaps),
        ("receipted", sent.receipted),
        ("lost", lost),
        ("connections_lost", closed),
        ("receiver_reconnects", received.reconnects),
    ] {
        report.count(name, value);
    }
    if lost > 0 {
        report.problem(format!(
            "{lost} acknowledged messages were not delivered within the drain timeout"
        ));
    }
    received.report_problems(&mut report);
    report.errors = sent.errors.0;
    for (code, n) in received.errors.0 {
        *report.errors.entry(code).or_default() += n;
    }
    report.count("drained", u64::from(drained));
    Ok(report)
}

/// The server's store writer (`courier_store_writer_busy_seconds_total` and the group commits
/// on `/metrics`) at one moment; `None` from a server that does not report it (a store other
/// than the embedded one, or `/metrics` out of reach).
#[derive(Debug, Clone, Copy)]
struct WriterSample {
    at: Instant,
    busy_secs: f64,
    groups: f64,
    batches: f64,
}

impl WriterSample {
    async fn fetch(http_base: &str) -> Option<WriterSample> {
        let scrape = Scrape::fetch(http_base).await.ok()?;
        Some(WriterSample {
            at: Instant::now(),
            busy_secs: scrape.get("courier_store_writer_busy_seconds")?,
            groups: scrape.get("courier_store_group_commits")?,
            batches: scrape.get("courier_store_group_commit_batches")?,
        })
    }

    /// From this sample to `after`: the writer's busy seconds per second (near 1, commits
    /// queue for it) and the batches its group commits held on average. Nothing when it made
    /// no group commit.
    fn report_until(&self, after: &WriterSample, report: &mut Report) {
        let groups = after.groups - self.groups;
        let elapsed = after.at.duration_since(self.at).as_secs_f64();
        if groups <= 0.0 || elapsed <= 0.0 {
            return;
        }
        let busy = (after.busy_secs - self.busy_secs) / elapsed;
        report.metric("server_store_writer_busy", busy);
        report.metric(
            "server_store_batches_per_group",
            (after.batches - self.batches) / groups,
        );
    }
}
