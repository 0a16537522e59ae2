//! The gateway role: one task per WebSocket connection. It records its device as seen (before
//! the catch-up, so a device that has had `sync_done` is listed; again when it closes, and
//! every [`CONNECTED_SEEN_INTERVAL`] meanwhile, by a pass of the gateway over its connections
//! rather than a timer in each, which also closes those of a device unlinked without this
//! gateway being told), decodes frames, calls the chat
//! role, writes replies and live deliveries, keeps per-conversation delivery order for its
//! device, and closes on oversize (1009), a frame that breaks the WebSocket protocol (1007 for
//! text that is not UTF-8, 1002 for the rest: [`Connection::on_read_error`]) and drain (1001).
//!
//! **Liveness.** Every `ping_interval` another pass of the gateway over its connections
//! ([`Gateway::check_liveness`]) closes (1001) each that has read nothing from its client for
//! two intervals, a ping it wrote among them, and has every other one write a WebSocket ping,
//! which a client's WebSocket library answers with a pong by itself: a client whose app its OS
//! suspended keeps its TCP connection alive but answers nothing, and is then taken for offline
//! (pushed to) rather than connected for good. A connection notes the time of each read in its
//! shared signals, one relaxed store; a page of a catch-up or gap fill, which keeps it from
//! reading, counts as one, one that stopped reading for reasons of its own is not closed
//! ([`Connection::on_silent`]), and the time it waits on a write to its client (a slow link),
//! when it can neither write a ping nor read the answer, is not counted
//! ([`Signals::waited_on_write`]): whatever `ping_interval`, an awake client is not cut for
//! the server's own wait, which may last up to `write_timeout`.
//! What a connection closed that way (or dropped because its client took nothing of a write
//! for `write_timeout`, [`Exit::TookNothing`]) was written and its device did not acknowledge
//! is pushed:
//! once its device left the registry, the connection records where it left the device in the
//! conversations it wrote to ([`Gateway::owe_pushes`]) for the push notifier, which did not
//! notify the device of it while it counted as connected.
//!
//! **Drain.** A connection told to reconnect (its gateway drains, batch by batch: see
//! [`drain`]; or its gateway's lease lapsed) reads no further frame, stops a catch-up or gap
//! fill under way at its next event (the events not written come again on the next connection:
//! the device's cursor moves only on its acks), answers every send it has accepted (each waits
//! at most `send_timeout`), then writes `reconnect` and closes with 1001.
//! Every close the server starts is a close handshake: after its close frame it reads what the
//! client still sends until the client's close (at most [`CLOSE_REPLY_WAIT`]), so the socket is
//! never dropped with unread data, which would make the kernel reset the connection and could
//! cost the client the frames before the close. The acks among those frames are committed (an
//! ack has no answer, so a client would not send it again), unless the device was unlinked;
//! the other frames are not handled, and their client sends them again after it reconnects. The
//! connection leaves the route registry only once its socket is closed: a draining server
//! waits for that before it exits.
//!
//! A connection whose delivery queue overflows with events does not lose them and is not cut
//! off: it reads what was dropped from the store once it has written what is queued, at the
//! pace its client reads. Other frames (typing, receipts) are queued only while there is room
//! (a receipt without room is retried later), so a full queue never closes the connection; a
//! client that takes nothing for `write_timeout` is dropped.
//!
//! Writes are buffered and flushed when the connection has nothing more queued, so a burst of
//! deliveries or a catch-up page leaves in a few system calls rather than one per frame.
//!
//! **Acks** are committed one step at a time: the acks a connection reads while a step is
//! under way are committed together in the next one, and any other frame waits for them
//! ([`acks`]), so an ack still takes effect before every later frame of its connection. Each
//! step is a task of its own, so it goes on while the connection waits on its client. A
//! catch-up or gap fill reads the acks its client sends meanwhile, between its steps
//! ([`Connection::take_acks`]): a device acknowledges a long catch-up as it reads it.
//!
//! **Memory.** A connection's task is sized by its largest await point, and most connections
//! are idle: the rare or heavy paths (frame handling, catch-up, gap fills, drain, close, the
//! device's last-seen writes, a write's timer when it must wait) are boxed, so the task holds
//! little more than the connection and the idle loop's wait (1.2 KB, from 3.3 KB;
//! `docs/benchmarks.md`, "Idle connection memory" and "Fewer bound writes, and a smaller
//! connection").

pub mod acks;
pub mod drain;
pub mod pages;
pub mod routes;
pub mod upto;

use crate::acks::PendingAcks;
use crate::drain::GatewayDrain;
use crate::pages::PageBudget;
use crate::routes::{
    ConnectionHandle, Delivery, Liveness, Routes, SharedEvent, Signal, Signals, to_message,
};
use crate::upto::Upto;
use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use courier_chat::devices::{Devices, Link};
use courier_chat::{CatchUp, CatchUpPlan, ChatBinding};
use courier_core::auth::Identity;
use courier_core::clock::now_ms;
use courier_core::error::ApiError;
use courier_core::limits::{ConnectionLimit, Rate};
use courier_core::loops::BackgroundLoops;
use courier_core::metrics::{CodeLabel, Metrics, ScopeLabel};
use courier_core::sequencing::{OwedPushListener, SequencerError};
use courier_proto::{
    Ack, ClientFrame, Encoding, ErrorCode, ErrorFrame, Event, Hello, Messages, Pong, Reconnect,
    Sent, ServerFrame, SyncDone, Trimmed,
};
use courier_store::{AppendOutcome, MessageStore, StoreError, UndecodableEvent};
use futures::future::{BoxFuture, Either};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use std::borrow::Borrow;
use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::time::MissedTickBehavior;

/// Events read from the store per step of a catch-up or gap fill.
const CATCH_UP_PAGE: usize = 256;
/// Bytes of events (as stored) read per step of a catch-up or gap fill, one event at least:
/// a step's events stay in memory until the client has read them, and 256 of the largest
/// messages would be 16 MiB per connection catching up (thousands at once in a storm).
const CATCH_UP_STEP_BYTES: usize = 256 * 1024;

/// How often a gateway records the devices it holds connections of as seen
/// ([`Gateway::record_connected_devices`]). A device's `last_seen_ms` is written otherwise when
/// a connection of it opens or closes, so a device connected for weeks was listed as long
/// inactive, and retention stopped counting it after `--device-inactive-after`.
pub const CONNECTED_SEEN_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// The default `--ping-interval`: a connection whose client answers no ping (an app
/// suspended by its OS) is closed 60-90 s after its last read, and its device is notified by
/// push from then on; a few bytes every 30 s on the others.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);

/// Settings of the gateway.
#[derive(Debug, Clone)]
pub struct GatewayLimits {
    /// Largest client message, after decompression (close 1009 above).
    pub max_frame_bytes: usize,
    /// Deliveries queued per connection; past it events are read from the store instead.
    pub outbound_queue: usize,
    /// Sends in flight per connection before the gateway stops reading from it.
    pub max_pending_sends: usize,
    /// Longest wait for a `sent` before the client is told `unavailable` (it retries).
    pub send_timeout: Duration,
    /// The `reconnect` delay (`after_ms`) is drawn in `[0, reconnect_jitter)`.
    pub reconnect_jitter: Duration,
    /// Longest a write may wait for a client that reads nothing.
    pub write_timeout: Duration,
    /// Frames per second a connection may send (`rate_limited` above).
    pub connection_frames: Rate,
    /// Typing frames per second a connection may send; more are dropped silently.
    pub connection_typing: Rate,
    /// How often the liveness pass pings the connections, and closes those that read nothing
    /// from their client for two of it ([`Gateway::check_liveness`]); zero: no pass.
    pub ping_interval: Duration,
    /// Most linked devices of a user (`--max-devices-per-user`; 0: no limit): a connection
    /// that would link one more is told `forbidden` and closed 1008 (`courier_chat::devices`).
    pub max_devices_per_user: u64,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            outbound_queue: 1024,
            max_pending_sends: 256,
            send_timeout: Duration::from_secs(10),
            reconnect_jitter: Duration::from_secs(2),
            write_timeout: Duration::from_secs(30),
            connection_frames: Rate {
                per_second: 300,
                burst: 600,
            },
            connection_typing: Rate {
                per_second: 5,
                burst: 5,
            },
            ping_interval: DEFAULT_PING_INTERVAL,
            max_devices_per_user: 32,
        }
    }
}

