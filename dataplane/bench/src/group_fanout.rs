//! `group-fanout`: one group of G members (created over `POST /v1/groups`), D of them
//! connected with one device each, S sender devices sending at an open-loop rate; the latency
//! of every delivery, from the message's intended send time.

use super::progress;
use super::receiver::{ReceiverOutcome, ReceiverPlan, Redial, run_receiver};
use super::report::Report;
use super::sender::{Pace, SenderOutcome, SenderPlan, Target, run_sender};
use super::stats::{Live, Phase};
use super::wire::{Endpoint, Gateways, PushOption};
use super::{CommonArgs, TokenMinter, run_id};
use clap::Args;
use courier_client::HttpApi;
use courier_proto::Sender;
use futures::stream::{self, StreamExt, TryStreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, Clone, Args)]
pub struct GroupFanoutArgs {
    /// Members of the group.
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Members with a connected device (default: all).
    #[arg(long)]
    pub devices: Option<usize>,
    /// Sending devices (members 0..S, each on a second device).
    #[arg(long, default_value_t = 1)]
    pub senders: usize,
    /// Total messages per second into the group (open loop).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Size of each text body, bytes.
    #[arg(long, default_value_t = 32)]
    pub body_bytes: usize,
    /// Connection attempts in flight while the devices connect.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Spread connections over 127.0.0.1..127.0.0.K (loopback servers).
    #[arg(long, default_value_t = 4)]
    pub source_addrs: usize,
    #[command(flatten)]
    pub push: PushOption,
}

/// Users per membership request (the server refuses more than 1,000 per request).
const MEMBERS_PER_REQUEST: usize = 1000;

