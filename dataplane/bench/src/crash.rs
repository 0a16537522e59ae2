//! `crash`: the durability check as a scenario. Starts a local `courier serve` (`--server-bin`,
//! `--data-dir`), sends from several devices as fast as a window allows, SIGKILLs the server
//! mid-loop, restarts it on the same data directory and checks that every `sent` it gave is
//! stored with the same seq, that seqs are dense up to each conversation's head, that nothing
//! is duplicated, and that a message sent after the restart takes the seq after the head.

use super::report::Report;
use super::sender::{AckedSend, Pace, SenderOutcome, SenderPlan, Target, run_sender};
use super::stats::{Live, Phase};
use super::wire::{Endpoint, connect_synced};
use super::{CommonArgs, TokenMinter, progress, run_id};
use anyhow::Context;
use clap::Args;
use courier_client::Client;
use courier_proto::{Body, EventPayload};
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
    /// The conversation's head seq, as the restarted server reports it.
    head_seq: u64,
    stored: u64,
    lost: u64,
    moved: u64,
    duplicates: u64,
    /// Holes in the seqs from 1 to the head, each run of missing seqs counted once.
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
        verdict.head_seq = page.head_seq;
        if page.events.is_empty() || after >= page.head_seq {
            break;
        }
    }
    // Seqs up to the head the server gave but holds no event for (a head made durable
    // without its events): every client waits on them forever.
    if after < verdict.head_seq {
        verdict.gaps += 1;
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

/// Sends one message into `conversation` and says whether it took the seq after `head_seq`,
/// the head the restarted server reports: a sequencer restarted from a stale head gives it a
/// seq already taken.
async fn next_seq_follows_head(
    client: &mut Client,
    conversation: &str,
    head_seq: u64,
) -> anyhow::Result<bool> {
    let target = courier_client::Target::Conversation(conversation.to_owned());
    let body = Body::Text("after the restart".into());
    let sent = client
        .send_with_retry(target, "after-restart", body)
        .await
        .with_context(|| format!("cannot send into {conversation} after the restart"))?;
    // A retry (after `unavailable`) of an attempt that landed is answered `duplicate`, with the
    // seq that attempt took: the seq alone says whether it followed the head.
    Ok(sent.seq == head_seq + 1)
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
        async move {
            let (writer, reader, _) =
                connect_synced(endpoint, &minter.token(&user, "d")?, None).await?;
            anyhow::Ok((writer, reader))
        }
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
    let mut sent = SenderOutcome::default();
    let mut acked: Vec<Vec<AckedSend>> = Vec::new();
    for task in tasks {
        let outcome = task.await?;
        sent.merge(&outcome);
        acked.push(outcome.acked_list);
    }

    let restart = Instant::now();
    let server = LocalServer::start(&args.server_bin, &data_dir, &args.server_args)?;
    let restart_secs = restart.elapsed().as_secs_f64();
    let mut totals = Verdict::default();
    let mut stale_heads = 0;
    for (i, list) in acked.iter().enumerate() {
        let user = sender_user(i);
        let token = minter.token(&user, "verify")?;
        let mut client = Client::connect(&server.url(), &token, endpoint.encoding).await?;
        let v = verify(&mut client, (&user, "d"), list).await?;
        if let Some(first) = list.first()
            && !next_seq_follows_head(&mut client, &first.conversation_id, v.head_seq).await?
        {
            stale_heads += 1;
        }
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
        sent.acked as f64 / load_secs,
    );
    report.metric("restart_secs", restart_secs);
    sent.report_correctness(&mut report);
    let counts = BTreeMap::from([
        ("in_flight_at_kill", sent.unacked),
        ("stored", totals.stored),
        ("stored_unacked", totals.stored_unacked),
        ("lost", totals.lost),
        ("seq_changed", totals.moved),
        ("duplicates", totals.duplicates),
        ("gaps", totals.gaps),
        ("stale_heads", stale_heads),
    ]);
    for (name, value) in counts {
        report.count(name, value);
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
        (
            "stale_heads",
            stale_heads,
            "conversations whose next message after the restart did not take the seq after \
             the head",
        ),
    ] {
        if value > 0 {
            report.problem(format!("{value} {what} ({name})"));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::Payload;
    use courier_proto::{ClientFrame, Encoding, Event, Hello, Messages, Sender, ServerFrame};
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    fn event(seq: u64, id: &str) -> Event {
        Event {
            conversation_id: "d:x".into(),
            seq,
            server_msg_id: format!("s{seq}"),
            sender: Sender {
                user: "u".into(),
                device: "d".into(),
            },
            ts_ms: 0,
            payload: EventPayload::Message {
                body: None,
                client_msg_id: id.into(),
                reply_to: None,
                deleted: false,
            },
        }
    }

    /// A fake server whose history of `d:x` is `events` and whose head is `head_seq`;
    /// answers one connection's fetches. Returns its ws:// base URL.
    async fn fake_server(events: Vec<Event>, head_seq: u64) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            // The callback's type is tungstenite's, its large error type too.
            #[allow(clippy::result_large_err)]
            let echo = |_: &Request, mut response: Response| {
                response
                    .headers_mut()
                    .insert("sec-websocket-protocol", "courier.v1.json".parse().unwrap());
                Ok(response)
            };
            let mut ws = tokio_tungstenite::accept_hdr_async(tcp, echo)
                .await
                .unwrap();
            let send = |frame: ServerFrame| match Encoding::Json.encode_server(&frame) {
                Payload::Text(text) => Message::Text(text.into()),
                Payload::Binary(bytes) => Message::Binary(bytes.into()),
            };
            let hello = ServerFrame::Hello(Hello {
                user: "u".into(),
                device: "verify".into(),
                server_time_ms: 0,
            });
            ws.send(send(hello)).await.unwrap();
            while let Some(Ok(Message::Text(text))) = ws.next().await {
                let Ok(ClientFrame::Fetch(fetch)) = Encoding::Json.decode_client(text.as_bytes())
                else {
                    continue;
                };
                let after = fetch.after_seq.unwrap_or(0);
                let limit = fetch.limit.unwrap_or(100) as usize;
                let page: Vec<Event> = events
                    .iter()
                    .filter(|e| e.seq > after)
                    .take(limit)
                    .cloned()
                    .collect();
                let reply = ServerFrame::Messages(Messages {
                    reference: fetch.reference,
                    conversation_id: fetch.conversation_id,
                    events: page,
                    head_seq,
                });
                ws.send(send(reply)).await.unwrap();
            }
        });
        format!("ws://{addr}")
    }

    fn acked(ids_seqs: &[(&str, u64)]) -> Vec<AckedSend> {
        ids_seqs
            .iter()
            .map(|(id, seq)| AckedSend {
                client_msg_id: id.to_string(),
                conversation_id: "d:x".into(),
                seq: *seq,
            })
            .collect()
    }

    async fn verdict(events: Vec<Event>, head_seq: u64, acked: &[AckedSend]) -> Verdict {
        let url = fake_server(events, head_seq).await;
        let mut client = Client::connect(&url, "t", Encoding::Json).await.unwrap();
        verify(&mut client, ("u", "d"), acked).await.unwrap()
    }

    /// Sanity: the fake works and an acknowledged message missing is `lost`.
    #[tokio::test]
    async fn an_acked_message_missing_is_lost() {
        let events = vec![event(1, "0"), event(2, "1")];
        let v = verdict(events, 2, &acked(&[("0", 1), ("1", 2), ("2", 3)])).await;
        assert_eq!(v.lost, 1);
    }

    /// The restarted server says the conversation's head is 5 but holds events 1-3 only:
    /// seqs 4 and 5 (sends in flight at the kill, whose head was made durable without their
    /// events) are holes every client waits on forever. `verify` stops at the last event and
    /// reports no gap.
    #[tokio::test]
    async fn holes_between_the_last_event_and_the_head_are_gaps() {
        let events = vec![event(1, "0"), event(2, "1"), event(3, "2")];
        let v = verdict(events, 5, &acked(&[("0", 1), ("1", 2), ("2", 3)])).await;
        assert_eq!((v.lost, v.gaps), (0, 1), "head 5, events end at 3");
    }

    /// The restarted server says the head is 2 and holds no event at all.
    #[tokio::test]
    async fn an_empty_history_below_the_head_is_a_gap() {
        let v = verdict(Vec::new(), 2, &acked(&[("0", 1), ("1", 2)])).await;
        assert_eq!((v.lost, v.gaps), (2, 1));
    }
}
