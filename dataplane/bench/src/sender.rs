//! A pipelined sender: writes `send` frames without waiting for each `sent`, correlates the
//! replies by `client_msg_id`, retries `unavailable`/`rate_limited` with the same id, and
//! optionally waits for the peer's delivered `receipt`.
//!
//! Latencies are measured from the message's *intended* send time: in open-loop pacing that is
//! its slot in the schedule, whether or not the sender was able to write it then, so a stalled
//! server shows up in the percentiles instead of silently slowing the load (coordinated
//! omission). In window pacing the intended time is the moment the window let it go.
//!
//! tokio's timers fire on the first millisecond tick at or after their deadline, so a sender
//! waking on a message's slot would write it 0-1 ms late, a delay of the load generator's own
//! making that no real client has. A sender therefore wakes one tick early and writes what falls
//! due within that tick; a message written before its slot is measured from when it was written.
//! How late each message left against its slot is reported as `send_lateness`: near zero
//! unless the load generator is short of CPU or the server holds its writes back.

use super::report::Report;
use super::stats::{self, ErrorCounts, Latency, Live, Phase, Timeline};
use super::wire::{self, Incoming, Reader, Writer};
use courier_proto::{Body, ClientFrame, Encoding, ErrorCode, Send, ServerFrame};
use foldhash::HashMap;
use futures::{FutureExt, SinkExt, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Retries of one message on `unavailable` / `rate_limited` before it counts as failed.
const MAX_ATTEMPTS: u32 = 8;
/// Frames written per wake-up before the sender looks at its socket again.
const WRITE_BATCH: usize = 256;
/// Frames handled per wake-up before the sender writes what they allow (as the receiver
/// handles what is readable before it acknowledges).
const READ_BATCH: usize = 256;
/// The resolution of tokio's timers: how early an open-loop sender wakes and may write.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// Whom a message goes to.
#[derive(Debug, Clone)]
pub enum Target {
    User(String),
    Conversation(String),
}

/// How fast a sender goes.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Message k is due at `start + k * interval`, however the server keeps up.
    OpenLoop { start: Instant, interval: Duration },
    /// As fast as possible with at most this many sends awaiting `sent`.
    Window(usize),
}

impl Pace {
    /// Sender `i` of `n` sharing one open-loop pace starts `i / n` of an interval later, so the
    /// offered load is spread evenly over time. Without it every sender fires at the same
    /// instant and the server sees bursts of `n` sends (a latency floor of the load generator's
    /// making: 100 senders at 1,000 msgs/s would be 100 sends at once every 100 ms).
    pub fn staggered(self, i: usize, n: usize) -> Self {
        match self {
            Pace::OpenLoop { start, interval } => Pace::OpenLoop {
                start: start + interval.mul_f64(i as f64 / n.max(1) as f64),
                interval,
            },
            window => window,
        }
    }
}

/// What one sender does.
#[derive(Debug, Clone)]
pub struct SenderPlan {
    /// Message k goes to `targets[k % len]`.
    pub targets: Vec<Target>,
    /// Stop after this many messages (else when the phase leaves `Run`).
    pub count: Option<u64>,
    pub pace: Pace,
    /// Open loop: at most this many sends awaiting `sent` (later ones wait, their latency
    /// still counted from their intended time).
    pub max_in_flight: usize,
    /// Text bodies are padded to this many bytes.
    pub body_bytes: usize,
    /// Wait for the peer's delivered receipt of every acknowledged message.
    pub track_receipts: bool,
    /// Keep every acknowledged (client_msg_id, conversation, seq).
    pub record_acked: bool,
}

/// One acknowledged send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedSend {
    pub client_msg_id: String,
    pub conversation_id: String,
    pub seq: u64,
}