/// What a connection task needs.
pub struct Gateway {
    /// The chat role: in this process, or on the cluster's chat nodes.
    pub chat: ChatBinding,
    /// The store, which a connection reads its catch-up, gap fills and cursors from, and
    /// records its device in (the chat role decides what it may read).
    pub store: MessageStore,
    pub routes: Arc<Routes>,
    /// In a cluster: this gateway's node id, under which its devices' routes are written.
    pub cluster_routes: Option<Arc<ClusterRoutes>>,
    pub metrics: Arc<Metrics>,
    pub limits: GatewayLimits,
    /// The drain of this gateway: it tells the connections to reconnect, batch by batch; no
    /// connection is accepted once it was ordered.
    pub drain: Arc<GatewayDrain>,
    /// The push notifier of this process, told of the places a silent close records
    /// ([`Gateway::owe_pushes`]); `None` where it runs on another node, which reads them from
    /// the store every round.
    pub owed_pushes: Option<Arc<dyn OwedPushListener>>,
    /// Room for the pages of history being written to clients, this node's HTTP API's
    /// included (`pages`).
    pub pages: PageBudget,
}

/// A gateway's routes in a cluster's route registry (`courier_store::routes`): each device's
/// route is written when it connects, before its catch-up reads the store (so an event is
/// either delivered live or read by the catch-up), and cleared when its last connection here
/// ends: while another connection of the device stays open here (two tabs of a web app sharing
/// a device id), the route stays, whichever of them wrote it ([`Routes::leave`]).
///
/// A route whose clearing fails (the store unavailable as the connection ends) is kept here
/// and cleared again by [`ClusterRoutes::clear_left`], which the node runs every lease round:
/// left in the store, it names a live gateway, so the push notifier would take the device for
/// connected and notify it of nothing until this gateway restarts. At most
/// [`MAX_LEFT_ROUTES`] are kept; past it the oldest is given up (logged).
pub struct ClusterRoutes {
    pub store: MessageStore,
    /// This gateway's node id.
    pub node: String,
    /// Routes of devices whose last connection here ended and whose clearing failed: user,
    /// device.
    left: Mutex<VecDeque<(String, String)>>,
}

/// Most routes [`ClusterRoutes`] keeps to clear again.
pub const MAX_LEFT_ROUTES: usize = 65_536;

impl ClusterRoutes {
    /// The routes of gateway `node` in `store`.
    pub fn new(store: MessageStore, node: String) -> Self {
        Self {
            store,
            node,
            left: Mutex::default(),
        }
    }

    /// Clears the route of `user`'s `device`, whose last connection here (in `open`) ended,
    /// unless a connection still open in `open` wrote it (the device connected again); kept to
    /// be cleared again if that fails.
    async fn clear(&self, user: &str, device: &str, open: &Routes) {
        let cleared = self.clear_unless_open(user, device, open).await;
        if let Err(e) = cleared {
            tracing::warn!(user, error = %e, "could not clear the device's route; clearing it again at the next lease round");
            self.keep_left([(user.to_owned(), device.to_owned())]);
        }
    }

    async fn clear_unless_open(
        &self,
        user: &str,
        device: &str,
        open: &Routes,
    ) -> Result<bool, StoreError> {
        let still_open = |connection| open.holds(user, connection);
        self.store
            .remove_route_unless(user, device, &self.node, still_open)
            .await
    }

    fn keep_left(&self, routes: impl IntoIterator<Item = (String, String)>) {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        for route in routes {
            if left.len() == MAX_LEFT_ROUTES
                && let Some((user, device)) = left.pop_front()
            {
                tracing::warn!(
                    user,
                    device,
                    "too many routes to clear again: this one stays until the gateway restarts"
                );
            }
            left.push_back(route);
        }
    }

    /// Clears again the routes whose clearing failed when their connection ended (the route
    /// of a connection of the same device open since in `open` is kept). The first that fails
    /// again stops the call: it and the rest are kept for the next. Returns how many are left.
    pub async fn clear_left(&self, open: &Routes) -> usize {
        let mut left = std::mem::take(&mut *self.left.lock().unwrap_or_else(|e| e.into_inner()));
        while let Some((user, device)) = left.pop_front() {
            let cleared = self.clear_unless_open(&user, &device, open).await;
            if let Err(e) = cleared {
                tracing::warn!(error = %e, routes = left.len() + 1, "clearing the routes of ended connections failed; retrying at the next lease round");
                left.push_front((user, device));
                break;
            }
        }
        self.keep_left(left);
        self.left.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A finished send: its `ref`, `client_msg_id`, conversation, start and outcome.
struct SendResult {
    reference: Option<i64>,
    client_msg_id: String,
    conversation_id: String,
    started: Instant,
    outcome: Result<AppendOutcome, ApiError>,
}

struct Connection {
    gateway: Arc<Gateway>,
    /// Shared with each commit of its acks, which outlives a turn of the loop.
    who: Arc<Identity>,
    encoding: Encoding,
    socket: WebSocket,
    /// Its route's signals, which a catch-up or gap fill looks at between events.
    signals: Arc<Signals>,
    /// Highest seq written to this connection (or known to its device), per conversation, for
    /// a bounded number of conversations ([`upto`]).
    upto: Upto,
    pending: FuturesUnordered<BoxFuture<'static, SendResult>>,
    /// The commit of acks under way, if any.
    acks: Option<PendingAcks>,
    /// Acks read while `acks` was under way, committed next (`acks` module).
    queued_acks: Vec<Ack>,
    /// The first other frame read while acks were being committed: handled once they are,
    /// and nothing more is read meanwhile.
    held: Option<Box<ClientFrame>>,
    /// The first read that is not an ack while a catch-up or gap fill keeps the connection
    /// from its loop (another frame, the client's close, an error), or the read made before
    /// the first catch-up: handled by the loop, and nothing more is read meanwhile
    /// ([`Connection::take_acks`]).
    unread: Option<Box<Option<Result<Message, axum::Error>>>>,
    frames: ConnectionLimit,
    typing: ConnectionLimit,
}

/// Waits for the commit of acks under way, if any (never resolves without one).
async fn acked(acks: &mut Option<PendingAcks>) -> Vec<(Option<i64>, ApiError)> {
    match acks {
        Some(acks) => acks.await,
        None => std::future::pending().await,
    }
}

/// A socket operation that gives up after a limit (`None`). Most writes only fill the
/// connection's buffer and are ready at once: they read no clock and set no timer, and the
/// timer, boxed when one must wait, takes no room in the connection's future. It is a plain
/// struct rather than an `async fn` because those keep copies of what they move.
///
/// One that waited and then went through tells the connection's `signals` how long it waited
/// ([`Signals::waited_on_write`]): not its client's silence.
struct Within<'a, F> {
    io: F,
    limit: Duration,
    signals: &'a Signals,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<F: Future + Unpin> Future for Within<'_, F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(out) = Pin::new(&mut self.io).poll(cx) {
            if let Some(timer) = &self.timer {
                let left = timer
                    .deadline()
                    .saturating_duration_since(tokio::time::Instant::now());
                self.signals
                    .waited_on_write(self.limit.saturating_sub(left));
            }
            return Poll::Ready(Some(out));
        }
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        timer.as_mut().poll(cx).map(|()| None)
    }
}

/// What a write or flush of the socket means for the connection.
fn written(outcome: Option<Result<(), axum::Error>>) -> Result<(), Exit> {
    match outcome {
        Some(Ok(())) => Ok(()),
        Some(Err(_)) => Err(Exit::ClientGone),
        None => Err(Exit::TookNothing),
    }
}

/// Records `who`'s device as seen. Boxed, with a store handle of its own: it runs at a
/// connection's start and end only, and neither stays in the connection's task.
fn record_seen<'a>(
    gateway: &Gateway,
    who: &'a Identity,
) -> BoxFuture<'a, Result<Link, StoreError>> {
    let devices =
        Devices::new(gateway.store.clone()).with_max_devices(gateway.limits.max_devices_per_user);
    Box::pin(async move { devices.seen(who).await })
}

/// What a client is told of conversation `conv`, a stored record of which this server cannot
/// read (`reason`: damage): `internal`, naming it. The connection goes on with the others.
fn unreadable_conversation(conv: &str, reason: &str) -> ApiError {
    let message = format!(
        "internal error: conversation {conv} cannot be read by this server ({reason}); nothing \
         more of it is sent"
    );
    ApiError::new(ErrorCode::Internal, message)
}

