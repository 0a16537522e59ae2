//! A receiving device: reads events, measures delivery latency from the intended send time
//! written in the body, checks per-conversation order, and acknowledges (delivered,
//! cumulative) what it got, batching the acks of frames that arrived together.

use super::sender::intended_time;
use super::stats::{ErrorCounts, Latency, Live, Phase};
use super::wire::{self, Endpoint, Incoming, Reader, Writer};
use courier_proto::{Ack, AckKind, Body, ClientFrame, Encoding, EventPayload, ServerFrame};
use foldhash::HashMap;
use futures::{FutureExt, SinkExt, StreamExt};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Frames handled before the pending acks are written.
const ACK_BATCH: usize = 256;

/// Connection attempts after the server closed a receiver (e.g. 1013, slow consumer).
const REDIAL_ATTEMPTS: u32 = 5;

/// What a receiver does.
#[derive(Debug, Clone)]
pub struct ReceiverPlan {
    /// Send delivered acks.
    pub ack: bool,
    /// Acknowledge every event in its own frame, written at once, as a naive client does;
    /// otherwise one ack per conversation for the frames that arrived together.
    pub ack_each_event: bool,
    /// End at the first `sync_done` (a reconnecting device's catch-up).
    pub until_sync_done: bool,
    /// Reconnect like a real client when the connection ends (the catch-up from the
    /// device's cursor brings what was missed).
    pub redial: Option<Redial>,
}

/// How to connect the device again.
#[derive(Debug, Clone)]
pub struct Redial {
    pub endpoint: Endpoint,
    pub token: String,
    pub local: Option<IpAddr>,
}

impl Redial {
    async fn connect(&self) -> Result<(Writer, Reader), String> {
        let mut last = String::new();
        for attempt in 0..REDIAL_ATTEMPTS {
            match self.endpoint.connect(&self.token, self.local).await {
                Ok((socket, _)) => return Ok(socket.split()),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
        }
        Err(format!("reconnect failed: {last}"))
    }
}

/// What a receiver saw.
#[derive(Default)]
pub struct ReceiverOutcome {
    pub delivery: Latency,
    /// New message events (seq above everything seen before in its conversation).
    pub delivered: u64,
    /// Events at or below a seq already seen (allowed: delivery is at-least-once).
    pub redelivered: u64,
    /// Times a conversation's seq jumped by more than one.
    pub gaps: u64,
    pub errors: ErrorCounts,
    pub sync_done_at: Option<Instant>,
    /// Highest seq seen per conversation.
    pub highest: HashMap<String, u64>,
    pub closed: Option<String>,
    /// Times the connection ended and was re-established.
    pub reconnects: u64,
}

impl ReceiverOutcome {
    pub fn merge(&mut self, other: &ReceiverOutcome) {
        self.delivery.merge(&other.delivery);
        self.delivered += other.delivered;
        self.redelivered += other.redelivered;
        self.gaps += other.gaps;
        self.errors.merge(&other.errors);
        self.reconnects += other.reconnects;
    }
}

struct ReceiverState<'a> {
    live: &'a Live,
    acked: HashMap<String, u64>,
    out: ReceiverOutcome,
}

impl ReceiverState<'_> {
    /// Handles one frame; true at `sync_done`.
    fn on_frame(&mut self, frame: ServerFrame) -> bool {
        let now = Instant::now();
        match frame {
            ServerFrame::Event(event) => {
                let highest = self
                    .out
                    .highest
                    .entry(event.conversation_id.clone())
                    .or_default();
                if event.seq <= *highest {
                    self.out.redelivered += 1;
                    return false;
                }
                if event.seq > *highest + 1 && *highest > 0 {
                    self.out.gaps += 1;
                }
                *highest = event.seq;
                if let EventPayload::Message {
                    body: Some(Body::Text(text)),
                    ..
                } = &event.payload
                    && let Some(intended) = intended_time(text)
                {
                    self.out.delivery.record_since(intended, now);
                    self.out.delivered += 1;
                    Live::add(&self.live.delivered, 1);
                }
                false
            }
            ServerFrame::SyncDone(_) => {
                self.out.sync_done_at.get_or_insert(now);
                true
            }
            ServerFrame::Error(e) => {
                self.out.errors.add(e.code.as_str());
                false
            }
            ServerFrame::Reconnect(_) => {
                self.out.errors.add("reconnect");
                false
            }
            _ => false,
        }
    }

    /// Writes a delivered ack for every conversation that advanced.
    async fn flush_acks(&mut self, writer: &mut Writer, encoding: Encoding) -> Result<(), String> {
        let mut wrote = false;
        for (conv, &seq) in &self.out.highest {
            let acked = self.acked.entry(conv.clone()).or_default();
            if seq > *acked {
                *acked = seq;
                let frame = ClientFrame::Ack(Ack {
                    reference: None,
                    conversation_id: conv.clone(),
                    seq,
                    kind: AckKind::Delivered,
                });
                writer
                    .feed(wire::encode(encoding, &frame))
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                wrote = true;
            }
        }
        if wrote {
            writer.flush().await.map_err(|e| format!("write: {e}"))?;
        }
        Ok(())
    }
}

/// Runs one receiving device until the phase says stop, the connection ends, or (with
/// `until_sync_done`) its catch-up is over. Returns the writer too, so the caller may keep
/// the connection open.
pub async fn run_receiver(
    mut writer: Writer,
    mut reader: Reader,
    encoding: Encoding,
    plan: ReceiverPlan,
    live: Arc<Live>,
    mut phase: watch::Receiver<Phase>,
) -> (ReceiverOutcome, Writer, Reader) {
    let mut state = ReceiverState {
        live: &live,
        acked: HashMap::default(),
        out: ReceiverOutcome::default(),
    };
    let ack_batch = if plan.ack_each_event { 1 } else { ACK_BATCH };
    'run: loop {
        if *phase.borrow() == Phase::Stop {
            break;
        }
        tokio::select! {
            item = reader.next() => {
                let mut item = Some(item);
                let mut handled = 0;
                let mut synced = false;
                // Everything already readable, then one round of acks.
                while let Some(next) = item.take() {
                    match wire::decode(encoding, next) {
                        Incoming::Frame(frame) => synced |= state.on_frame(frame),
                        Incoming::Control => {}
                        Incoming::Closed(why) => {
                            let Some(redial) = plan.redial.as_ref().filter(|_| *phase.borrow() != Phase::Stop) else {
                                state.out.closed = Some(why);
                                break 'run;
                            };
                            tracing::debug!("receiver connection ended ({why}); reconnecting");
                            match redial.connect().await {
                                Ok((w, r)) => (writer, reader) = (w, r),
                                Err(e) => {
                                    state.out.closed = Some(format!("{why}; {e}"));
                                    break 'run;
                                }
                            }
                            state.out.reconnects += 1;
                            state.acked.clear();
                            continue 'run;
                        }
                    }
                    handled += 1;
                    if handled < ack_batch && !synced {
                        item = reader.next().now_or_never();
                    }
                }
                if plan.ack && let Err(why) = state.flush_acks(&mut writer, encoding).await {
                    state.out.closed = Some(why);
                    break;
                }
                if synced && plan.until_sync_done {
                    break;
                }
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    (state.out, writer, reader)
}
