//! The route registry: which connections each user has open on this gateway. Live connection
//! state is in memory only. It is the in-process binding of [`Gateways`]: fanout, chat,
//! receipts, device unlinks and the notifier reach connections through it, and deliveries go
//! to connection queues.

use axum::extract::ws::Message;
use courier_core::clock::now_ms;
use courier_core::gateways::{DeliveryError, Gateways, Offer, Refused};
use courier_core::membership::Members;
use courier_core::metrics::Metrics;
use courier_proto::{Encoding, Event, Payload, ServerFrame};
use courier_store::StoreError;
use foldhash::{HashMap, HashMapExt};
use futures::task::AtomicWaker;
use smallvec::SmallVec;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

/// An event shared by every connection it goes to, encoded at most once per encoding.
pub struct SharedEvent {
    pub event: Event,
    /// When fanout handed it off (for the time it waits in connection queues).
    pub handed_off: std::time::Instant,
    json: OnceLock<Message>,
    proto: OnceLock<Message>,
}

impl SharedEvent {
    pub fn new(event: Event) -> Arc<Self> {
        Arc::new(Self {
            event,
            handed_off: std::time::Instant::now(),
            json: OnceLock::new(),
            proto: OnceLock::new(),
        })
    }

    /// The `event` frame in `encoding`, ready to write.
    pub fn message(&self, encoding: Encoding) -> Message {
        let cell = match encoding {
            Encoding::Json => &self.json,
            Encoding::Proto => &self.proto,
        };
        cell.get_or_init(|| payload_message(encoding.encode_event(&self.event)))
            .clone()
    }
}

/// Encodes a frame as a WebSocket message of the connection's subprotocol.
pub fn to_message(encoding: Encoding, frame: &ServerFrame) -> Message {
    payload_message(encoding.encode_server(frame))
}

fn payload_message(payload: Payload) -> Message {
    match payload {
        Payload::Text(text) => Message::Text(text.into()),
        Payload::Binary(bytes) => Message::Binary(bytes.into()),
    }
}

/// What fanout hands to a connection.
#[derive(Clone)]
pub enum Delivery {
    Event(Arc<SharedEvent>),
    /// Frames offered together ([`Gateways::offer`]), written in order.
    Frames(Arc<[Arc<ServerFrame>]>),
}

/// What the registry and fanout tell a connection besides its deliveries: flags its task
/// takes when it next polls them, and one waker. Polling a flag costs an atomic load and a
/// waker registration (no lock, nothing to drop), which matters because a busy connection polls
/// them at every turn of its loop.
#[derive(Default)]
pub struct Signals {
    /// The signals raised and not yet taken ([`Signal`] bits).
    raised: AtomicU8,
    /// The connection's task, woken when a signal is raised.
    waker: AtomicWaker,
    /// The `after_ms` of its `reconnect`, set once, when it is told.
    reconnect_after_ms: OnceLock<u64>,
    /// Per conversation, the highest seq dropped since the connection last caught up.
    behind: Mutex<Vec<(String, u64)>>,
    /// Offered frames queued and not yet written ([`ConnectionHandle::deliver_droppable`]).
    offered: AtomicUsize,
    /// Told to close for newer connections of its device ([`Signal::Replaced`]): it no longer
    /// counts against the device's limit while it closes (its close takes seconds).
    replaced: AtomicBool,
    /// Its connection is leaving ([`Routes::leave`]): its device's route no longer counts it.
    leaving: AtomicBool,
    /// When its connection last read a message from its client (a frame, a WebSocket ping or
    /// pong), on the [`tick_ms`] clock: what the liveness pass ([`Routes::ping_or_close`])
    /// looks at. Four bytes in the padding after the flags, stored once per read. This and
    /// `pinged` are stored by the connection's task only, and moved later by the time it
    /// waits on writes to its client ([`Signals::waited_on_write`]).
    last_read: AtomicU32,
    /// When its connection wrote the first WebSocket ping since its last read, on the
    /// [`tick_ms`] clock (1 at least); 0: none since. The ping its client has had to answer.
    pinged: AtomicU32,
}

/// Milliseconds since the first call, on the monotonic clock, in 32 bits: the time of a
/// connection's last read ([`Signals::read_now`]). It wraps every 49.7 days, and the time
/// since a read is taken modulo that, up to 24.8 days: right while the liveness pass runs at
/// least every few hours (`--ping-interval` is at most an hour), which closes a silent
/// connection long before.
fn tick_ms() -> u32 {
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    // Truncated: the clock wraps (see above).
    EPOCH.elapsed().as_millis() as u32
}

