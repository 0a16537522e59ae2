//! A receiving device: reads events, measures delivery latency from the intended send time
//! written in the body, checks per-conversation order, and acknowledges (delivered,
//! cumulative) what it got, batching the acks of frames that arrived together.
//!
//! A delivery is a message seen for the first time, by its idempotency key (conversation,
//! sender device, `client_msg_id`), not by its seq: a message the server stored twice, under
//! two seqs, is one delivery and a problem (`stored_twice`), never a second delivery that
//! would make up for a message lost elsewhere. Seqs are checked from the device's known
//! cursor in each conversation (0 for one it never read), so a hole before the first event
//! it sees is a gap like any other.

use super::report::Report;
use super::sender::intended_time;
use super::stats::{ErrorCounts, Latency, Live, Phase};
use super::wire::{self, Cursors, Endpoint, Incoming, Reader, Writer};
use courier_proto::{Ack, AckKind, Body, ClientFrame, Encoding, EventPayload, Sender, ServerFrame};
use foldhash::{HashMap, HashSet};
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
    /// Where the device stands in the conversations it read before this receiver ran (a
    /// catch-up read on connecting, or an earlier connection's acknowledged events): seqs are
    /// checked from there, and from 0 in every other conversation.
    pub cursors: Cursors,
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
    /// Messages delivered: seq above everything seen before in its conversation, and a
    /// message not seen before under another seq.
    pub delivered: u64,
    /// Events at or below a seq already seen (allowed: delivery is at-least-once).
    pub redelivered: u64,
    /// Messages seen again under a new seq: stored twice, which idempotency forbids.
    pub stored_twice: u64,
    /// Times a conversation's seq jumped by more than one.
    pub gaps: u64,
    pub errors: ErrorCounts,
    pub sync_done_at: Option<Instant>,
    /// Highest seq seen per conversation.
    pub highest: Cursors,
    /// The messages delivered, each by a 64-bit hash of its idempotency key (not merged): a
    /// few bytes a message, where the key's strings were ~150 and kept a peak run's load
    /// generator busy growing its memory. Two keys of one run share a hash with a chance of
    /// ~n²/2^65 (1 in ~370,000 for 10 million messages), which would report one message
    /// stored twice that was not.
    messages: HashSet<u64>,
    /// The messages delivered by each sending device.
    delivered_by: HashMap<Sender, u64>,
    pub closed: Option<String>,
    /// Times the connection ended and was re-established.
    pub reconnects: u64,
}

/// A message as its sender named it, hashed: the idempotency key the server stores it under
/// once, whatever seq it was given (`docs/architecture.md`).
fn message_key(conversation_id: &str, sender: &Sender, client_msg_id: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::quality::FixedState::default().hash_one((conversation_id, sender, client_msg_id))
}

impl ReceiverOutcome {
    /// Adds another receiver's figures (not its messages: count what is [`missing`] first).
    ///
    /// [`missing`]: ReceiverOutcome::missing
    pub fn merge(&mut self, other: &ReceiverOutcome) {
        self.delivery.merge(&other.delivery);
        self.delivered += other.delivered;
        self.redelivered += other.redelivered;
        self.stored_twice += other.stored_twice;
        self.gaps += other.gaps;
        self.errors.merge(&other.errors);
        self.reconnects += other.reconnects;
    }

    /// Of the messages each sending device had acknowledged (`acked`: the device and how many),
    /// how many this device was not delivered. Counted sender by sender, so that messages one
    /// sender got stored without an acknowledgement never make up for another's missing ones.
    pub fn missing(&self, acked: &[(Sender, u64)]) -> u64 {
        acked
            .iter()
            .map(|(sender, n)| {
                let delivered = self.delivered_by.get(sender).copied().unwrap_or(0);
                n.saturating_sub(delivered)
            })
            .sum()
    }