/// What a sender did.
#[derive(Default)]
pub struct SenderOutcome {
    pub send_ack: Latency,
    /// The same, by the second each message was meant to go.
    pub send_ack_by_second: Timeline,
    /// Open loop: how late each message was first written against its slot.
    pub send_lateness: Latency,
    /// Intended send time to the delivered receipt covering the message.
    pub receipt: Latency,
    pub errors: ErrorCounts,
    pub attempted: u64,
    /// Messages acknowledged, each once: every one is expected to be delivered.
    pub acked: u64,
    /// Retried messages answered `duplicate`: an earlier attempt was stored after all.
    pub duplicates: u64,
    /// Messages answered `duplicate` at their first attempt: the server had never seen them,
    /// so it matched them to another message (colliding idempotency keys) and stored nothing.
    /// Still expected to be delivered.
    pub first_attempt_duplicates: u64,
    /// `sent` frames for no send in flight.
    pub unmatched: u64,
    pub failed: u64,
    /// Of `failed`, the sends refused with a code a retry cannot change: a bench message is
    /// valid, so the server refused what it should have taken.
    pub refused: u64,
    pub receipted: u64,
    /// Sends still awaiting `sent` when the sender stopped.
    pub unacked: u64,
    pub acked_list: Vec<AckedSend>,
    /// Why the connection ended, if it did.
    pub closed: Option<String>,
}

struct Pending {
    intended: Instant,
    attempts: u32,
}

struct SenderState<'a> {
    plan: &'a SenderPlan,
    encoding: Encoding,
    live: &'a Live,
    next_k: u64,
    in_flight: HashMap<u64, Pending>,
    retries: BTreeSet<(Instant, u64)>,
    /// Per conversation: acknowledged seqs awaiting a receipt, with their intended time.
    awaiting_receipt: HashMap<String, BTreeMap<u64, Instant>>,
    receipted_up_to: HashMap<String, u64>,
    out: SenderOutcome,
}

/// The body of message `k`: its intended send time (nanoseconds since the run's epoch), then
/// padding. Receivers in this process read the time back to measure delivery latency.
pub fn body_text(intended: Instant, body_bytes: usize) -> String {
    let mut text = stats::to_offset(intended).to_string();
    if text.len() < body_bytes {
        text.push(' ');
        text.extend(std::iter::repeat_n('x', body_bytes - text.len()));
    }
    text
}

/// The intended send time carried by a body written by [`body_text`].
pub fn intended_time(text: &str) -> Option<Instant> {
    let offset = text.split(' ').next()?.parse::<u64>().ok()?;
    Some(stats::from_offset(offset))
}