/// How long ago `tick` ([`tick_ms`]) was.
fn since_tick(tick: u32) -> Duration {
    let since = tick_ms().wrapping_sub(tick);
    // A time stored by another thread just after this one's clock was read is a moment ahead
    // of it: none (not 49 days).
    let since = if since > u32::MAX / 2 { 0 } else { since };
    Duration::from_millis(u64::from(since))
}

/// A signal to a connection, raised until the connection takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Signal {
    /// The connection's device was unlinked: the connection closes.
    Unlinked = 1,
    /// The connection is told to reconnect elsewhere ([`Signals::tell_to_reconnect`]): its
    /// gateway drains, or its gateway's lease in the cluster lapsed (its routes may have been
    /// swept). It answers the sends it accepted, says `reconnect` and closes.
    Reconnect = 2,
    /// Events were dropped from its full queue; [`Signals::take_behind`] says up to where.
    Lagged = 4,
    /// Its device opened more connections since than a device may hold
    /// ([`MAX_CONNECTIONS_PER_DEVICE`]): the oldest closes.
    Replaced = 8,
    /// The liveness pass asks for a WebSocket ping ([`Routes::ping_or_close`]): the client's
    /// WebSocket library answers it with a pong by itself, unless its app is suspended.
    Ping = 16,
    /// Its client read and answered nothing for two ping intervals, a ping it was written
    /// among them ([`Signals::is_silent`]; an app suspended by its OS, its TCP connection kept
    /// alive by the kernel): the connection closes, 1001.
    Silent = 32,
}

/// What one liveness pass over the connections did ([`Routes::ping_or_close`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Liveness {
    /// Connections told to send a ping.
    pub pinged: usize,
    /// Connections told to close: nothing read from them for two intervals.
    pub closed: usize,
}

/// The `reconnect` delays of the connections told to reconnect for an event their gateway
/// could not decode nor place ([`Gateways::missed`]) are drawn below this (the default
/// `--reconnect-jitter`): a group's members do not all come back at once.
pub const MISSED_RECONNECT_JITTER: Duration = Duration::from_secs(2);

/// Connections one device may hold on a gateway: one, and a few more while a dead one is not
/// yet found dead or several instances of an app share a device id. Past it the oldest is
/// closed, so that one token cannot open connections until the node runs out of them.
pub const MAX_CONNECTIONS_PER_DEVICE: usize = 16;

/// One open connection, as the registry sees it.
#[derive(Clone)]
pub struct ConnectionHandle {
    pub id: u64,
    pub device: String,
    /// The `iat` of the token the connection was opened with (ms; 0: none), which an unlink
    /// of its device refuses or not ([`Routes::close_refused`]).
    pub issued_at_ms: u64,
    queue: flume::Sender<Delivery>,
    pub signals: Arc<Signals>,
}

/// What became of a delivery to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    Queued,
    /// The queue was full and the delivery an event: it was dropped, and the connection reads
    /// it (and whatever else it missed) from the store once it has written what is queued.
    Lagged,
    /// The connection has ended.
    Gone,
}

/// Share of a connection's queue kept free of droppable frames (typing, receipts), so events
/// go first.
const DROPPABLE_HEADROOM: usize = 4;

impl ConnectionHandle {
    /// Queues an event; a full queue never closes the connection.
    pub fn deliver(&self, shared: &Arc<SharedEvent>) -> Handoff {
        match self.queue.try_send(Delivery::Event(shared.clone())) {
            Ok(()) => Handoff::Queued,
            Err(flume::TrySendError::Full(_)) => {
                let event = &shared.event;
                self.signals.fell_behind(&event.conversation_id, event.seq);
                Handoff::Lagged
            }
            Err(flume::TrySendError::Disconnected(_)) => Handoff::Gone,
        }
    }