/// Creates the group as member 0 and adds the others in chunks; a clear error when the
/// server has no groups.
async fn create_group(
    endpoint: &Endpoint,
    minter: &TokenMinter,
    name: &str,
    members: &[String],
) -> anyhow::Result<String> {
    let api = HttpApi::new(&endpoint.http_base(), &minter.token(&members[0], "admin")?)?;
    let others = &members[1..];
    let first = &others[..others.len().min(MEMBERS_PER_REQUEST - 1)];
    let body = serde_json::json!({ "name": name, "members": first });
    let conversation = match api.post("/v1/groups", &body).await? {
        (201, body) => body["conversation_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("POST /v1/groups: no conversation_id in {body}"))?,
        (404 | 405, _) => {
            anyhow::bail!("this server does not support groups (POST /v1/groups answered 404)")
        }
        (status, body) => anyhow::bail!("POST /v1/groups answered {status}: {body}"),
    };
    for chunk in others[first.len()..].chunks(MEMBERS_PER_REQUEST) {
        api.add_members(&conversation, chunk).await?;
    }
    Ok(conversation)
}

pub async fn run(common: &CommonArgs, args: GroupFanoutArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.members > 0, "--members must be at least 1");
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    let devices = args.devices.unwrap_or(args.members).min(args.members);
    let senders = args.senders.clamp(1, args.members);
    let gateways = Gateways::resolve(&common.url, common.protocol.encoding()).await?;
    let minter = TokenMinter::from_args(common)?;
    let run = run_id();
    let mut report = Report::new("group-fanout", common);
    report.param("members", args.members);
    report.param("devices", devices);
    report.param("senders", senders);
    report.param("rate", args.rate);
    report.param("push_provider", args.push.push_provider.clone());
    report.param("duration_secs", common.duration.as_secs_f64());

    let members: Vec<String> = (0..args.members).map(|i| format!("b{run}g{i}")).collect();
    let set_up = Instant::now();
    let conversation =
        create_group(gateways.first(), &minter, &format!("bench {run}"), &members).await?;
    report.metric("group_setup_secs", set_up.elapsed().as_secs_f64());

    let connecting = Instant::now();
    let http = reqwest::Client::new();
    let bar = progress::bar(devices as u64, "devices", common.no_progress);
    let receivers: Vec<_> = stream::iter(0..devices)
        .map(|i| {
            let (endpoint, minter, member, bar) = (gateways.of(i), &minter, &members[i], &bar);
            let (push, http) = (&args.push, &http);
            async move {
                let token = minter.token(member, "d")?;
                let local = endpoint.source_addr(i, args.source_addrs);
                let connected = push.connect(http, endpoint, &token, local).await?;
                bar.inc(1);
                anyhow::Ok(connected)
            }
        })
        .buffered(args.concurrency.max(1))
        .try_collect()
        .await?;
    bar.finish_and_clear();
    report.metric("devices_synced_secs", connecting.elapsed().as_secs_f64());
    let sender_connections = futures::future::try_join_all((0..senders).map(|j| {
        let (endpoint, minter, member) = (gateways.of(j), &minter, &members[j]);
        let (push, http) = (&args.push, &http);
        async move {
            let token = minter.token(member, "s")?;
            let (writer, reader, _) = push.connect(http, endpoint, &token, None).await?;
            anyhow::Ok((writer, reader))
        }
    }))
    .await?;

    let live = Arc::new(Live::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    let mut receiver_tasks = Vec::new();
    for (i, (writer, reader, cursors)) in receivers.into_iter().enumerate() {
        let endpoint = gateways.of(i);
        let plan = ReceiverPlan {
            // The group's events so far, read in the catch-up on connecting.
            cursors,
            ack: true,
            ack_each_event: false,
            until_sync_done: false,
            redial: Some(Redial {
                endpoint: endpoint.clone(),
                token: minter.token(&members[i], "d")?,
                local: endpoint.source_addr(i, args.source_addrs),
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
    let start = Instant::now() + Duration::from_millis(20);
    let mut sender_tasks = Vec::new();
    for (i, (writer, reader)) in sender_connections.into_iter().enumerate() {
        let pace = Pace::OpenLoop {
            start,
            interval: Duration::from_secs_f64(senders as f64 / args.rate),
        };
        let plan = SenderPlan {
            targets: vec![Target::Conversation(conversation.clone())],
            count: None,
            pace: pace.staggered(i, senders),
            max_in_flight: 10_000,
            body_bytes: args.body_bytes,
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
        sender_tasks.push(tokio::spawn(task));
    }

    let bar = progress::timed_phase(start, common.duration, common.no_progress, |_| {
        format!(
            "{} sent, {} delivered",
            Live::get(&live.acked),
            Live::get(&live.delivered)
        )
    })
    .await;
    let measured = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let _ = phase_tx.send(Phase::Drain);
    let drain_start = Instant::now();
    let drain_end = drain_start + common.drain_timeout;
    loop {
        let senders_done = Live::get(&live.senders_done) == senders as u64;
        let expected = Live::get(&live.acked) * devices as u64;
        if (senders_done && Live::get(&live.delivered) >= expected) || Instant::now() >= drain_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_secs = drain_start.elapsed().as_secs_f64();
    let _ = phase_tx.send(Phase::Stop);

    let mut sent = SenderOutcome::default();
    let mut acked = Vec::with_capacity(senders);
    for (j, task) in sender_tasks.into_iter().enumerate() {
        let outcome = task.await?;
        let from = Sender {
            user: members[j].clone(),
            device: "s".into(),
        };
        acked.push((from, outcome.acked));
        sent.merge(&outcome);
    }
    let mut received = ReceiverOutcome::default();
    let (mut closed, mut lost) = (0u64, 0);
    for task in receiver_tasks {
        let (outcome, _, _) = task.await?;
        closed += u64::from(outcome.closed.is_some());
        // Member by member and sender by sender: a surplus never hides a loss.
        lost += outcome.missing(&acked);
        received.merge(&outcome);
    }
    let expected = sent.acked * devices as u64;
    report.metric("sent_msgs_per_sec", sent.acked as f64 / measured);
    report.metric(
        "deliveries_per_sec",
        received.delivered as f64 / (measured + drain_secs),
    );
    report.metric("drain_secs", drain_secs);
    report.latency("send_ack", &sent.send_ack);
    report.latency("send_lateness", &sent.send_lateness);
    report.latency("delivery", &received.delivery);
    sent.report_correctness(&mut report);
    for (name, value) in [
        ("deliveries_expected", expected),
        ("delivered", received.delivered),
        ("redelivered", received.redelivered),
        ("stored_twice", received.stored_twice),
        ("gaps", received.gaps),
        ("lost", lost),
        ("connections_lost", closed),
        ("receiver_reconnects", received.reconnects),
    ] {
        report.count(name, value);
    }
    if lost > 0 {
        report.problem(format!("{lost} deliveries missing after the drain timeout"));
    }
    received.report_problems(&mut report);
    report.errors = sent.errors.0;
    for (code, n) in received.errors.0 {
        *report.errors.entry(code).or_default() += n;
    }
    Ok(report)
}