impl SenderState<'_> {
    fn producing(&self, phase: Phase) -> bool {
        phase == Phase::Run && self.plan.count.is_none_or(|c| self.next_k < c)
    }

    fn receipts_pending(&self) -> bool {
        self.plan.track_receipts && self.awaiting_receipt.values().any(|m| !m.is_empty())
    }

    /// When the next new message may go, if any.
    fn next_new(&self, phase: Phase, now: Instant) -> Option<Instant> {
        if !self.producing(phase) {
            return None;
        }
        match self.plan.pace {
            Pace::OpenLoop { start, interval } => (self.in_flight.len() < self.plan.max_in_flight)
                .then(|| start + interval.mul_f64(self.next_k as f64)),
            Pace::Window(window) => (self.in_flight.len() < window).then_some(now),
        }
    }

    fn frame(&self, k: u64, intended: Instant) -> ClientFrame {
        let target = &self.plan.targets[(k % self.plan.targets.len() as u64) as usize];
        let (conversation_id, to_user) = match target {
            Target::User(user) => (None, Some(user.clone())),
            Target::Conversation(conv) => (Some(conv.clone()), None),
        };
        ClientFrame::Send(Send {
            reference: None,
            client_msg_id: k.to_string(),
            conversation_id,
            to_user,
            body: Body::Text(body_text(intended, self.plan.body_bytes)),
            reply_to: None,
        })
    }

    /// Writes every due retry and new message (at most [`WRITE_BATCH`]), then flushes.
    async fn write_due(&mut self, writer: &mut Writer, phase: Phase) -> Result<(), String> {
        let now = Instant::now();
        let mut written = 0;
        while written < WRITE_BATCH {
            let k = match self.retries.first() {
                Some(&(due, k)) if due <= now => {
                    self.retries.remove(&(due, k));
                    k
                }
                _ => match self.next_new(phase, now) {
                    Some(due) => {
                        let Some(intended) = departure(due, now) else {
                            break;
                        };
                        if let Pace::OpenLoop { .. } = self.plan.pace {
                            self.out.send_lateness.record_since(due, now);
                        }
                        let k = self.next_k;
                        self.next_k += 1;
                        self.in_flight.insert(
                            k,
                            Pending {
                                intended,
                                attempts: 0,
                            },
                        );
                        k
                    }
                    None => break,
                },
            };
            let Some(pending) = self.in_flight.get_mut(&k) else {
                continue;
            };
            pending.attempts += 1;
            let intended = pending.intended;
            let frame = self.frame(k, intended);
            self.out.attempted += 1;
            Live::add(&self.live.attempted, 1);
            writer
                .feed(wire::encode(self.encoding, &frame))
                .await
                .map_err(|e| format!("write: {e}"))?;
            written += 1;
        }
        if written > 0 {
            writer.flush().await.map_err(|e| format!("write: {e}"))?;
        }
        Ok(())
    }

    fn on_frame(&mut self, frame: ServerFrame) {
        let now = Instant::now();
        match frame {
            ServerFrame::Sent(sent) => {
                let Some(pending) = sent
                    .client_msg_id
                    .parse::<u64>()
                    .ok()
                    .and_then(|k| self.in_flight.remove(&k))
                else {
                    self.out.unmatched += 1;
                    return;
                };
                self.out.send_ack.record_since(pending.intended, now);
                self.out
                    .send_ack_by_second
                    .record_since(pending.intended, now);
                self.out.acked += 1;
                Live::add(&self.live.acked, 1);
                match (sent.duplicate, pending.attempts) {
                    (false, _) => {}
                    (true, 1) => self.out.first_attempt_duplicates += 1,
                    (true, _) => self.out.duplicates += 1,
                }
                if self.plan.track_receipts {
                    let covered = self
                        .receipted_up_to
                        .get(&sent.conversation_id)
                        .is_some_and(|&r| r >= sent.seq);
                    if covered {
                        self.out.receipt.record_since(pending.intended, now);
                        self.out.receipted += 1;
                        Live::add(&self.live.receipted, 1);
                    } else {
                        self.awaiting_receipt
                            .entry(sent.conversation_id.clone())
                            .or_default()
                            .insert(sent.seq, pending.intended);
                    }
                }
                if self.plan.record_acked {
                    self.out.acked_list.push(AckedSend {
                        client_msg_id: sent.client_msg_id,
                        conversation_id: sent.conversation_id,
                        seq: sent.seq,
                    });
                }
            }
            ServerFrame::Error(e) => {
                self.out.errors.add(e.code.as_str());
                let Some(k) = e.client_msg_id.and_then(|id| id.parse::<u64>().ok()) else {
                    return;
                };
                let Some(pending) = self.in_flight.get(&k) else {
                    return;
                };
                let retryable = matches!(e.code, ErrorCode::Unavailable | ErrorCode::RateLimited);
                if retryable && pending.attempts < MAX_ATTEMPTS {
                    let backoff = Duration::from_millis(10 << pending.attempts.min(8));
                    let wait = e.retry_after_ms.map_or(backoff, Duration::from_millis);
                    self.retries.insert((now + wait, k));
                } else {
                    self.in_flight.remove(&k);
                    self.out.failed += 1;
                    self.out.refused += u64::from(!retryable);
                    Live::add(&self.live.failed, 1);
                }
            }
            ServerFrame::Receipt(receipt) if self.plan.track_receipts => {
                let upto = self
                    .receipted_up_to
                    .entry(receipt.conversation_id.clone())
                    .or_default();
                *upto = (*upto).max(receipt.delivered_seq);
                if let Some(waiting) = self.awaiting_receipt.get_mut(&receipt.conversation_id) {
                    let rest = waiting.split_off(&(receipt.delivered_seq + 1));
                    let done = std::mem::replace(waiting, rest);
                    for intended in done.values() {
                        self.out.receipt.record_since(*intended, now);
                    }
                    self.out.receipted += done.len() as u64;
                    Live::add(&self.live.receipted, done.len() as u64);
                }
            }
            ServerFrame::Reconnect(_) => self.out.errors.add("reconnect"),
            _ => {}
        }
    }
}