    /// Queues frames that may be lost (typing) or are retried by their sender (receipts), as
    /// one delivery: only while the queue is at most three quarters full, and while the frames
    /// offered and not yet written stay within three quarters of its capacity, or none are
    /// (so a connection holds at most one batch above that, of at most a group's members).
    /// Returns whether they were queued.
    pub fn deliver_droppable(&self, frames: &Arc<[Arc<ServerFrame>]>) -> bool {
        // The queue is bounded (`Routes::register`), so its capacity is known.
        let capacity = self.queue.capacity().unwrap_or(usize::MAX);
        let limit = capacity - capacity / DROPPABLE_HEADROOM;
        let offered = self.signals.offered.load(Ordering::Relaxed);
        let room = self.queue.len() < limit && (offered == 0 || offered + frames.len() <= limit);
        if !room {
            return false;
        }
        self.signals
            .offered
            .fetch_add(frames.len(), Ordering::Relaxed);
        let queued = self
            .queue
            .try_send(Delivery::Frames(frames.clone()))
            .is_ok();
        if !queued {
            self.signals.wrote_offered(frames.len());
        }
        queued
    }

    /// Tells the connection that its device was unlinked: it closes.
    pub fn close_unlinked(&self) {
        self.signals.raise(Signal::Unlinked);
    }

    /// Tells the connection to reconnect elsewhere (`reconnect` with `after_ms`); returns
    /// false if it had been told already (the first telling holds).
    pub fn tell_to_reconnect(&self, after_ms: u64) -> bool {
        self.signals.tell_to_reconnect(after_ms)
    }
}

