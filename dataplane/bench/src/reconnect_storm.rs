//! `reconnect-storm`: N devices, each with M messages sent to it while it was offline, all
//! connect at once; how long until every device reached `sync_done` with its M events, and
//! the per-device distribution. The devices are new, or with `--returning` were online once
//! before (a reconnect after a gateway restart).

use super::metrics::Scrape;
use super::progress;
use super::receiver::{ReceiverOutcome, ReceiverPlan, run_receiver};
use super::report::Report;
use super::sender::{Pace, SenderOutcome, SenderPlan, Target, run_sender};
use super::stats::{Latency, Live, Phase};
use super::wire::{Cursors, Gateways, connect_synced};
use super::{CommonArgs, TokenMinter, run_id};
use anyhow::Context;
use clap::Args;
use futures::future::try_join_all;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, Clone, Args)]
pub struct ReconnectStormArgs {
    /// Devices that reconnect at once (one user each).
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Messages pending for each device.
    #[arg(long, default_value_t = 10)]
    pub pending: u64,
    /// Helper connections that send the pending messages beforehand.
    #[arg(long, default_value_t = 8)]
    pub senders: usize,
    /// Sends awaiting `sent` per helper.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Spread connections over 127.0.0.1..127.0.0.K (loopback servers).
    #[arg(long, default_value_t = 4)]
    pub source_addrs: usize,
    /// Devices that were online before, as after a gateway restart or a network drop: each
    /// first gets one message, connects, acknowledges it and leaves, so that its device
    /// record, conversation and cursor exist when the pending messages are sent. Without it,
    /// every device connects for the first time, and its first record is written during the
    /// storm (both cost about the same: `docs/benchmarks.md`, "The load generator's port
    /// search").
    #[arg(long)]
    pub returning: bool,
    /// A command run with `sh -c` once the pending messages are sent, before the storm: one
    /// that restarts the server, so that the storm is a restart's (the devices connect once
    /// every gateway answers `/readyz` again).
    #[arg(long, value_name = "COMMAND")]
    pub restart_with: Option<String>,
}

/// How long the gateways have to answer `/readyz` after `--restart-with`.
const READY_AFTER_RESTART: Duration = Duration::from_secs(120);

pub async fn run(common: &CommonArgs, args: ReconnectStormArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.devices > 0, "--devices must be at least 1");
    let helpers = args.senders.clamp(1, args.devices);
    let gateways = Gateways::resolve(&common.url, common.protocol.encoding()).await?;
    let minter = TokenMinter::from_args(common)?;
    let fleet = Fleet {
        gateways: &gateways,
        minter: &minter,
        run: run_id(),
        devices: args.devices,
        helpers,
        no_progress: common.no_progress,
    };
    let mut report = Report::new("reconnect-storm", common);
    report.param("devices", args.devices);
    report.param("pending", args.pending);
    report.param("senders", helpers);
    report.param("returning", args.returning);
    report.param("restarted", args.restart_with.is_some());

    // 0. With --returning, every device is online once: one message, read and acknowledged,
    // where its catch-up in the storm starts from.
    let mut cursors = Vec::new();
    if args.returning {
        fleet.send(1, args.window, "first").await?;
        let online = fleet
            .connect(args.source_addrs, args.devices as u64, &[])
            .await;
        cursors = online
            .into_iter()
            .filter_map(|device| device.ok().filter(|outcome| outcome.delivered == 1))
            .map(|outcome| outcome.highest)
            .collect();
        anyhow::ensure!(
            cursors.len() == args.devices,
            "only {} of {} devices were online once with their first message",
            cursors.len(),
            args.devices
        );
    }

    // 1. Pending messages, sent while the devices are offline.
    let total = args.devices as u64 * args.pending;
    let presend_start = Instant::now();
    fleet.send(args.pending, args.window, "d").await?;
    report.metric(
        "presend_msgs_per_sec",
        total as f64 / presend_start.elapsed().as_secs_f64(),
    );

    // With --restart-with, the server restarts with the messages pending.
    if let Some(command) = &args.restart_with {
        restart(command, &gateways).await?;
    }

    // 2. The storm: every device connects at once and reads its catch-up.
    let reads_before = EventReads::fetch(&gateways).await;
    let storm_start = Instant::now();
    let storm = fleet.connect(args.source_addrs, total, &cursors).await;
    let mut per_device = Latency::new();
    let mut received = ReceiverOutcome::default();
    let (mut synced, mut lost, mut all_synced) = (0u64, 0, 0f64);
    for device in storm {
        match device {
            Ok(outcome) => {
                if let Some(at) = outcome.sync_done_at {
                    let took = at.saturating_duration_since(storm_start);
                    per_device.record(took);
                    all_synced = all_synced.max(took.as_secs_f64());
                    synced += 1;
                }
                lost += args.pending.saturating_sub(outcome.delivered);
                received.merge(&outcome);
                if let Some(why) = outcome.closed {
                    received.errors.add("connection_lost");
                    tracing::debug!("device lost its connection: {why}");
                }
            }
            Err(e) => {
                received.errors.add("connect");
                lost += args.pending;
                tracing::debug!("device could not connect: {e:#}");
            }
        }
    }

    report.metric("all_synced_secs", all_synced);
    report.latency("time_to_sync_done", &per_device);
    report.count("devices", args.devices as u64);
    report.count("synced", synced);
    report.count("events_expected", total);
    report.count("events_received", received.delivered);
    report.count("lost", lost);
    report.count("gaps", received.gaps);
    report.count("stored_twice", received.stored_twice);
    if let (Some(before), Some(after)) = (reads_before, EventReads::fetch(&gateways).await) {
        after.report_since(&before, &mut report);
    }
    if lost > 0 {
        report.problem(format!(
            "{lost} pending messages were not delivered in catch-up"
        ));
    }
    if synced < args.devices as u64 {
        report.problem(format!(
            "{} of {} devices never reached sync_done",
            args.devices as u64 - synced,
            args.devices
        ));
    }
    received.report_problems(&mut report);
    report.errors = received.errors.0;
    Ok(report)
}