/// Runs one sender on an open connection until its plan is done, the phase says stop, or the
/// connection ends.
pub async fn run_sender(
    mut writer: Writer,
    mut reader: Reader,
    encoding: Encoding,
    plan: SenderPlan,
    live: Arc<Live>,
    mut phase: watch::Receiver<Phase>,
) -> SenderOutcome {
    let mut state = SenderState {
        plan: &plan,
        encoding,
        live: &live,
        next_k: 0,
        in_flight: HashMap::default(),
        retries: BTreeSet::new(),
        awaiting_receipt: HashMap::default(),
        receipted_up_to: HashMap::default(),
        out: SenderOutcome::default(),
    };
    'run: loop {
        let current = *phase.borrow();
        if current == Phase::Stop {
            break;
        }
        if !state.producing(current) && state.in_flight.is_empty() && !state.receipts_pending() {
            break;
        }
        let now = Instant::now();
        let next_retry = state.retries.first().map(|&(due, _)| due);
        let next_new = state
            .next_new(current, now)
            .map(|due| due.checked_sub(TIMER_TICK).unwrap_or(due));
        let wake = match (next_new, next_retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            item = reader.next() => {
                // Everything already readable, so that the window's freed slots go in one
                // write: a `sent` at a time was a write (and a system call) per message.
                let mut item = Some(item);
                let mut handled = 0;
                while let Some(next) = item.take() {
                    match wire::decode(encoding, next) {
                        Incoming::Frame(frame) => state.on_frame(frame),
                        Incoming::Control => {}
                        Incoming::Closed(why) => {
                            state.out.closed = Some(why);
                            break 'run;
                        }
                    }
                    handled += 1;
                    if handled < READ_BATCH {
                        item = reader.next().now_or_never();
                    }
                }
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep_until(wake.unwrap_or(now).into()), if wake.is_some() => {
                if let Err(why) = state.write_due(&mut writer, current).await {
                    state.out.closed = Some(why);
                    break;
                }
            }
        }
    }
    state.out.unacked = state.in_flight.len() as u64;
    Live::add(&live.senders_done, 1);
    let _ = writer.close().await;
    state.out
}

impl SenderOutcome {
    /// Adds another sender's figures (not its acked list).
    pub fn merge(&mut self, other: &SenderOutcome) {
        self.send_ack.merge(&other.send_ack);
        self.send_ack_by_second.merge(&other.send_ack_by_second);
        self.send_lateness.merge(&other.send_lateness);
        self.receipt.merge(&other.receipt);
        self.errors.merge(&other.errors);
        self.attempted += other.attempted;
        self.acked += other.acked;
        self.duplicates += other.duplicates;
        self.first_attempt_duplicates += other.first_attempt_duplicates;
        self.unmatched += other.unmatched;
        self.failed += other.failed;
        self.refused += other.refused;
        self.receipted += other.receipted;
        self.unacked += other.unacked;
    }

    /// Writes the senders' correctness counts and [`problems`](SenderOutcome::problems) into
    /// `report`.
    pub fn report_correctness(&self, report: &mut Report) {
        for (name, value) in [
            ("attempted", self.attempted),
            ("acked", self.acked),
            ("duplicates", self.duplicates),
            ("first_attempt_duplicates", self.first_attempt_duplicates),
            ("unmatched_sent", self.unmatched),
            ("failed", self.failed),
            ("refused", self.refused),
            ("unacked", self.unacked),
        ] {
            report.count(name, value);
        }
        for problem in self.problems() {
            report.problem(problem);
        }
    }

    /// One line for each thing a correct server never does to senders: acknowledge nothing at
    /// all, refuse a send for good, answer a first attempt `duplicate`, or send a `sent` for
    /// nothing in flight. Failures after every retry of `unavailable` or `rate_limited` are an
    /// overloaded server's, counted but no problem.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.acked == 0 {
            problems.push("no send was acknowledged".to_owned());
        }
        for (value, what) in [
            (
                self.refused,
                "sends refused with a code a retry cannot change (refused)",
            ),
            (
                self.first_attempt_duplicates,
                "messages answered `duplicate` at their first attempt, so never stored \
                 (first_attempt_duplicates)",
            ),
            (
                self.unmatched,
                "`sent` frames for no send in flight (unmatched_sent)",
            ),
        ] {
            if value > 0 {
                problems.push(format!("{value} {what}"));
            }
        }
        problems
    }
}