/// The `ref` and `client_msg_id` an `error` answering `frame` carries.
fn answer_ids(frame: &ClientFrame) -> (Option<i64>, Option<String>) {
    let client_msg_id = match frame {
        ClientFrame::Send(s) => Some(s.client_msg_id.clone()),
        _ => None,
    };
    (frame.reference(), client_msg_id)
}

/// The frame `message` carries in the connection's subprotocol: a text message's in JSON, a
/// binary one's in protobuf.
fn frame_bytes(message: &Message, encoding: Encoding) -> Option<&[u8]> {
    match (message, encoding) {
        (Message::Text(text), Encoding::Json) => Some(text.as_bytes()),
        (Message::Binary(bytes), Encoding::Proto) => Some(bytes.as_ref()),
        _ => None,
    }
}

/// Bytes of a `messages` page its client has `write_timeout` to take: a write waits at most
/// `write_timeout`, but a page is one frame of up to tens of megabytes, written out by one
/// flush; bounded as a whole by `write_timeout`, a client on a slow link that read it steadily
/// (at 4 KB/s, a page of 300 KB) was dropped as one that took nothing, and cut again each time
/// it asked for the page. So a client is dropped if it takes less than this in a write
/// timeout on average (~2 KB/s at 30 s), as the HTTP port's bound (`TCP_NOTSENT_LOWAT`) does.
const PAGE_BYTES_PER_WRITE_TIMEOUT: usize = 64 * 1024;

/// Longest wait, when a connection ends, for each of its last commits of acks.
const LAST_ACK_WAIT: Duration = Duration::from_secs(10);

/// Longest wait, after the server's close frame, for the client's close reply.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(5);

/// The reason of the close of a connection whose client answered no ping for two ping
/// intervals ([`Exit::Silent`]).
const SILENT_REASON: &str = "no answer to pings; reconnect";

/// Places a connection closed for silence records for the push notifier at most
/// ([`Gateway::owe_pushes`]): the conversations it advanced in most recently, of those it
/// wrote to past its device's cursor since its catch-up ([`Upto::unacknowledged`]). A device in more conversations than that, each written
/// to during its silence, is notified of those only; the others wait for its next catch-up.
pub const SILENT_PUSH_CONVERSATIONS: usize = 100;

/// The close of a connection replaced by newer ones of its device ([`Signal::Replaced`]).
const REPLACED: Exit = Exit::Close(
    close_code::POLICY,
    "this device opened too many connections; its oldest closes",
);

/// Why the connection ends.
enum Exit {
    ClientGone,
    Close(u16, &'static str),
    /// Closed with 1008 for an unlink: the acks its device sent are not committed (they would
    /// bring back the cursors the unlink dropped).
    Unlinked,
    /// Told to reconnect ([`Signal::Reconnect`]), in the loop or amid a catch-up or gap fill:
    /// the connection drains ([`Connection::drain`]).
    Reconnect,
    /// Its client answered no ping for two ping intervals ([`Signal::Silent`]): closed with
    /// 1001, the protocol's going away, which a client takes as a cue to reconnect; its acks
    /// read are committed as on any close, and what it was written and its device did not
    /// acknowledge is pushed ([`Gateway::owe_pushes`]).
    Silent,
    /// Its client took nothing of a write for `write_timeout`: dropped without a close frame
    /// (it would take none either). What it was written and its device did not acknowledge
    /// is pushed, as at a silent close: an app its OS suspended whose socket's buffers filled
    /// before the liveness pass found it silent is the same client.
    TookNothing,
}

/// The close of a connection whose read failed with `e` ([`Connection::on_read_error`]).
fn read_error_exit(e: &tungstenite::Error) -> Exit {
    use tungstenite::error::ProtocolError;
    match e {
        // A message or frame over `--max-frame-bytes` (PROTOCOL.md).
        tungstenite::Error::Capacity(_) => Exit::Close(close_code::SIZE, "message too big"),
        // A text message that is not UTF-8, or a close frame's reason.
        tungstenite::Error::Utf8(_) => Exit::Close(close_code::INVALID, "text that is not UTF-8"),
        // The client's TCP connection ended without a close frame: no one to tell.
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Exit::ClientGone
        }
        // A reserved bit or opcode, an unmasked frame, a fragmented or oversized control frame,
        // a continuation of nothing...: the WebSocket cannot be read on.
        tungstenite::Error::Protocol(_) => {
            Exit::Close(close_code::PROTOCOL, "websocket protocol error")
        }
        _ => Exit::ClientGone,
    }
}

impl Gateway {
    /// Records every device with a connection open on this gateway as seen now, one device at
    /// a time ([`Devices::still_connected`]: a read, and a write if its record is a minute old
    /// or more), and closes the connections whose device was unlinked since their token was
    /// issued: in a cluster the unlink reaches this gateway by a call, sent again for a minute
    /// while it does not land (`courier_rpc::delivery`), that may still be lost (a gateway
    /// unreachable longer, too many unlinks in flight), and the connection would otherwise go
    /// on reading and sending for as long as its client keeps it. Returns how
    /// many devices it recorded; a pass stops at the first store error (logged), and the next
    /// one starts over.
    pub async fn record_connected_devices(&self) -> usize {
        let devices = Devices::new(self.store.clone());
        let connected = self.routes.devices();
        for (recorded, (user, device)) in connected.iter().enumerate() {
            match devices.still_connected(user, device).await {
                Ok(Some(record)) => {
                    let closed = self
                        .routes
                        .close_refused(user, device, |issued| record.accepts(issued));
                    if closed > 0 {
                        tracing::info!(
                            user,
                            device,
                            closed,
                            "closed the connections of a device unlinked without this gateway being told"
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(user, device, error = %e, "could not record the connected devices' activity; trying again next pass");
                    return recorded;
                }
            }
        }
        connected.len()
    }

    /// Starts the loop that records the devices connected here as seen every
    /// [`CONNECTED_SEEN_INTERVAL`], the first time one interval from now.
    pub fn start_recording_connected_devices(self: &Arc<Self>, loops: &BackgroundLoops) {
        let gateway = self.clone();
        loops.spawn("record the connected devices as seen", move |cancel| {
            let gateway = gateway.clone();
            async move {
                let interval = CONNECTED_SEEN_INTERVAL;
                let mut passes =
                    tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                passes.set_missed_tick_behavior(MissedTickBehavior::Delay);
                let run = async {
                    loop {
                        passes.tick().await;
                        gateway.record_connected_devices().await;
                    }
                };
                cancel.run_until_cancelled(run).await;
            }
        });
    }

    /// One liveness pass over the connections ([`Routes::ping_or_close`]): those that read
    /// nothing from their client for two ping intervals close, the others send a WebSocket
    /// ping. A client whose app its OS suspended keeps its TCP connection open (the kernel
    /// acknowledges what is written to it), so TCP keepalive never finds it gone: without
    /// this, it counted as connected for good, took events live that nobody read, and the
    /// push notifier, which notifies devices not connected, never notified it. The
    /// pass does nothing when `ping_interval` is zero.
    pub fn check_liveness(&self) -> Liveness {
        let interval = self.limits.ping_interval;
        if interval.is_zero() {
            return Liveness::default();
        }
        let liveness = self.routes.ping_or_close(interval);
        if liveness.closed > 0 {
            tracing::debug!(
                closed = liveness.closed,
                "told the connections that answered no ping for two intervals to close"
            );
        }
        liveness
    }

    /// Starts the liveness pass ([`Gateway::check_liveness`]) every `ping_interval`, the
    /// first one interval from now; none when it is zero. One loop for the gateway rather than
    /// a timer in each connection, whose task stays small (`docs/benchmarks.md`, "Idle
    /// connection memory").
    pub fn start_liveness_pass(self: &Arc<Self>, loops: &BackgroundLoops) {
        let interval = self.limits.ping_interval;
        if interval.is_zero() {
            return;
        }
        let gateway = self.clone();
        loops.spawn("ping the connections", move |cancel| {
            let gateway = gateway.clone();
            async move {
                let mut passes =
                    tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                passes.set_missed_tick_behavior(MissedTickBehavior::Delay);
                let run = async {
                    loop {
                        passes.tick().await;
                        gateway.check_liveness();
                    }
                };
                cancel.run_until_cancelled(run).await;
            }
        });
    }

    /// Records, for the push notifier, where a connection of `who`'s device closed for silence
    /// left it: `places` (conversation, highest seq written past the cursor it read,
    /// [`Upto::unacknowledged`]), at a silent close only (or a drop for taking nothing,
    /// [`Exit::TookNothing`]), never on the path of a message. The
    /// notifier notifies the device of what of it the device did not acknowledge, as if it had
    /// been offline when it was sent (`courier_push`): the connection took it "live" into a
    /// socket nobody read, while the device counted as connected and was notified of nothing.
    /// A failure is logged: the device is then not notified of it (its next catch-up has it).
    async fn owe_pushes(&self, who: &Identity, places: &[(String, u64)]) {
        if places.is_empty() {
            return;
        }
        if let Err(e) = self.store.owe_pushes(&who.user, &who.device, places).await {
            tracing::warn!(user = %who.user, device = %who.device, error = %e, "could not record what a silent connection was written: its device is not notified of it");
            return;
        }
        if let Some(notifier) = &self.owed_pushes {
            notifier.owed();
        }
    }

    /// In a cluster, records that `handle`'s device is connected to this gateway; false
    /// (logged) if that failed.
    async fn add_route(&self, user: &str, handle: &ConnectionHandle) -> bool {
        let Some(cluster) = &self.cluster_routes else {
            return true;
        };
        let (store, node) = (&cluster.store, &cluster.node);
        let added = store.add_route(user, &handle.device, node, handle.id, now_ms());
        match added.await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(user, error = %e, "could not record the device's route");
                false
            }
        }
    }