    /// A problem for each thing a correct server never does to a receiver: a hole in a
    /// conversation's seqs, a message stored twice.
    pub fn report_problems(&self, report: &mut Report) {
        for (value, what) in [
            (self.gaps, "seq gaps seen by receivers (gaps)"),
            (
                self.stored_twice,
                "messages delivered again under a new seq, so stored twice (stored_twice)",
            ),
        ] {
            if value > 0 {
                report.problem(format!("{value} {what}"));
            }
        }
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
                if event.seq > *highest + 1 {
                    self.out.gaps += 1;
                }
                *highest = event.seq;
                if let EventPayload::Message {
                    body: Some(Body::Text(text)),
                    client_msg_id,
                    ..
                } = event.payload
                    && let Some(intended) = intended_time(&text)
                {
                    let key = message_key(&event.conversation_id, &event.sender, &client_msg_id);
                    if !self.out.messages.insert(key) {
                        self.out.stored_twice += 1;
                        return false;
                    }
                    match self.out.delivered_by.get_mut(&event.sender) {
                        Some(delivered) => *delivered += 1,
                        None => {
                            self.out.delivered_by.insert(event.sender, 1);
                        }
                    }
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
        out: ReceiverOutcome {
            highest: plan.cursors.clone(),
            ..ReceiverOutcome::default()
        },
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

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::Event;

    fn device(user: &str, device: &str) -> Sender {
        Sender {
            user: user.into(),
            device: device.into(),
        }
    }

    /// A bench message from `sender` in `conv`.
    fn message_from(sender: Sender, conv: &str, seq: u64, client_msg_id: &str) -> ServerFrame {
        ServerFrame::Event(Event {
            conversation_id: conv.into(),
            seq,
            server_msg_id: format!("s{seq}"),
            sender,
            ts_ms: 0,
            payload: EventPayload::Message {
                body: Some(Body::Text(super::super::sender::body_text(
                    Instant::now(),
                    32,
                ))),
                client_msg_id: client_msg_id.into(),
                reply_to: None,
                deleted: false,
            },
        })
    }

    fn message(conv: &str, seq: u64, client_msg_id: &str) -> ServerFrame {
        message_from(device("alice", "d"), conv, seq, client_msg_id)
    }

    fn state(live: &Live) -> ReceiverState<'_> {
        ReceiverState {
            live,
            acked: HashMap::default(),
            out: ReceiverOutcome::default(),
        }
    }

    /// A fresh device in a new conversation (as in `throughput`) whose first event is seq 3:
    /// seqs 1 and 2 never arrived, a gap. A device that had read up to 2 before (its cursor)
    /// sees no gap there.
    #[test]
    fn seqs_are_checked_from_the_devices_cursor_so_a_hole_before_the_first_event_is_a_gap() {
        let live = Live::default();
        let mut fresh = state(&live);
        fresh.on_frame(message("d:a", 3, "2"));
        fresh.on_frame(message("d:a", 4, "3"));
        assert_eq!(fresh.out.gaps, 1, "seqs 1-2 missing, first event seen is 3");
        let mut resumed = state(&live);
        resumed.out.highest.insert("d:a".into(), 2);
        resumed.on_frame(message("d:a", 3, "2"));
        assert_eq!(resumed.out.gaps, 0);
        assert_eq!(resumed.out.delivered, 1);
    }

    /// The same message (same sender device and client_msg_id) stored twice, under seqs 2
    /// and 3: a server that broke idempotency. One delivery, and a problem.
    #[test]
    fn a_message_stored_under_two_seqs_is_one_delivery_and_a_problem() {
        let live = Live::default();
        let mut s = state(&live);
        s.on_frame(message("d:a", 1, "0"));
        s.on_frame(message("d:a", 2, "1"));
        s.on_frame(message("d:a", 3, "1"));
        assert_eq!(
            s.out.delivered, 2,
            "client_msg_id 1 delivered under two seqs"
        );
        assert_eq!(s.out.stored_twice, 1);
        assert_eq!(s.out.gaps, 0);
        let mut report = Report::default();
        s.out.report_problems(&mut report);
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        // The same client_msg_id from another device, or in another conversation, is
        // another message.
        s.on_frame(message_from(device("alice", "e"), "d:a", 4, "1"));
        s.on_frame(message("d:b", 1, "1"));
        assert_eq!((s.out.delivered, s.out.stored_twice), (4, 1));
    }

    /// Pair A's server acked seqs 1-3 and lost seq 3 (a tail loss: no later event shows a
    /// gap); pair B's server stored client_msg_id 1 twice. Summed over the pairs, deliveries
    /// matched acknowledgements; pair by pair, one message is missing.
    #[test]
    fn one_pairs_surplus_never_hides_another_pairs_loss() {
        let live = Live::default();
        let mut a = state(&live);
        a.on_frame(message("d:a", 1, "0"));
        a.on_frame(message("d:a", 2, "1"));
        let mut b = state(&live);
        b.on_frame(message("d:b", 1, "0"));
        b.on_frame(message("d:b", 2, "1"));
        b.on_frame(message("d:b", 3, "1"));
        let alice = device("alice", "d");
        let lost = a.out.missing(&[(alice.clone(), 3)]) + b.out.missing(&[(alice, 2)]);
        assert_eq!(a.out.gaps + b.out.gaps, 0);
        assert_eq!(lost, 1, "one acked message never delivered");
    }

    /// In a group, sender X's messages delivered beyond what X had acknowledged (stored
    /// without a `sent`) do not make up for one of sender Y's that is missing.
    #[test]
    fn missing_messages_are_counted_sender_by_sender() {
        let live = Live::default();
        let mut member = state(&live);
        let (x, y) = (device("x", "s"), device("y", "s"));
        member.on_frame(message_from(x.clone(), "g:1", 1, "0"));
        member.on_frame(message_from(x.clone(), "g:1", 2, "1"));
        member.on_frame(message_from(y.clone(), "g:1", 3, "0"));
        assert_eq!(member.out.delivered, 3);
        assert_eq!(member.out.missing(&[(x, 1), (y, 2)]), 1);
    }
}