/// Whether a new message due at `due` goes at `now` (its slot is at most [`TIMER_TICK`]
/// ahead), and the instant its latencies count from: its slot, or when it was written if that
/// was earlier.
fn departure(due: Instant, now: Instant) -> Option<Instant> {
    (due <= now + TIMER_TICK).then(|| due.min(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_their_intended_time() {
        let t = Instant::now() + Duration::from_millis(3);
        let text = body_text(t, 64);
        assert_eq!(text.len(), 64);
        let back = intended_time(&text).unwrap();
        assert!(back.max(t) - back.min(t) < Duration::from_micros(1));
        assert!(intended_time("hello").is_none());
    }

    #[test]
    fn a_message_goes_within_a_timer_tick_of_its_slot_and_counts_from_its_departure() {
        let now = Instant::now() + Duration::from_secs(1);
        let late = now - Duration::from_micros(700);
        assert_eq!(
            departure(late, now),
            Some(late),
            "late: counted from its slot"
        );
        assert_eq!(departure(now, now), Some(now));
        let early = now + Duration::from_micros(400);
        assert_eq!(
            departure(early, now),
            Some(now),
            "early: counted from its write"
        );
        assert_eq!(departure(now + TIMER_TICK, now), Some(now));
        let ahead = now + TIMER_TICK + Duration::from_micros(1);
        assert_eq!(
            departure(ahead, now),
            None,
            "more than a tick ahead: it waits"
        );
    }

    /// `sent {duplicate: true}` for a message sent once (no retry, so the server never saw it
    /// before): a server whose idempotency key collides (e.g. client_msg_id "0" of another
    /// sender) stored nothing new. It is a problem, and the message is still expected to be
    /// delivered. After a retry, `duplicate` means an earlier attempt was stored: no problem.
    #[test]
    fn a_duplicate_answer_to_a_first_attempt_is_a_problem_and_still_expected() {
        let plan = SenderPlan {
            targets: vec![Target::User("bob".into())],
            count: None,
            pace: Pace::Window(1),
            max_in_flight: 1,
            body_bytes: 32,
            track_receipts: false,
            record_acked: true,
        };
        let live = Live::default();
        let mut state = SenderState {
            plan: &plan,
            encoding: Encoding::Json,
            live: &live,
            next_k: 2,
            in_flight: HashMap::default(),
            retries: BTreeSet::new(),
            awaiting_receipt: HashMap::default(),
            receipted_up_to: HashMap::default(),
            out: SenderOutcome::default(),
        };
        let sent_duplicate = |k: u64| {
            ServerFrame::Sent(courier_proto::Sent {
                reference: None,
                client_msg_id: k.to_string(),
                conversation_id: "d:x".into(),
                seq: 7 + k,
                server_msg_id: format!("m{k}"),
                ts_ms: 0,
                duplicate: true,
            })
        };
        for (k, attempts) in [(0, 1), (1, 2)] {
            let intended = Instant::now();
            state.in_flight.insert(k, Pending { intended, attempts });
            state.on_frame(sent_duplicate(k));
        }
        let out = &state.out;
        assert_eq!(out.acked, 2, "both are expected to be delivered");
        assert_eq!((out.first_attempt_duplicates, out.duplicates), (1, 1));
        assert_eq!(out.problems().len(), 1, "{:?}", out.problems());
    }

    /// A run where nothing was acknowledged, sends were refused for good, or a `sent` matched
    /// nothing in flight is no "correctness: ok".
    #[test]
    fn nothing_acknowledged_a_refusal_or_a_stray_sent_is_a_problem() {
        assert_eq!(SenderOutcome::default().problems().len(), 1);
        let ok = SenderOutcome {
            acked: 10,
            failed: 2, // retries of `unavailable` exhausted: an overloaded server
            ..SenderOutcome::default()
        };
        assert!(ok.problems().is_empty(), "{:?}", ok.problems());
        let refused = SenderOutcome {
            refused: 1,
            failed: 1,
            ..ok
        };
        assert_eq!(refused.problems().len(), 1);
        let stray = SenderOutcome {
            acked: 10,
            unmatched: 1,
            ..SenderOutcome::default()
        };
        assert_eq!(stray.problems().len(), 1);
    }
}
