//! `reconnect-storm`: N devices, each with M messages sent to it while it was offline, all
//! connect at once; how long until every device reached `sync_done` with its M events, and
//! the per-device distribution.

use super::progress;
use super::receiver::{ReceiverPlan, run_receiver};
use super::report::Report;
use super::sender::{Pace, SenderOutcome, SenderPlan, Target, run_sender};
use super::stats::{ErrorCounts, Latency, Live, Phase};
use super::wire::{Gateways, connect_synced};
use super::{CommonArgs, TokenMinter, run_id};
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
}

pub async fn run(common: &CommonArgs, args: ReconnectStormArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.devices > 0, "--devices must be at least 1");
    let helpers = args.senders.clamp(1, args.devices);
    let gateways = Gateways::resolve(&common.url, common.protocol.encoding()).await?;
    let minter = TokenMinter::from_args(common)?;
    let run = run_id();
    let mut report = Report::new("reconnect-storm", common);
    report.param("devices", args.devices);
    report.param("pending", args.pending);
    report.param("senders", helpers);

    // 1. Pending messages, sent while the devices are offline.
    let device_user = |i: usize| format!("b{run}c{i}");
    let connections = try_join_all((0..helpers).map(|j| {
        let (endpoint, minter) = (gateways.of(j), &minter);
        let user = format!("b{run}h{j}");
        async move { connect_synced(endpoint, &minter.token(&user, "d")?, None).await }
    }))
    .await?;
    let live = Arc::new(Live::default());
    let (_phase_tx, phase_rx) = watch::channel(Phase::Run);
    let mut tasks = Vec::new();
    for (j, (writer, reader)) in connections.into_iter().enumerate() {
        let targets: Vec<Target> = (j..args.devices)
            .step_by(helpers)
            .map(|i| Target::User(device_user(i)))
            .collect();
        let plan = SenderPlan {
            count: Some(targets.len() as u64 * args.pending),
            targets,
            pace: Pace::Window(args.window.max(1)),
            max_in_flight: args.window.max(1),
            body_bytes: 32,
            track_receipts: false,
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
        tasks.push(tokio::spawn(task));
    }
    let total = args.devices as u64 * args.pending;
    let bar = progress::bar(total, "pending sent", common.no_progress);
    let presend_start = Instant::now();
    while Live::get(&live.senders_done) < helpers as u64 {
        bar.set_position(Live::get(&live.acked));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    let mut sent = SenderOutcome::default();
    for task in tasks {
        sent.merge(&task.await?);
    }
    anyhow::ensure!(
        sent.acked - sent.duplicates == total,
        "could not send the pending messages: {} of {total} acknowledged (errors: {:?})",
        sent.acked - sent.duplicates,
        sent.errors.0
    );
    report.metric(
        "presend_msgs_per_sec",
        total as f64 / presend_start.elapsed().as_secs_f64(),
    );

    // 2. The storm: every device connects at once and reads its catch-up.
    let live = Arc::new(Live::default());
    let storm_start = Instant::now();
    let mut devices = Vec::with_capacity(args.devices);
    for i in 0..args.devices {
        let (endpoint, live, phase) = (gateways.of(i).clone(), live.clone(), phase_rx.clone());
        let token = minter.token(&device_user(i), "d")?;
        let local = endpoint.source_addr(i, args.source_addrs);
        devices.push(tokio::spawn(async move {
            let (socket, _) = endpoint.connect(&token, local).await?;
            let (writer, reader) = futures::StreamExt::split(socket);
            let plan = ReceiverPlan {
                ack: true,
                ack_each_event: false,
                until_sync_done: true,
                redial: None,
            };
            anyhow::Ok(run_receiver(writer, reader, endpoint.encoding, plan, live, phase).await)
        }));
    }
    let bar = progress::bar(total, "events", common.no_progress);
    let mut per_device = Latency::new();
    let mut errors = ErrorCounts::default();
    let (mut synced, mut received, mut lost, mut gaps, mut all_synced) = (0u64, 0, 0, 0, 0f64);
    let mut open = Vec::with_capacity(args.devices);
    for device in devices {
        bar.set_position(Live::get(&live.delivered));
        match device.await? {
            Ok((outcome, writer, reader)) => {
                if let Some(at) = outcome.sync_done_at {
                    let took = at.saturating_duration_since(storm_start);
                    per_device.record(took);
                    all_synced = all_synced.max(took.as_secs_f64());
                    synced += 1;
                }
                received += outcome.delivered;
                lost += args.pending.saturating_sub(outcome.delivered);
                gaps += outcome.gaps;
                errors.merge(&outcome.errors);
                if let Some(why) = outcome.closed {
                    errors.add("connection_lost");
                    tracing::debug!("device lost its connection: {why}");
                }
                open.push((writer, reader)); // held until every device is done
            }
            Err(e) => {
                errors.add("connect");
                lost += args.pending;
                tracing::debug!("device could not connect: {e:#}");
            }
        }
    }
    bar.finish_and_clear();
    drop(open);

    report.metric("all_synced_secs", all_synced);
    report.latency("time_to_sync_done", &per_device);
    report.count("devices", args.devices as u64);
    report.count("synced", synced);
    report.count("events_expected", total);
    report.count("events_received", received);
    report.count("lost", lost);
    report.count("gaps", gaps);
    report.errors = errors.0;
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
    if gaps > 0 {
        report.problem(format!("{gaps} seq gaps in catch-up"));
    }
    Ok(report)
}