impl Signals {
    fn raise(&self, signal: Signal) {
        self.raised.fetch_or(signal as u8, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Takes `signal` if it was raised.
    fn take(&self, signal: Signal) -> bool {
        let bit = signal as u8;
        self.raised.load(Ordering::Acquire) & bit != 0
            && self.raised.fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Whether `signal` is raised, without taking it: for a connection's long steps (a
    /// catch-up), which the signals would otherwise wait for.
    pub fn is_raised(&self, signal: Signal) -> bool {
        self.raised.load(Ordering::Acquire) & signal as u8 != 0
    }

    /// Waits until `signal` is raised and takes it. For the connection's own task only: the
    /// signals have one waker.
    pub fn taken(&self, signal: Signal) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.take(signal) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // Raised between the first look and the registration: its wake may have missed us.
            if self.take(signal) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// See [`ConnectionHandle::tell_to_reconnect`].
    pub fn tell_to_reconnect(&self, after_ms: u64) -> bool {
        let told = self.reconnect_after_ms.set(after_ms).is_ok();
        if told {
            self.raise(Signal::Reconnect);
        }
        told
    }

    /// The `after_ms` the connection was told to reconnect with, if it was.
    pub fn reconnect_after_ms(&self) -> Option<u64> {
        self.reconnect_after_ms.get().copied()
    }

    /// Records that the connection read a message from its client now: a frame, a WebSocket
    /// ping or pong. One clock read and two relaxed stores.
    pub fn read_now(&self) {
        self.last_read.store(tick_ms(), Ordering::Relaxed);
        self.pinged.store(0, Ordering::Relaxed);
    }

    /// Records that the connection has written a WebSocket ping to its client: the first
    /// since its last read is the one the liveness pass waits on an answer to.
    pub fn wrote_ping(&self) {
        if self.pinged.load(Ordering::Relaxed) == 0 {
            self.pinged.store(tick_ms().max(1), Ordering::Relaxed);
        }
    }

    /// Records that the connection has just waited `waited` on a write to its client (the
    /// socket full: the client reads slower than it is written, or not at all). Meanwhile
    /// the connection read nothing and could write no ping, whatever its client did: the
    /// time counts neither as the client's silence nor as time it had to answer a ping,
    /// which go on from where they were before the wait. A client that reads nothing at all
    /// is dropped by the write's own timeout.
    pub fn waited_on_write(&self, waited: Duration) {
        let now = tick_ms();
        let waited = u32::try_from(waited.as_millis()).unwrap_or(u32::MAX);
        // Never past now: the wait began after the read, or the ping.
        let later = |tick: u32| tick.wrapping_add(waited.min(now.wrapping_sub(tick)));
        let last = self.last_read.load(Ordering::Relaxed);
        self.last_read.store(later(last), Ordering::Relaxed);
        let pinged = self.pinged.load(Ordering::Relaxed);
        if pinged != 0 {
            self.pinged.store(later(pinged).max(1), Ordering::Relaxed);
        }
    }

    /// How long ago the connection last read a message from its client (or was registered,
    /// or last wrote a page of a catch-up, which keeps it from reading), less the time it
    /// waited on writes to its client since ([`Signals::waited_on_write`]).
    pub fn silent_for(&self) -> Duration {
        since_tick(self.last_read.load(Ordering::Relaxed))
    }

    /// How long ago the connection wrote the first WebSocket ping its client has not
    /// answered (nothing read since), less the time it waited on writes to its client since;
    /// `None` if it wrote none since its last read.
    pub fn ping_unanswered_for(&self) -> Option<Duration> {
        match self.pinged.load(Ordering::Relaxed) {
            0 => None,
            pinged => Some(since_tick(pinged)),
        }
    }

    /// Whether the connection's client is silent for the liveness pass of `interval`
    /// ([`Routes::ping_or_close`]): nothing read from it for two intervals, and a ping
    /// written to it for half an interval at least and not answered. Both leave out the time
    /// the connection waited on writes to the client: a client on a slow link, which the
    /// connection could write no ping to (or whose pong it could not read) for as long as a
    /// write waited, up to `write_timeout` (30 s), was closed as silent, awake, when that was
    /// two intervals; and one that had no ping to answer, the connection busy writing, too.
    pub fn is_silent(&self, interval: Duration) -> bool {
        self.silent_for() >= interval.saturating_mul(2)
            && self
                .ping_unanswered_for()
                .is_some_and(|unanswered| unanswered >= interval / 2)
    }

    fn fell_behind(&self, conversation_id: &str, seq: u64) {
        let mut behind = self.behind.lock().unwrap_or_else(|e| e.into_inner());
        match behind.iter_mut().find(|(conv, _)| conv == conversation_id) {
            Some((_, upto)) => *upto = (*upto).max(seq),
            None => behind.push((conversation_id.to_owned(), seq)),
        }
        drop(behind);
        self.raise(Signal::Lagged);
    }

    /// Called once `count` offered frames were written (or will never be).
    pub fn wrote_offered(&self, count: usize) {
        self.offered.fetch_sub(count, Ordering::Relaxed);
    }

    /// The conversations whose events were dropped, each with the highest seq dropped.
    pub fn take_behind(&self) -> Vec<(String, u64)> {
        std::mem::take(&mut *self.behind.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A user's open connections: most users have one, kept inline (no allocation of its own).
type UserConnections = SmallVec<[ConnectionHandle; 1]>;

/// Connections by user.
pub struct Routes {
    users: RwLock<HashMap<String, UserConnections>>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Routes {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            users: RwLock::default(),
            next_id: AtomicU64::default(),
            metrics,
        }
    }

    /// Registers a connection of `user`/`device`, opened with a token issued at
    /// `issued_at_ms`, with a queue of `capacity` deliveries. The
    /// queue holds no memory while empty (flume's bounded channel grows a `VecDeque`), where
    /// tokio's allocates its first block of 32 slots and cache-padded state up front, ~1 KB
    /// for every idle connection (`docs/benchmarks.md`, "Idle connection memory").
    pub fn register(
        &self,
        user: &str,
        device: &str,
        issued_at_ms: u64,
        capacity: usize,
    ) -> (ConnectionHandle, flume::Receiver<Delivery>) {
        let (queue, deliveries) = flume::bounded(capacity);
        let handle = ConnectionHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            device: device.to_owned(),
            issued_at_ms,
            queue,
            signals: Arc::default(),
        };
        handle.signals.read_now();
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        let connections = users.entry(user.to_owned()).or_default();
        connections.push(handle.clone());
        // Connections are pushed in order: the device's first are its oldest.
        let open: Vec<&ConnectionHandle> = connections
            .iter()
            .filter(|c| c.device == device && !c.signals.replaced.load(Ordering::Relaxed))
            .collect();
        let excess = open.len().saturating_sub(MAX_CONNECTIONS_PER_DEVICE);
        for oldest in &open[..excess] {
            oldest.signals.replaced.store(true, Ordering::Relaxed);
            oldest.signals.raise(Signal::Replaced);
        }
        (handle, deliveries)
    }

    /// Marks connection `id` of `user` as leaving, and says whether another connection of the
    /// same device, not leaving, stays open here: then the device's route (in a cluster) must
    /// stay too. Under the registry's lock, so that of two connections of a device leaving at
    /// once one at least sees the other leaving.
    pub fn leave(&self, user: &str, id: u64) -> bool {
        let users = self.users.write().unwrap_or_else(|e| e.into_inner());
        let Some(connections) = users.get(user) else {
            return false;
        };
        let Some(leaving) = connections.iter().find(|c| c.id == id) else {
            return false;
        };
        leaving.signals.leaving.store(true, Ordering::Relaxed);
        connections.iter().any(|c| {
            c.id != id && c.device == leaving.device && !c.signals.leaving.load(Ordering::Relaxed)
        })
    }

    /// Whether connection `id` of `user` is open here and not leaving: a route naming it stays.
    pub fn holds(&self, user: &str, id: u64) -> bool {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users.get(user).is_some_and(|connections| {
            connections
                .iter()
                .any(|c| c.id == id && !c.signals.leaving.load(Ordering::Relaxed))
        })
    }

    pub fn unregister(&self, user: &str, id: u64) {
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = users.get_mut(user) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Closes the connections of `user`'s `device` whose token is no longer `honoured` (given
    /// its `iat`): the device was unlinked, and the call that should have told this gateway
    /// was lost. Returns how many it closed.
    pub fn close_refused(&self, user: &str, device: &str, honoured: impl Fn(u64) -> bool) -> usize {
        let mut closed = 0;
        for connection in self.connections(user) {
            if connection.device == device && !honoured(connection.issued_at_ms) {
                connection.close_unlinked();
                closed += 1;
            }
        }
        closed
    }

    /// The open connections of `user`.
    pub fn connections(&self, user: &str) -> Vec<ConnectionHandle> {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users
            .get(user)
            .map(|list| list.to_vec())
            .unwrap_or_default()
    }

    /// Tells every open connection to reconnect at once (each `after_ms` drawn below
    /// `jitter`): this gateway's lease lapsed, and deliveries may have skipped it meanwhile.
    /// Each device reconnects, writes its route again and catches up.
    pub fn rejoin_all(&self, jitter: Duration) {
        for connection in self.all() {
            connection.tell_to_reconnect(crate::drain::reconnect_delay_ms(jitter));
        }
    }

    /// Every open connection.
    pub fn all(&self) -> Vec<ConnectionHandle> {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users.values().flatten().cloned().collect()
    }

    /// Every `(user, device)` with a connection open, each once.
    pub fn devices(&self) -> Vec<(String, String)> {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        let mut devices: Vec<(String, String)> = users
            .iter()
            .flat_map(|(user, connections)| {
                connections.iter().map(|c| (user.clone(), c.device.clone()))
            })
            .collect();
        drop(users);
        devices.sort_unstable();
        devices.dedup();
        devices
    }

    /// The open connections not told to reconnect yet (what a drain still has to tell).
    pub fn untold(&self) -> Vec<ConnectionHandle> {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users
            .values()
            .flatten()
            .filter(|c| c.signals.reconnect_after_ms().is_none())
            .cloned()
            .collect()
    }

    /// The liveness pass, every `interval` ([`crate::Gateway::start_liveness_pass`]): each
    /// open connection that has read nothing from its client for two intervals, among them a
    /// ping it wrote half an interval ago or more ([`Signals::is_silent`]), is told to close
    /// ([`Signal::Silent`]), every other one to send a WebSocket ping ([`Signal::Ping`]),
    /// which its client's library answers by itself. A client that answers is thus read from
    /// at least once an interval, and one that cannot (its app suspended, its TCP connection
    /// kept alive by the kernel) is closed within two to three intervals of its last read. In
    /// place, under the registry's read lock: a few atomic operations per connection, no
    /// allocation.
    pub fn ping_or_close(&self, interval: Duration) -> Liveness {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        let mut liveness = Liveness::default();
        for connection in users.values().flatten() {
            let signals = &connection.signals;
            if signals.is_silent(interval) {
                signals.raise(Signal::Silent);
                liveness.closed += 1;
            } else {
                signals.raise(Signal::Ping);
                liveness.pinged += 1;
            }
        }
        liveness
    }

    /// How many connections are open.
    pub fn count(&self) -> usize {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users.values().map(SmallVec::len).sum()
    }
}

impl Routes {
    /// Queues `event` on every connection of `recipients`, except the sending device's when
    /// that one is answered with `sent` instead. The queues never wait
    /// (`ConnectionHandle::deliver`), so the registry is read once, in place, for all of them.
    fn deliver_event(&self, event: Event, recipients: &Members) {
        let lag = now_ms().saturating_sub(event.ts_ms) as f64 / 1000.0;
        let shared = SharedEvent::new(event);
        let sender = &shared.event.sender;
        let sent_instead = shared.event.payload.answered_with_sent();
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        for member in recipients.iter() {
            for connection in users.get(member).into_iter().flatten() {
                if sent_instead && *member == sender.user && connection.device == sender.device {
                    continue;
                }
                if connection.deliver(&shared) == Handoff::Lagged {
                    self.metrics.lagged_deliveries.inc();
                }
                self.metrics.delivery_lag.observe(lag);
            }
        }
    }
}

#[async_trait::async_trait]
impl Gateways for Routes {
    async fn deliver(&self, batch: Vec<(Event, Members)>) -> Result<(), DeliveryError> {
        for (event, recipients) in batch {
            self.deliver_event(event, &recipients);
        }
        Ok(())
    }

    /// Each connected user's frames go to its connections as one list: shared by every user
    /// when there is one offer (a typing frame to a group), else gathered per user. Users with
    /// no connection here cost nothing.
    fn offer<'a>(&self, offers: &[Offer<'a>]) -> Refused<'a> {
        let connections = self.users.read().unwrap_or_else(|e| e.into_inner());
        let mut refused = Refused::new();
        let mut offer_to = |user: &'a str, frames: &Arc<[Arc<ServerFrame>]>| {
            let missed = connections
                .get(user)
                .into_iter()
                .flatten()
                .filter(|c| !c.deliver_droppable(frames))
                .count();
            if missed > 0 {
                refused.insert(user, missed);
            }
        };
        if let [offer] = offers {
            let frames: Arc<[Arc<ServerFrame>]> = Arc::new([offer.frame.clone()]);
            for user in &offer.users {
                offer_to(user, &frames);
            }
            return refused;
        }
        let mut frames: HashMap<&'a str, Vec<Arc<ServerFrame>>> = HashMap::new();
        for offer in offers {
            for &user in &offer.users {
                if connections.contains_key(user) {
                    frames.entry(user).or_default().push(offer.frame.clone());
                }
            }
        }
        for (user, frames) in frames {
            offer_to(user, &frames.into());
        }
        refused
    }

    /// A known place is filled from the store as a full queue's drop is (`Signal::Lagged`):
    /// after the deliveries queued before it, and before or by a later event of the
    /// conversation, whose gap the connection fills first (the least machinery that keeps
    /// the order: no new path). An unknown one cannot be filled: `reconnect`.
    fn missed(&self, recipients: &[String], at: Option<(&str, u64)>) {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        for member in recipients {
            for connection in users.get(member).into_iter().flatten() {
                match at {
                    Some((conversation_id, seq)) => {
                        connection.signals.fell_behind(conversation_id, seq)
                    }
                    None => {
                        let after_ms = crate::drain::reconnect_delay_ms(MISSED_RECONNECT_JITTER);
                        connection.tell_to_reconnect(after_ms);
                    }
                }
            }
        }
    }

    fn unlinked(&self, user: &str, device: &str) {
        for connection in self.connections(user) {
            if connection.device == device {
                connection.close_unlinked();
            }
        }
    }

    async fn connected_devices(&self, user: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .connections(user)
            .into_iter()
            .map(|connection| connection.device)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::Receipt;
    use futures::FutureExt;

    fn receipt(user: &str, seq: u64) -> Arc<ServerFrame> {
        Arc::new(ServerFrame::Receipt(Receipt {
            conversation_id: "g".into(),
            user: user.into(),
            delivered_seq: seq,
            read_seq: 0,
        }))
    }

    fn offers<'a>(to: &'a str, count: u64) -> Vec<Offer<'a>> {
        (1..=count)
            .map(|seq| Offer {
                users: vec![to],
                frame: receipt(&format!("member{seq}"), seq),
            })
            .collect()
    }