    /// Runs one connection until it ends. The connection is built here, outside the returned
    /// future: an `async fn` keeps its arguments for as long as it runs, so the socket and the
    /// identity would be held twice by every idle connection (`docs/benchmarks.md`, "Idle
    /// connection memory").
    pub fn serve(
        self: &Arc<Self>,
        socket: WebSocket,
        who: Identity,
        encoding: Encoding,
    ) -> impl Future<Output = ()> + Send + use<> {
        let (handle, deliveries) = self.routes.register(
            &who.user,
            &who.device,
            who.issued_at_ms,
            self.limits.outbound_queue,
        );
        self.metrics.connections.inc();
        let connection = Connection {
            gateway: self.clone(),
            who: Arc::new(who),
            encoding,
            socket,
            signals: handle.signals.clone(),
            upto: Upto::default(),
            pending: FuturesUnordered::new(),
            acks: None,
            queued_acks: Vec::new(),
            held: None,
            unread: None,
            frames: ConnectionLimit::new(self.limits.connection_frames),
            typing: ConnectionLimit::new(self.limits.connection_typing),
        };
        connection.serve(handle, deliveries)
    }
}

impl Connection {
    /// [`Gateway::serve`], once the connection is registered. An `async` block, not an
    /// `async fn`: the latter moves its arguments into locals, and the future would hold the
    /// connection twice.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would hold the connection twice"
    )]
    fn serve(
        mut self,
        handle: ConnectionHandle,
        deliveries: flume::Receiver<Delivery>,
    ) -> impl Future<Output = ()> + Send {
        async move {
            // One call of `run`, after the route's write: the task holds one `run` future.
            let exit = if self.gateway.add_route(&self.who.user, &handle).await {
                self.run(&deliveries, &handle).await
            } else {
                Exit::Close(close_code::ERROR, "storage error; reconnect")
            };
            let exit = match exit {
                Exit::Reconnect => Box::pin(self.drain()).await,
                exit => exit,
            };
            let silent = matches!(exit, Exit::Silent | Exit::TookNothing);
            match exit {
                Exit::Close(code, reason) => Box::pin(self.close(code, reason)).await,
                Exit::Silent => Box::pin(self.close(close_code::AWAY, SILENT_REASON)).await,
                Exit::Unlinked => {
                    Box::pin(self.close(close_code::POLICY, "device unlinked")).await;
                    self.queued_acks.clear();
                }
                // A drain ends closed, or with its client gone.
                Exit::ClientGone | Exit::TookNothing | Exit::Reconnect => {}
            }
            // An ack is not lost because the connection closed right after it.
            if let Some(acks) = self.acks.take() {
                let _ = tokio::time::timeout(LAST_ACK_WAIT, acks).await;
            }
            if !self.queued_acks.is_empty() {
                let queued = std::mem::take(&mut self.queued_acks);
                let _ = tokio::time::timeout(LAST_ACK_WAIT, self.commit_acks(queued)).await;
            }
            // Its app suspended (or its network gone), the client read none of what the
            // connection wrote lately (taken only now: nothing more is held across the close's
            // awaits).
            let owed = silent.then(|| self.upto.unacknowledged(SILENT_PUSH_CONVERSATIONS));
            // Boxed: what leaving holds across its writes takes no room in every connection.
            Box::pin(self.leave(handle, owed)).await;
        }
    }

    /// Closes the socket, records the device's activity and clears its routes, then records
    /// the places a silent close `owed` for the push notifier: once the device no longer
    /// counts as connected, which the notifier checks.
    async fn leave(self, handle: ConnectionHandle, owed: Option<Vec<(String, u64)>>) {
        let gateway = self.gateway.clone();
        let who = self.who.clone();
        drop(self);
        if let Err(e) = record_seen(&gateway, &who).await {
            tracing::warn!(user = %who.user, device = %who.device, error = %e, "could not record device activity");
        }
        let user = &who.user;
        // Another connection of the device open here keeps its route.
        let route_stays = gateway.routes.leave(user, handle.id);
        if let Some(cluster) = &gateway.cluster_routes
            && !route_stays
        {
            cluster.clear(user, &handle.device, &gateway.routes).await;
        }
        if let Some(owed) = owed {
            gateway.owe_pushes(&who, &owed).await;
        }
        // Last: a draining server waits for its connections to leave the registry.
        gateway.routes.unregister(user, handle.id);
        gateway.metrics.connections.dec();
    }

    async fn run(
        &mut self,
        deliveries: &flume::Receiver<Delivery>,
        handle: &ConnectionHandle,
    ) -> Exit {
        // hyper hands the socket over with the upgrade request's read buffer (8-16 KiB), which
        // it frees at the socket's first read. Read once now, so that a device does not hold
        // it through its record and catch-up (in a reconnect storm, every device at once); a
        // frame the client sent already is handled after the catch-up (an ack during it), as
        // it would have been (boxed: rare).
        self.unread = self.socket.recv().now_or_never().map(Box::new);
        let hello = ServerFrame::Hello(Hello {
            user: self.who.user.clone(),
            device: self.who.device.clone(),
            server_time_ms: now_ms(),
        });
        if self.write(hello).await.is_err() {
            return Exit::ClientGone;
        }
        // Registered before this check: an unlink either is seen here or closes the connection.
        match record_seen(&self.gateway, &self.who).await {
            Ok(Link::Linked) => {}
            Ok(Link::Unlinked) => return Exit::Unlinked,
            // Past the upgrade's check: another new device of the user took the last place.
            Ok(Link::TooManyDevices(refused)) => {
                let refusal = courier_chat::devices::too_many_devices(&self.who, &refused);
                let _ = self.write_error(None, None, refusal).await;
                return Exit::Close(close_code::POLICY, "too many devices; unlink one");
            }
            Err(e) => {
                let _ = self.write_error(None, None, e.into()).await;
                return Exit::Close(close_code::ERROR, "storage error; reconnect");
            }
        }
        if let Err(exit) = Box::pin(self.catch_up(&BTreeMap::new())).await {
            return exit;
        }
        // What the catch-up wrote was committed while the device was offline, and notified
        // then: a silent close owes only what comes from now on.
        self.upto.caught_up();
        // One stream for the connection's life: its wait for a delivery stays registered with
        // the channel while other work wakes the connection (a future per turn of the loop
        // would register and unregister it each time).
        let mut deliveries = deliveries.stream();
        loop {
            // What a catch-up or gap fill left unread, in the order it was read.
            if let Some(read) = self.unread.take()
                && let Err(exit) = Box::pin(self.on_read(*read)).await
            {
                return exit;
            }
            if deliveries.is_empty() {
                // A commit finishes many of the connection's sends at once: their answers
                // are written before the flush, to leave in one system call, not one each.
                while let Some(Some(done)) = self.pending.next().now_or_never() {
                    if let Err(exit) = self.on_sent(done).await {
                        return exit;
                    }
                }
                if let Err(exit) = self.flush().await {
                    return exit;
                }
            }
            let reading = self.held.is_none()
                && self.queued_acks.len() < acks::QUEUED_MAX
                && self.pending.len() < self.gateway.limits.max_pending_sends;
            let step = tokio::select! {
                biased;
                _ = handle.signals.taken(Signal::Unlinked) => Err(Exit::Unlinked),
                _ = handle.signals.taken(Signal::Replaced) => Err(REPLACED),
                _ = handle.signals.taken(Signal::Reconnect) => Err(Exit::Reconnect),
                _ = handle.signals.taken(Signal::Silent) => Box::pin(self.on_silent(reading)).await,
                _ = handle.signals.taken(Signal::Ping) => {
                    let ping = self.write_message(Message::Ping(Default::default())).await;
                    ping.map(|()| handle.signals.wrote_ping())
                }
                refused = acked(&mut self.acks) => Box::pin(self.on_acked(refused)).await,
                Some(done) = self.pending.next() => self.on_sent(done).await,
                Some(delivery) = deliveries.next() => self.on_delivery(delivery, &handle.signals).await,
                _ = handle.signals.taken(Signal::Lagged) => {
                    Box::pin(self.refill(handle.signals.take_behind())).await
                }
                read = self.socket.recv(), if reading => Box::pin(self.on_read(read)).await,
            };
            if let Err(exit) = step {
                return exit;
            }
        }
    }

    /// The liveness pass found nothing read from the client for two ping intervals
    /// ([`Signal::Silent`]): the connection closes, 1001, unless the silence was its own. Not
    /// `reading` (its sends in flight or acks queued at the most, waiting on their commits),
    /// it has left what its client sent unread: its silence is counted afresh from now. A
    /// write that waited on its client since the pass looked (it may have been under way then)
    /// is left out of the silence ([`Signals::waited_on_write`]): the client may no longer be
    /// silent. And a step of its own (a write waiting on a slow client, a long gap fill) may
    /// have kept it from reading a pong that has come meanwhile: what is there to read is read
    /// first.
    async fn on_silent(&mut self, reading: bool) -> Result<(), Exit> {
        if !reading {
            self.signals.read_now();
            return Ok(());
        }
        if !self.signals.is_silent(self.gateway.limits.ping_interval) {
            return Ok(());
        }
        // Dropped unfinished, a read loses nothing (the early read of `run` does so too).
        if let Some(read) = self.socket.recv().now_or_never() {
            return self.on_read(read).await;
        }
        self.gateway.metrics.silent_closes.inc();
        Err(Exit::Silent)
    }

    /// Closes with `code`: writes the close frame, then reads what the client still sends
    /// until its close reply (at most [`CLOSE_REPLY_WAIT`]), so that the socket is not dropped
    /// with unread data. The acks read are queued for the connection's last commit; the other
    /// frames are not handled.
    async fn close(&mut self, code: u16, reason: &'static str) {
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        if self.write_message(close).await.is_err() || self.flush().await.is_err() {
            return;
        }
        let read = async {
            while let Some(Ok(message)) = self.socket.recv().await {
                if let Some(ack) = self.ack_in(&message)
                    && self.queued_acks.len() < acks::QUEUED_MAX
                {
                    // One naming no conversation would only be refused: it is dropped.
                    let _ = acks::queue(&mut self.queued_acks, ack);
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, read).await;
    }

    /// The ack `message` carries, if it is one.
    fn ack_in(&self, message: &Message) -> Option<Ack> {
        let data = frame_bytes(message, self.encoding)?;
        if data.len() > self.gateway.limits.max_frame_bytes {
            return None;
        }
        match self.encoding.decode_client(data) {
            Ok(ClientFrame::Ack(ack)) => Some(ack),
            _ => None,
        }
    }

    /// Encodes `frame` at once and returns its write: the frame, hundreds of bytes, is not
    /// kept in the connection's future while the write waits.
    fn write(
        &mut self,
        frame: impl Borrow<ServerFrame>,
    ) -> impl Future<Output = Result<(), Exit>> + '_ {
        let message = to_message(self.encoding, frame.borrow());
        self.write_message(message)
    }

    /// Buffers one message (written once the buffer is full, or at the next flush); a client
    /// that takes none for `write_timeout` is dropped.
    fn write_message(&mut self, message: Message) -> impl Future<Output = Result<(), Exit>> + '_ {
        let limit = self.gateway.limits.write_timeout;
        let io = self.socket.feed(message);
        Within {
            io,
            limit,
            signals: &self.signals,
            timer: None,
        }
        .map(written)
    }

    /// Writes out every buffered message.
    fn flush(&mut self) -> impl Future<Output = Result<(), Exit>> + '_ {
        self.flush_within(self.gateway.limits.write_timeout)
    }

    /// Writes out every buffered message, a `messages` page of `bytes` among them: its client
    /// has `write_timeout` for each [`PAGE_BYTES_PER_WRITE_TIMEOUT`] of it.
    fn flush_page(&mut self, bytes: usize) -> impl Future<Output = Result<(), Exit>> + '_ {
        let pieces = bytes.div_ceil(PAGE_BYTES_PER_WRITE_TIMEOUT).max(1);
        let pieces = u32::try_from(pieces).unwrap_or(u32::MAX);
        let limit = self.gateway.limits.write_timeout.saturating_mul(pieces);
        self.flush_within(limit)
    }

    fn flush_within(&mut self, limit: Duration) -> impl Future<Output = Result<(), Exit>> + '_ {
        let io = self.socket.flush();
        Within {
            io,
            limit,
            signals: &self.signals,
            timer: None,
        }
        .map(written)
    }

    fn write_error(
        &mut self,
        reference: Option<i64>,
        client_msg_id: Option<String>,
        e: ApiError,
    ) -> impl Future<Output = Result<(), Exit>> + '_ {
        let frame = self.error_frame(reference, client_msg_id, e);
        self.write(frame)
    }

    /// The `error` frame of `e`, counted.
    fn error_frame(
        &self,
        reference: Option<i64>,
        client_msg_id: Option<String>,
        e: ApiError,
    ) -> ServerFrame {
        self.gateway
            .metrics
            .errors
            .get_or_create(&CodeLabel {
                code: e.code.as_str(),
            })
            .inc();
        ServerFrame::Error(ErrorFrame {
            reference,
            code: e.code,
            message: e.message,
            client_msg_id,
            retry_after_ms: e.retry_after_ms,
        })
    }

    /// What one read of the socket brought: a message, an error, or its end.
    async fn on_read(&mut self, read: Option<Result<Message, axum::Error>>) -> Result<(), Exit> {
        match read {
            Some(Ok(message)) => {
                // Any message, a ping or pong too: its client is awake (the liveness pass).
                self.signals.read_now();
                self.on_message(message).await
            }
            Some(Err(e)) => Err(self.on_read_error(e)),
            None => Err(Exit::ClientGone),
        }
    }

    /// How a read error ends the connection: what its client sent and tungstenite refused is
    /// closed with the code RFC 6455 gives it (7.4.1), so that the client learns why, and
    /// the rest (the socket's errors, a client gone without a close frame) finds no one to
    /// tell. Told apart by the error's variant, which axum hands on boxed.
    fn on_read_error(&self, e: axum::Error) -> Exit {
        match e.into_inner().downcast::<tungstenite::Error>() {
            Ok(e) => read_error_exit(&e),
            Err(_) => Exit::ClientGone,
        }
    }

    /// Answers every send this connection has accepted (each waits at most `send_timeout`),
    /// then tells the client to reconnect elsewhere after the `after_ms` it was told and
    /// closes with 1001. Frames not read yet are not handled, but for acks
    /// ([`Connection::close`]): the client has no answer for them and sends them again after it
    /// reconnects. A catch-up or gap fill cut short has its events written again on the next
    /// connection: the device's cursor moves only on its acks.
    async fn drain(&mut self) -> Exit {
        while let Some(done) = self.pending.next().await {
            if let Err(exit) = self.on_sent(done).await {
                return exit;
            }
        }
        let after_ms = self.signals.reconnect_after_ms().unwrap_or(0);
        // A client that took no `reconnect` for `write_timeout` takes no close frame either:
        // it is dropped now rather than after a second wait for the close.
        match self
            .write(ServerFrame::Reconnect(Reconnect { after_ms }))
            .await
        {
            Ok(()) => Exit::Close(close_code::AWAY, "server draining; reconnect"),
            Err(exit) => exit,
        }
    }

    async fn on_message(&mut self, message: Message) -> Result<(), Exit> {
        let data = match (frame_bytes(&message, self.encoding), &message) {
            (Some(data), _) => data,
            (None, Message::Close(_)) => return Err(Exit::ClientGone),
            (None, Message::Ping(_) | Message::Pong(_)) => return Ok(()),
            (None, _) => {
                let encoding = self.encoding;
                let kind = if encoding == Encoding::Json {
                    "text"
                } else {
                    "binary"
                };
                let e = ApiError::bad_request(format!(
                    "{} takes {kind} frames",
                    encoding.subprotocol()
                ));
                return self.write_error(None, None, e).await;
            }
        };
        if data.len() > self.gateway.limits.max_frame_bytes {
            return Err(Exit::Close(close_code::SIZE, "message too big"));
        }
        let frame = match self.encoding.decode_client(data) {
            Ok(frame) => frame,
            Err(e) => {
                let (reference, client_msg_id) = self.encoding.salvage_ids(data);
                let e = ApiError::bad_request(e.to_string());
                return self.write_error(reference, client_msg_id, e).await;
            }
        };
        if let Err(e) = self.take_frame_rate() {
            let (reference, client_msg_id) = answer_ids(&frame);
            return self.write_error(reference, client_msg_id, e).await;
        }
        if self.acks.is_some() {
            match frame {
                ClientFrame::Ack(ack) => {
                    let reference = ack.reference;
                    if let Err(e) = acks::queue(&mut self.queued_acks, ack) {
                        return self.write_error(reference, None, e).await;
                    }
                }
                other => self.held = Some(Box::new(other)),
            }
            return Ok(());
        }
        self.handle(frame).await
    }

    /// Takes one frame from the connection's rate (`--connection-frames-per-sec`): past it,
    /// the refusal to answer the frame with, counted.
    fn take_frame_rate(&mut self) -> Result<(), ApiError> {
        self.frames.check().inspect_err(|_| {
            let scope = ScopeLabel {
                scope: "connection",
            };
            self.gateway
                .metrics
                .rate_limited
                .get_or_create(&scope)
                .inc();
        })
    }

    /// Reads what the client has sent while a catch-up or gap fill keeps the connection from
    /// its loop, as long as it is acks, and commits them as the loop does (one commit under
    /// way, those read meanwhile queued behind it, the refused ones answered once it ends):
    /// a device acknowledges a long catch-up as it reads it, and a connection lost midway (a
    /// phone's network) resumes after what it acknowledged. Left unread until the catch-up
    /// ended, they were lost with the connection, and each reconnect began the whole catch-up
    /// again. WebSocket pings and pongs are passed over, as the loop passes them over. The
    /// first other read that is not an ack is kept for the loop ([`Connection::unread`]), and
    /// nothing more is read until it is handled, so frames keep their order.
    async fn take_acks(&mut self) -> Result<(), Exit> {
        // An unlinked device's acks are not committed (they would bring back the cursors the
        // unlink dropped): its connection ends first, as the loop's does.
        self.told_to_close()?;
        // A frame held behind the commit under way (a gap fill amid the loop) is handled
        // first, by the loop once that commit ends.
        if self.held.is_some() {
            return Ok(());
        }
        if let Some(refused) = self.acks.as_mut().and_then(|acks| acks.now_or_never()) {
            self.acks = None;
            for (reference, e) in refused {
                self.write_error(reference, None, e).await?;
            }
        }
        while self.unread.is_none() && self.queued_acks.len() < acks::QUEUED_MAX {
            let Some(read) = self.socket.recv().now_or_never() else {
                break;
            };
            let ack = match &read {
                // Nothing to handle (the WebSocket answers a ping by itself), as in the loop.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(message)) => self.ack_in(message),
                _ => None,
            };
            let Some(ack) = ack else {
                self.unread = Some(Box::new(read));
                break;
            };
            let reference = ack.reference;
            let queued = self
                .take_frame_rate()
                .and_then(|()| acks::queue(&mut self.queued_acks, ack));
            if let Err(e) = queued {
                self.write_error(reference, None, e).await?;
            }
        }
        if self.acks.is_none() && !self.queued_acks.is_empty() {
            let queued = std::mem::take(&mut self.queued_acks);
            self.acks = Some(self.commit_acks(queued));
        }
        Ok(())
    }

    /// Handles `frame`, answering a refusal with an `error` frame.
    async fn handle(&mut self, frame: ClientFrame) -> Result<(), Exit> {
        let (reference, client_msg_id) = answer_ids(&frame);
        if let Err(e) = self.on_frame(frame).await? {
            self.write_error(reference, client_msg_id, e).await?;
        }
        Ok(())
    }

    /// A commit of acks ended: answers the refused ones, then commits the acks read
    /// meanwhile, or else handles the frame held back behind them.
    async fn on_acked(&mut self, refused: Vec<(Option<i64>, ApiError)>) -> Result<(), Exit> {
        self.acks = None;
        for (reference, e) in refused {
            self.write_error(reference, None, e).await?;
        }
        if !self.queued_acks.is_empty() {
            let queued = std::mem::take(&mut self.queued_acks);
            self.acks = Some(self.commit_acks(queued));
        } else if let Some(frame) = self.held.take() {
            return self.handle(*frame).await;
        }
        Ok(())
    }

    fn commit_acks(&self, acks: Vec<Ack>) -> PendingAcks {
        let gateway = &self.gateway;
        acks::commit(
            gateway.chat.clone(),
            self.who.clone(),
            gateway.metrics.clone(),
            acks,
        )
    }

    /// Handles one decoded frame. The outer error ends the connection; the inner one is
    /// answered with an `error` frame.
    async fn on_frame(&mut self, frame: ClientFrame) -> Result<Result<(), ApiError>, Exit> {
        let chat = self.gateway.chat.clone();
        match frame {
            ClientFrame::Send(send) => {
                let started = Instant::now();
                match chat.submit_send(&self.who, &send).await {
                    Ok((conversation_id, pending)) => {
                        self.await_sent(
                            send.reference,
                            send.client_msg_id,
                            conversation_id,
                            started,
                            pending,
                        );
                        Ok(Ok(()))
                    }
                    Err(e) => Ok(Err(e)),
                }
            }
            ClientFrame::Delete(delete) => {
                let started = Instant::now();
                match chat.submit_delete(&self.who, &delete).await {
                    Ok((client_msg_id, pending)) => {
                        let conversation_id = delete.conversation_id;
                        self.await_sent(
                            delete.reference,
                            client_msg_id,
                            conversation_id,
                            started,
                            pending,
                        );
                        Ok(Ok(()))
                    }
                    Err(e) => Ok(Err(e)),
                }
            }
            ClientFrame::Typing(typing) => {
                if self.typing.check().is_err() {
                    self.gateway.metrics.typing_dropped.inc();
                    return Ok(Ok(()));
                }
                Ok(chat.typing(&self.who, &typing).await)
            }
            ClientFrame::Ack(ack) => {
                self.acks = Some(self.commit_acks(vec![ack]));
                Ok(Ok(()))
            }
            ClientFrame::Fetch(fetch) => {
                // Room for the page at its most before it is read, lowered once encoded.
                let mut room = match self.gateway.pages.reserve_page(&self.who.user, fetch.limit) {
                    Ok(room) => room,
                    Err(refused) => return Ok(Err(refused)),
                };
                let after = fetch.after_seq.unwrap_or(0);
                match chat
                    .fetch(&self.who, &fetch.conversation_id, after, fetch.limit)
                    .await
                {
                    Ok(page) => {
                        // The events are dropped once encoded: only the encoded page is held
                        // while its client reads it.
                        let reply = to_message(
                            self.encoding,
                            &ServerFrame::Messages(Messages {
                                reference: fetch.reference,
                                conversation_id: fetch.conversation_id.clone(),
                                events: page.events,
                                head_seq: page.head_seq,
                            }),
                        );
                        let bytes = match &reply {
                            Message::Text(text) => text.len(),
                            Message::Binary(bytes) => bytes.len(),
                            _ => 0,
                        };
                        room.settle(bytes);
                        if let Some(floor_seq) = page.trimmed {
                            self.write(ServerFrame::Trimmed(Trimmed {
                                conversation_id: fetch.conversation_id,
                                floor_seq,
                            }))
                            .await?;
                        }
                        self.write_message(reply).await?;
                        // The page's room is given back once its client has taken it.
                        self.flush_page(bytes).await?;
                        drop(room);
                        Ok(Ok(()))
                    }
                    Err(e) => Ok(Err(e)),
                }
            }
            ClientFrame::Sync(sync) => {
                for conv in sync.cursors.keys() {
                    if let Err(e) = courier_proto::ids::conversation_id(conv) {
                        return Ok(Err(e.into()));
                    }
                }
                match self.catch_up(&sync.cursors).await {
                    Ok(()) => Ok(Ok(())),
                    Err(exit) => Err(exit),
                }
            }
            ClientFrame::Ping(ping) => self
                .write(ServerFrame::Pong(Pong {
                    reference: ping.reference,
                }))
                .await
                .map(Ok),
        }
    }

    /// Waits (concurrently with the rest of the connection) for a sequenced append, then
    /// answers `sent` or `error`.
    fn await_sent(
        &mut self,
        reference: Option<i64>,
        client_msg_id: String,
        conversation_id: String,
        started: Instant,
        pending: courier_core::sequencing::PendingAppend,
    ) {
        let timeout = self.gateway.limits.send_timeout;
        self.pending.push(Box::pin(async move {
            let outcome = match tokio::time::timeout(timeout, pending).await {
                Ok(result) => result.map_err(ApiError::from),
                Err(_) => Err(ApiError::from(SequencerError::Overloaded)),
            };
            SendResult {
                reference,
                client_msg_id,
                conversation_id,
                started,
                outcome,
            }
        }));
    }

    /// Answers a finished send with `sent` or `error`. The first in a conversation this
    /// connection has not seen yet (a group it was added to, a direct conversation a peer
    /// started, one it left and is back in, a retry answered `duplicate`) reads where the
    /// device is in it first, before the client has the `sent` and may acknowledge it: what
    /// the device had before its message is not known from it (rare, so boxed). If that read
    /// fails, the `sent` is written all the same (its message is durable, and the connection
    /// stays open): the conversation stays unseen, and its next event reads the cursor again.
    fn on_sent(&mut self, done: SendResult) -> impl Future<Output = Result<(), Exit>> + '_ {
        let unseen = matches!(&done.outcome, Ok(outcome) if outcome.seq > 1)
            && self.upto.get(&done.conversation_id).is_none();
        if unseen {
            Either::Left(
                async move {
                    if let Err(e) = self.read_cursor(&done.conversation_id).await {
                        let conversation_id = &done.conversation_id;
                        tracing::warn!(user = %self.who.user, device = %self.who.device, conversation_id, error = %e, "could not read the device's cursor before its sent; its next event reads it");
                    }
                    self.answer_sent(done).await
                }
                .boxed(),
            )
        } else {
            Either::Right(self.answer_sent(done))
        }
    }

    /// [`Connection::on_sent`], once the connection knows where its device is in the
    /// conversation (or the message is the conversation's first).
    fn answer_sent(&mut self, done: SendResult) -> impl Future<Output = Result<(), Exit>> + '_ {
        let SendResult {
            reference,
            client_msg_id,
            conversation_id,
            started,
            outcome,
        } = done;
        let frame = match outcome {
            Ok(outcome) => {
                let metrics = &self.gateway.metrics;
                metrics
                    .send_ack_latency
                    .observe(started.elapsed().as_secs_f64());
                if outcome.duplicate {
                    metrics.send_retries.inc();
                }
                // The device has its own message: live delivery may continue past it.
                let upto = self.upto.get(&conversation_id).unwrap_or(0);
                if upto.saturating_add(1) == outcome.seq {
                    self.upto.wrote(conversation_id.as_str(), outcome.seq);
                }
                ServerFrame::Sent(Sent {
                    reference,
                    client_msg_id,
                    conversation_id,
                    seq: outcome.seq,
                    server_msg_id: outcome.server_msg_id,
                    ts_ms: outcome.ts_ms,
                    duplicate: outcome.duplicate,
                })
            }
            Err(e) => self.error_frame(reference, Some(client_msg_id), e),
        };
        self.write(frame)
    }

    async fn on_delivery(&mut self, delivery: Delivery, signals: &Signals) -> Result<(), Exit> {
        match delivery {
            Delivery::Frames(frames) => {
                let written = self.write_all(&frames).await;
                signals.wrote_offered(frames.len());
                written
            }
            Delivery::Event(shared) => self.on_live_event(shared).await,
        }
    }

    async fn write_all(&mut self, frames: &[Arc<ServerFrame>]) -> Result<(), Exit> {
        for frame in frames {
            self.write(&**frame).await?;
        }
        Ok(())
    }

    /// The highest seq of `conv` written to this connection or known to its device.
    async fn upto(&mut self, conv: &str) -> Result<u64, Exit> {
        if let Some(upto) = self.upto.get(conv) {
            return Ok(upto);
        }
        match self.read_cursor(conv).await {
            Ok(cursor) => Ok(cursor),
            Err(e) => {
                self.write_error(None, None, e.into()).await?;
                Err(Exit::Close(close_code::ERROR, "storage error; reconnect"))
            }
        }
    }

    /// Takes the device's cursor in `conv` as the connection's place there: for a conversation
    /// this connection has not seen yet (joined after connecting, or forgotten, [`upto`]); what
    /// it may not read is skipped when the gap is filled.
    async fn read_cursor(&mut self, conv: &str) -> Result<u64, StoreError> {
        let store = &self.gateway.store;
        let cursor = store
            .device_cursor(&self.who.user, &self.who.device, conv)
            .await?;
        self.upto.read_cursor(conv, cursor);
        Ok(cursor)
    }

    /// Writes from the store the events of `conv` after what this connection has written,
    /// through `through`, that its user may read (events sequenced while it was a member),
    /// after `trimmed` if retention cleared some of them, as a catch-up does.
    async fn fill(&mut self, conv: &str, through: u64) -> Result<(), Exit> {
        let upto = self.upto(conv).await?;
        if through <= upto {
            return Ok(());
        }
        // Every event delivered live (or dropped from a full queue) was committed first: a gap
        // past the conversation's head comes of a seq damaged in an outbox entry or in transit,
        // and is filled up to the head only (that event then lies past the place, passed
        // over). Filled through it, the connection's place went past every later event of the
        // conversation, none written to it until it reconnected.
        let head = match self.gateway.store.head(conv).await {
            Ok(head) => head,
            Err(e) => return self.fill_failed(conv, e.into()).await,
        };
        if through > head {
            tracing::warn!(
                conversation = conv,
                through,
                head,
                "a gap past its conversation's head (a delivered event's seq is damaged) is filled up to the head"
            );
        }
        let through = through.min(head);
        if through > upto {
            let readable = match self.gateway.chat.readable(conv, &self.who.user).await {
                Ok(readable) => readable,
                Err(e) => return self.fill_failed(conv, e).await,
            };
            let gap = CatchUp {
                conversation_id: conv.to_owned(),
                from: upto,
                head: through,
                visible: readable.visibility(),
                trimmed: readable.trimmed_after(upto),
            };
            self.stream_events(&gap, false).await?;
        }
        Ok(())
    }

    /// Ends a gap fill of `conv` that failed with `e`. A record of the conversation that is
    /// damaged (`internal`: its head or floor, which a retry or a reconnect meets again) fails
    /// that conversation alone, as an event that does not decode does
    /// ([`Connection::stopped_at`]): the client is told, naming the conversation, the
    /// connection's place there stays where it was (the live event that asked for the fill is
    /// not written) and the connection stays open. Closed for it, the connection of every
    /// member was closed at each event of that conversation, and reconnected to be closed
    /// again. Any other error closes it: its client reconnects and catches up.
    async fn fill_failed(&mut self, conv: &str, e: ApiError) -> Result<(), Exit> {
        if e.code != ErrorCode::Internal {
            self.write_error(None, None, e).await?;
            return Err(Exit::Close(close_code::ERROR, "storage error; reconnect"));
        }
        self.write_error(None, None, unreadable_conversation(conv, &e.message))
            .await
    }

    /// Writes a live event in order: events already written are skipped, a gap (events this
    /// connection has not seen) is filled from the store first.
    async fn on_live_event(&mut self, shared: Arc<SharedEvent>) -> Result<(), Exit> {
        let event = &shared.event;
        let conv = &event.conversation_id;
        if event.seq == 0 {
            // No event has it (seqs start at 1): damage in an outbox entry or in transit.
            // Passed over, the conversation's next events come as before; taken, the gap
            // before it ran through `u64::MAX`, past every later event.
            tracing::warn!(
                conversation = %conv,
                "a delivered event at seq 0 is passed over"
            );
            return Ok(());
        }
        // A gap, or a conversation this connection has not seen yet, is filled from the store
        // first: rare, so boxed, which keeps the connection's task small while it waits.
        if self.upto.get(conv).is_none_or(|upto| event.seq - 1 > upto) {
            Box::pin(self.fill(conv, event.seq - 1)).await?;
        }
        // `fill` recorded how far the connection is in `conv`: past the event, or before an
        // event it could not decode and told the client of, which nothing passes.
        let upto = self.upto.get(conv).unwrap_or(0);
        if event.seq <= upto || event.seq - 1 > upto {
            return Ok(());
        }
        self.upto.wrote(conv.as_str(), event.seq);
        let queued = shared.handed_off.elapsed().as_secs_f64();
        self.gateway.metrics.stages.connection_queue.observe(queued);
        self.write_message(shared.message(self.encoding)).await
    }

    /// Writes from the store the events a full queue dropped.
    async fn refill(&mut self, behind: Vec<(String, u64)>) -> Result<(), Exit> {
        for (conv, through) in behind {
            self.fill(&conv, through).await?;
        }
        Ok(())
    }

    /// Sends every event above the device's cursors (or `overrides`), then `sync_done`; of a
    /// conversation the plan passed over (a stored record of it damaged), an `internal` error
    /// naming it.
    async fn catch_up(&mut self, overrides: &BTreeMap<String, u64>) -> Result<(), Exit> {
        let plan = match self.gateway.chat.catch_up_plan(&self.who, overrides).await {
            Ok(plan) => plan,
            Err(e) => {
                self.write_error(None, None, e).await?;
                return Err(Exit::Close(close_code::ERROR, "catch-up failed; reconnect"));
            }
        };
        let CatchUpPlan {
            ranges,
            resume,
            unreadable,
        } = plan;
        // Passed over silently, the device took its catch-up for whole.
        for (conv, reason) in unreadable {
            self.write_error(None, None, unreadable_conversation(&conv, &reason))
                .await?;
        }
        for (conv, cursor) in resume {
            // A client's override is what it says it has, not a cursor the store keeps: a
            // place from it is not forgotten (`upto`).
            if overrides.contains_key(&conv) {
                self.upto.wrote(conv, cursor);
            } else {
                self.upto.read_cursor(conv, cursor);
            }
        }
        for range in &ranges {
            self.stream_events(range, true).await?;
        }
        self.write(ServerFrame::SyncDone(SyncDone {})).await
    }

    /// Writes the events of `range` its user may read from the store, after `trimmed` if
    /// retention cleared some of those it asks for; `own` also includes the device's own sends
    /// (a catch-up does, a gap fill does not: the device had `sent` for them,
    /// [`Connection::is_own`]). Events it may not read are skipped without being read.
    ///
    /// An event this node cannot decode (damage, or a kind only a newer node knows, in a
    /// rolling upgrade) stops the range there: the events before it are written, then an
    /// `internal` error naming the conversation and the seq, and the connection's place stays
    /// before it, so neither this range nor a later gap fill or live event writes past it
    /// (the device's cursor, moved by its acks, never passes an event it did not get). The
    /// connection stays open and a catch-up goes on with the other conversations: failing it
    /// whole locked the user out of every conversation at every reconnect.
    ///
    /// Retention may clear events of `range` after its floor was read (the plan's, a while ago
    /// in a long catch-up): a step that does not start where it was asked to (a
    /// conversation's seqs are dense but for trims) has the floor read again, and `trimmed`
    /// written with it before the events, once per range, as a connection made a moment later
    /// would have been told.
    async fn stream_events(&mut self, range: &CatchUp, own: bool) -> Result<(), Exit> {
        let store = self.gateway.store.clone();
        let conv = &range.conversation_id;
        if let Some(floor_seq) = range.trimmed {
            self.write(ServerFrame::Trimmed(Trimmed {
                conversation_id: conv.clone(),
                floor_seq,
            }))
            .await?;
        }
        let mut told_trimmed = false;
        for (mut after, through) in range.visible.ranges(range.from, range.head) {
            while after < through {
                let limit = CATCH_UP_PAGE.min((through - after) as usize);
                let step = store.events_within_until_undecodable(
                    conv,
                    after,
                    through,
                    limit,
                    CATCH_UP_STEP_BYTES,
                );
                let (events, undecodable) = match step.await {
                    Ok(step) => step,
                    Err(e) => {
                        self.write_error(None, None, e.into()).await?;
                        return Err(Exit::Close(close_code::ERROR, "storage error; reconnect"));
                    }
                };
                let first = events.first().map(|e| e.seq);
                let first = first.or(undecodable.as_ref().map(|u| u.seq));
                if !told_trimmed && first != Some(after + 1) {
                    told_trimmed = true;
                    let floor_seq = match store.floor(conv).await {
                        Ok(floor) => floor,
                        Err(e) => {
                            self.write_error(None, None, e.into()).await?;
                            return Err(Exit::Close(close_code::ERROR, "storage error; reconnect"));
                        }
                    };
                    if floor_seq > after + 1 {
                        self.write(ServerFrame::Trimmed(Trimmed {
                            conversation_id: conv.clone(),
                            floor_seq,
                        }))
                        .await?;
                    }
                }
                let last = events.last().map(|e| e.seq);
                // The connection reads only acks from its client until the range is written,
                // however long that takes at the client's pace: its silence is this step's,
                // not its client's (a client that takes nothing is dropped by the write
                // timeout).
                self.signals.read_now();
                self.take_acks().await?;
                for event in events {
                    self.told_to_close()?;
                    if own || !self.is_own(&event) {
                        self.write(ServerFrame::Event(event)).await?;
                    }
                }
                if let Some(undecodable) = undecodable {
                    return self.stopped_at(conv, undecodable).await;
                }
                let Some(last) = last else {
                    break;
                };
                after = last;
            }
        }
        self.upto.wrote(conv.as_str(), range.head);
        Ok(())
    }

    /// Stops the writing of `conv` before its event that does not decode (see
    /// [`Connection::stream_events`]): the connection's place is the seq before it, and the
    /// client is told `internal`, with the conversation and the seq.
    async fn stopped_at(&mut self, conv: &str, undecodable: UndecodableEvent) -> Result<(), Exit> {
        let UndecodableEvent { seq, error } = undecodable;
        tracing::error!(
            conversation = conv,
            seq,
            %error,
            "a stored event this node cannot decode: its conversation is written to the client up to it only"
        );
        self.upto.wrote(conv, seq.saturating_sub(1));
        let reason = match error {
            StoreError::Corrupt { reason, .. } => reason,
            other => other.to_string(),
        };
        let message = format!(
            "internal error: the event at seq {seq} of conversation {conv} cannot be read by this \
             server ({reason}); nothing of that conversation after it is sent"
        );
        self.write_error(None, None, ApiError::new(ErrorCode::Internal, message))
            .await
    }

    /// Ends the connection if it was told to close or to reconnect: looked at between the
    /// events of a catch-up or gap fill, however long, as the loop looks at its signals between
    /// two steps, so an unlinked device gets no more of it, a connection replaced by newer ones
    /// of its device does not stay open for as long as its client reads, and a draining gateway
    /// has its connections say `reconnect` and close within its deadline.
    fn told_to_close(&self) -> Result<(), Exit> {
        if self.signals.is_raised(Signal::Unlinked) {
            return Err(Exit::Unlinked);
        }
        if self.signals.is_raised(Signal::Replaced) {
            return Err(REPLACED);
        }
        if self.signals.is_raised(Signal::Reconnect) {
            return Err(Exit::Reconnect);
        }
        Ok(())
    }

    /// Whether `event` is one of this device's sends, answered with `sent` rather than itself.
    fn is_own(&self, event: &Event) -> bool {
        event.payload.answered_with_sent()
            && event.sender.user == self.who.user
            && event.sender.device == self.who.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::LazyLock;

    fn within<F: Future + Unpin>(io: F) -> Within<'static, F> {
        static SIGNALS: LazyLock<Signals> = LazyLock::new(Signals::default);
        Within {
            io,
            limit: Duration::from_secs(30),
            signals: &SIGNALS,
            timer: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_ready_at_once_sets_no_timer() {
        let mut write = within(std::future::ready(7));
        assert_eq!((&mut write).await, Some(7));
        assert!(write.timer.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_gives_up_at_its_limit_and_not_before() {
        let (done, waiting) = tokio::sync::oneshot::channel::<()>();
        let started = tokio::time::Instant::now();
        assert_eq!(within(waiting).await, None, "the client never took it");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        drop(done);

        let (done, waiting) = tokio::sync::oneshot::channel();
        let write = tokio::spawn(within(waiting));
        tokio::time::sleep(Duration::from_secs(29)).await;
        done.send(()).unwrap();
        assert_eq!(write.await.unwrap(), Some(Ok(())));
    }
}