/// The scenario's devices (one user each) and the helpers that write to them.
struct Fleet<'a> {
    gateways: &'a Gateways,
    minter: &'a TokenMinter,
    run: String,
    devices: usize,
    helpers: usize,
    no_progress: bool,
}

impl Fleet<'_> {
    fn device_user(&self, i: usize) -> String {
        format!("b{}c{i}", self.run)
    }

    /// Sends `per_device` messages to every device, each device always from the same helper
    /// user (so into the same direct conversation), and waits for every `sent`. Each sending
    /// round uses helper devices of its own (`device`): client message ids are counted per
    /// sender, and a round that reused another's device would send duplicates.
    async fn send(&self, per_device: u64, window: usize, device: &str) -> anyhow::Result<()> {
        if per_device == 0 {
            return Ok(());
        }
        let connections = try_join_all((0..self.helpers).map(|j| {
            let endpoint = self.gateways.of(j);
            let user = format!("b{}h{j}", self.run);
            async move {
                let token = self.minter.token(&user, device)?;
                let (writer, reader, _) = connect_synced(endpoint, &token, None).await?;
                anyhow::Ok((writer, reader))
            }
        }))
        .await?;
        let live = Arc::new(Live::default());
        let (_phase_tx, phase_rx) = watch::channel(Phase::Run);
        let mut tasks = Vec::new();
        for (j, (writer, reader)) in connections.into_iter().enumerate() {
            let targets: Vec<Target> = (j..self.devices)
                .step_by(self.helpers)
                .map(|i| Target::User(self.device_user(i)))
                .collect();
            let plan = SenderPlan {
                count: Some(targets.len() as u64 * per_device),
                targets,
                pace: Pace::Window(window.max(1)),
                max_in_flight: window.max(1),
                body_bytes: 32,
                track_receipts: false,
                record_acked: false,
            };
            let task = run_sender(
                writer,
                reader,
                self.gateways.encoding(),
                plan,
                live.clone(),
                phase_rx.clone(),
            );
            tasks.push(tokio::spawn(task));
        }
        let total = self.devices as u64 * per_device;
        let bar = progress::bar(total, "sent", self.no_progress);
        while Live::get(&live.senders_done) < self.helpers as u64 {
            bar.set_position(Live::get(&live.acked));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bar.finish_and_clear();
        let mut sent = SenderOutcome::default();
        for task in tasks {
            sent.merge(&task.await?);
        }
        let problems = sent.problems();
        anyhow::ensure!(
            sent.acked == total && problems.is_empty(),
            "could not send the messages to the devices: {} of {total} acknowledged ({}; errors: {:?})",
            sent.acked,
            problems.join("; "),
            sent.errors.0
        );
        Ok(())
    }

    /// Connects every device at once; each reads its catch-up to `sync_done` and
    /// acknowledges it (progress: of `events` expected in all). Device `i` checks seqs from
    /// `cursors[i]`, from 0 if there is none (a new device). Every connection is held until
    /// all are done, then closed.
    async fn connect(
        &self,
        source_addrs: usize,
        events: u64,
        cursors: &[Cursors],
    ) -> Vec<anyhow::Result<ReceiverOutcome>> {
        let live = Arc::new(Live::default());
        let (_phase_tx, phase_rx) = watch::channel(Phase::Run);
        let mut devices = Vec::with_capacity(self.devices);
        for i in 0..self.devices {
            let endpoint = self.gateways.of(i).clone();
            let (live, phase) = (live.clone(), phase_rx.clone());
            let token = self.minter.token(&self.device_user(i), "d");
            let local = endpoint.source_addr(i, source_addrs);
            let cursors = cursors.get(i).cloned().unwrap_or_default();
            devices.push(tokio::spawn(async move {
                let (socket, _) = endpoint.connect(&token?, local).await?;
                let (writer, reader) = futures::StreamExt::split(socket);
                let plan = ReceiverPlan {
                    cursors,
                    ack: true,
                    ack_each_event: false,
                    until_sync_done: true,
                    redial: None,
                };
                anyhow::Ok(run_receiver(writer, reader, endpoint.encoding, plan, live, phase).await)
            }));
        }
        let bar = progress::bar(events, "events", self.no_progress);
        let mut outcomes = Vec::with_capacity(self.devices);
        // Held until every device is done, closed on return.
        let mut open = Vec::with_capacity(self.devices);
        for device in devices {
            bar.set_position(Live::get(&live.delivered));
            outcomes.push(match device.await {
                Ok(Ok((outcome, writer, reader))) => {
                    open.push((writer, reader));
                    Ok(outcome)
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(e.into()),
            });
        }
        bar.finish_and_clear();
        outcomes
    }
}

/// The range reads of conversations' events (catch-ups, gap fills, fetches) the gateways'
/// stores answered from their cache of recent events and from their tables, from `/metrics`;
/// `None` if one is out of reach.
#[derive(Debug, Clone, Copy)]
struct EventReads {
    from_memory: f64,
    from_store: f64,
}

impl EventReads {
    async fn fetch(gateways: &Gateways) -> Option<EventReads> {
        let mut reads = EventReads {
            from_memory: 0.0,
            from_store: 0.0,
        };
        for gateway in gateways.all() {
            let scrape = Scrape::fetch(&gateway.http_base()).await.ok()?;
            reads.from_memory += scrape.get("courier_store_event_cache_held_reads")?;
            reads.from_store += scrape.get("courier_store_event_cache_missed_reads")?;
        }
        Some(reads)
    }

    /// The reads since `before`, unless there were none (a store that keeps no such cache).
    fn report_since(&self, before: &EventReads, report: &mut Report) {
        let from_memory = (self.from_memory - before.from_memory).max(0.0) as u64;
        let from_store = (self.from_store - before.from_store).max(0.0) as u64;
        if from_memory + from_store > 0 {
            report.count("server_event_reads_from_memory", from_memory);
            report.count("server_event_reads_from_store", from_store);
        }
    }
}

/// Runs `command` and waits until every gateway answers `/readyz`.
async fn restart(command: &str, gateways: &Gateways) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("sh")
        .args(["-c", command])
        .status()
        .await
        .with_context(|| format!("--restart-with: cannot run `{command}`"))?;
    anyhow::ensure!(
        status.success(),
        "--restart-with `{command}` failed: {status}"
    );
    let deadline = Instant::now() + READY_AFTER_RESTART;
    for gateway in gateways.all() {
        let url = format!("{}/readyz", gateway.http_base());
        while !reqwest::get(&url)
            .await
            .is_ok_and(|answer| answer.status().is_success())
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{url} did not answer within {READY_AFTER_RESTART:?} of `{command}`"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}