    fn frames(delivery: Delivery) -> Vec<u64> {
        match delivery {
            Delivery::Frames(frames) => frames
                .iter()
                .map(|frame| match frame.as_ref() {
                    ServerFrame::Receipt(r) => r.delivered_seq,
                    other => panic!("expected a receipt, got {other:?}"),
                })
                .collect(),
            Delivery::Event(_) => panic!("expected frames, got an event"),
        }
    }

    /// A device past its connections has its oldest told to close; the others, and the
    /// other devices', are left alone.
    #[test]
    fn a_device_past_its_connections_has_its_oldest_closed() {
        let routes = Routes::new(Arc::new(Metrics::new()));
        let (laptop, _) = routes.register("alice", "laptop", 0, 1);
        let phones: Vec<_> = (0..MAX_CONNECTIONS_PER_DEVICE)
            .map(|_| routes.register("alice", "phone", 0, 1))
            .collect();
        let replaced = |handle: &ConnectionHandle| handle.signals.take(Signal::Replaced);
        assert!(
            phones.iter().all(|(phone, _)| !replaced(phone)),
            "at the limit"
        );
        let (newest, _) = routes.register("alice", "phone", 0, 1);
        assert!(replaced(&phones[0].0), "the oldest");
        assert!(phones[1..].iter().all(|(phone, _)| !replaced(phone)));
        assert!(!replaced(&newest) && !replaced(&laptop));
        // A burst while the oldest still closes: each new one closes the next oldest.
        let burst: Vec<_> = (0..3)
            .map(|_| routes.register("alice", "phone", 0, 1))
            .collect();
        let told: Vec<bool> = phones.iter().map(|(phone, _)| replaced(phone)).collect();
        assert_eq!(told[..4], [false, true, true, true], "{told:?}");
        assert!(!told[4..].iter().any(|&t| t));
        assert!(burst.iter().all(|(phone, _)| !replaced(phone)) && !replaced(&newest));
    }

    /// The device's route stays while one of its connections stays, whichever leaves first;
    /// of two leaving at once, the second sees none left (the route is cleared, not kept for
    /// good).
    #[test]
    fn a_devices_route_stays_until_its_last_connection_here_leaves() {
        let routes = Routes::new(Arc::new(Metrics::new()));
        let (older, _) = routes.register("alice", "phone", 0, 1);
        let (newer, _) = routes.register("alice", "phone", 0, 1);
        let (_laptop, _) = routes.register("alice", "laptop", 0, 1);
        assert!(routes.holds("alice", newer.id));
        assert!(routes.leave("alice", newer.id), "the older one stays");
        assert!(
            !routes.holds("alice", newer.id),
            "leaving, a route naming it goes"
        );
        assert!(routes.holds("alice", older.id));
        assert!(
            !routes.leave("alice", older.id),
            "no phone left: the route goes"
        );
        assert!(!routes.holds("alice", older.id));
    }

    #[test]
    fn a_flush_of_many_frames_for_one_device_is_one_delivery_in_order_whatever_its_queue() {
        let routes = Routes::new(Arc::new(Metrics::new()));
        let (_phone, phone) = routes.register("alice", "phone", 0, 16);
        let (_laptop, laptop) = routes.register("alice", "laptop", 0, 16);
        let refused = routes.offer(&offers("alice", 1000));
        assert!(refused.is_empty(), "{refused:?}");
        for queue in [phone, laptop] {
            assert_eq!(queue.len(), 1, "one slot of the queue");
            let delivery = queue.try_recv().unwrap();
            assert_eq!(frames(delivery), (1..=1000).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_device_holds_one_large_batch_of_offered_frames_at_most_until_it_wrote_it() {
        let routes = Routes::new(Arc::new(Metrics::new()));
        let (handle, queue) = routes.register("alice", "phone", 0, 16);
        let (_bob, bob_queue) = routes.register("bob", "phone", 0, 16);
        assert!(routes.offer(&offers("alice", 100)).is_empty());
        // Unwritten: a second batch is refused, and says for whom; small ones too, since the
        // first is above three quarters of the queue. Another user's device is not affected.
        let mut second = offers("alice", 100);
        second.extend(offers("bob", 1));
        let refused = routes.offer(&second);
        assert_eq!(refused, Refused::from([("alice", 1)]));
        assert_eq!(routes.offer(&offers("alice", 1)).get("alice"), Some(&1));
        assert_eq!((queue.len(), bob_queue.len()), (1, 1));
        // Written: the next batch is taken.
        assert_eq!(frames(queue.try_recv().unwrap()).len(), 100);
        handle.signals.wrote_offered(100);
        assert!(routes.offer(&offers("alice", 100)).is_empty());
    }

    #[test]
    fn one_frame_offered_to_a_group_reaches_each_connected_members_devices() {
        let routes = Routes::new(Arc::new(Metrics::new()));
        let (_phone, phone) = routes.register("alice", "phone", 0, 16);
        let (_laptop, laptop) = routes.register("alice", "laptop", 0, 16);
        let (_bob, bob) = routes.register("bob", "phone", 0, 16);
        let offer = Offer {
            users: vec!["alice", "bob", "carol", "dave"],
            frame: receipt("erin", 7),
        };
        assert!(routes.offer(&[offer]).is_empty(), "nobody refused");
        for queue in [phone, laptop, bob] {
            assert_eq!(frames(queue.try_recv().unwrap()), [7]);
            assert!(queue.try_recv().is_err(), "once");
        }
    }

    #[test]
    fn offered_frames_leave_a_quarter_of_the_queue_to_events() {
        let routes = Routes::new(Arc::new(Metrics::new()));
        let (_handle, queue) = routes.register("alice", "phone", 0, 16);
        // Twelve small offers fill three quarters of the 16 slots; the thirteenth is refused.
        for seq in 1..=12 {
            assert!(routes.offer(&offers("alice", 1)).is_empty(), "offer {seq}");
        }
        assert_eq!(routes.offer(&offers("alice", 1)).get("alice"), Some(&1));
        assert_eq!(queue.len(), 12);
    }

    #[test]
    fn a_signal_raised_before_the_connection_looks_is_taken_once_and_alone() {
        let signals = Signals::default();
        signals.fell_behind("c", 7);
        signals.fell_behind("c", 9);
        assert!(signals.taken(Signal::Unlinked).now_or_never().is_none());
        assert!(signals.taken(Signal::Lagged).now_or_never().is_some());
        // Two drops, one signal; what they dropped is kept apart from it.
        assert!(signals.taken(Signal::Lagged).now_or_never().is_none());
        assert_eq!(signals.take_behind(), vec![("c".to_owned(), 9)]);

        assert!(signals.tell_to_reconnect(250));
        assert!(!signals.tell_to_reconnect(0), "the first telling holds");
        signals.raise(Signal::Unlinked);
        assert!(signals.taken(Signal::Unlinked).now_or_never().is_some());
        assert!(signals.taken(Signal::Reconnect).now_or_never().is_some());
        assert_eq!(signals.reconnect_after_ms(), Some(250));
        assert!(signals.taken(Signal::Reconnect).now_or_never().is_none());
    }

    /// A client is silent for the liveness pass only once it has had a ping to answer, and
    /// the time its connection waited on writes to it (when it could neither write a ping
    /// nor read an answer) is not counted: neither as silence nor as time to answer.
    #[test]
    fn a_client_is_silent_only_with_a_ping_unanswered_not_for_a_wait_on_a_write() {
        let interval = Duration::from_millis(50);
        let signals = Signals::default();
        signals.read_now();
        std::thread::sleep(interval * 3);
        assert!(signals.silent_for() >= interval * 2);
        assert!(!signals.is_silent(interval), "no ping to answer");
        signals.wrote_ping();
        signals.wrote_ping();
        std::thread::sleep(interval);
        assert!(signals.is_silent(interval), "a ping unanswered");
        let before = (signals.silent_for(), signals.ping_unanswered_for().unwrap());
        // The connection waited on a write all that time (and more than the clock allows).
        signals.waited_on_write(Duration::from_secs(3600));
        assert!(!signals.is_silent(interval));
        assert!(signals.silent_for() < before.0);
        assert!(signals.ping_unanswered_for().unwrap() < before.1);
        signals.read_now();
        assert_eq!(signals.ping_unanswered_for(), None, "answered");
    }

    #[tokio::test]
    async fn a_connection_waiting_on_its_signals_is_woken_by_the_one_raised() {
        let signals = Arc::new(Signals::default());
        let waiting = Arc::clone(&signals);
        let connection = tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = waiting.taken(Signal::Unlinked) => Signal::Unlinked,
                _ = waiting.taken(Signal::Lagged) => Signal::Lagged,
            }
        });
        tokio::task::yield_now().await;
        signals.fell_behind("c", 1);
        let woken = tokio::time::timeout(Duration::from_secs(10), connection).await;
        assert_eq!(woken.unwrap().unwrap(), Signal::Lagged);
    }
}
