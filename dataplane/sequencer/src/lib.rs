//! The sequencer role: orders appends per conversation and makes them durable.
//!
//! [`Sequencer`] is the interface the chat role calls; [`LocalSequencer`] is the in-process
//! binding. It holds the shards this node owns (see "Ownership" below): one actor per shard,
//! started on first use, group-commits what is queued (bounded by count, estimated bytes and
//! time, and never above the engine's batch limit) in one store commit fenced by the shard's
//! epoch, answers each waiter after the commit, then tells fanout that the shard's outbox has
//! grown. Each actor caches the heads of the conversations it appends to, a bounded number
//! ([`CACHED_HEADS`] across all actors).
//!
//! **Ownership.** Each shard has an ownership record in the store (owner node, epoch, lease;
//! `courier_store::ownership`). At start the sequencer takes every shard no live lease of
//! another node holds, in one commit; [`LocalSequencer::keep_shards`] then renews its leases
//! every third of a lease, drops a shard it finds taken over, and takes the free or lapsed ones
//! (after another node died). A shard this node does not own answers `ShardMoved`. A hand-off
//! ([`LocalSequencer::hand_off`]) freezes the shard (new appends answer `ShardMoved`, queued
//! ones are committed), flips owner and epoch in one commit, and the new owner takes it at its
//! next round or when told. A drain ([`LocalSequencer::drain`]) freezes and releases every
//! shard and takes none any more: a shard handed to it later is released at its next round.
//! Safety rests on the epoch fence of every batch, not on clocks: a
//! deposed owner's batches are refused whatever it believes about its lease.
//!
//! **Backpressure.** The owner of a shard refuses new messages to it while the oldest entry of
//! its outbox waited longer than [`SequencerLimits::outbox_lag_limit`] (fanout is behind on
//! it), as read from the store by [`LocalSequencer::watch_outboxes`]; see [`outbox_lag`].
//!
//! Failure policy: a batch the engine refuses as too large is split in halves, down to the one
//! append that is too large alone; any other store error reaches every waiter of the batch as
//! it is (typed), and `error.rs` maps it to the client's code; a fence that moved means the
//! shard moved: the actor refuses what is queued and stops. After a commit of unknown outcome,
//! and after a fence that moved (which may follow one), the listener is told of the shard
//! without a list: entries may have landed that no commit lists.

pub mod outbox_lag;
pub mod retention;
pub mod routing;

use courier_core::clock::now_ms;
use courier_core::leases::Ownership;
use courier_core::limits::{KeyedLimit, Rate};
use courier_core::loops::BackgroundLoops;
use courier_core::metrics::{Metrics, ScopeLabel, ShardLabel};
use courier_core::sequencing::{
    CommitListener, PendingAppend, PendingTrim, Sequencer, SequencerError,
};
use courier_proto::{EventPayload, ids};
use courier_store::ownership::Duty;
use courier_store::{
    Append, AppendOutcome, Appended, HeadCache, MediaReference, MessageStore, ShardLease,
    StoreError,
};
use futures::future::BoxFuture;
use outbox_lag::{DEFAULT_OUTBOX_LAG_LIMIT, OUTBOX_LAG_ROUND, OutboxWatch};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Conversation heads the shard actors of one sequencer cache together (each an equal part):
/// about 100 MB at most. A head not cached is read from the store on the next append.
const CACHED_HEADS: usize = 1 << 20;

/// Bounds of one group commit, of a shard's queue, and of the sends to one group.
#[derive(Debug, Clone, Copy)]
pub struct SequencerLimits {
    /// Most appends in one commit.
    pub max_appends: usize,
    /// Most bytes in one commit, as estimated by [`Append::approximate_size`]; the engine's
    /// own batch limit lowers it.
    pub max_bytes: usize,
    /// How long the first append of a batch may wait for more (0: take what is queued).
    pub linger: Duration,
    /// Appends queued per shard before new ones are refused as overloaded.
    pub queue_capacity: usize,
    /// Messages per second (and burst) to one group conversation. Enforced here, by the
    /// owner of the conversation's shard, so that the limit holds whichever gateways its
    /// senders use; past it a send is refused `rate_limited` with the wait.
    pub group_sends: Rate,
    /// Messages to a shard are refused (`DeliveryBehind`: the client retries) while the
    /// oldest entry of its outbox was committed longer ago than this ([`outbox_lag`]).
    pub outbox_lag_limit: Duration,
}

impl Default for SequencerLimits {
    fn default() -> Self {
        Self {
            max_appends: 512,
            max_bytes: 4 << 20,
            linger: Duration::ZERO,
            queue_capacity: 4096,
            group_sends: Rate {
                per_second: 200,
                burst: 400,
            },
            outbox_lag_limit: DEFAULT_OUTBOX_LAG_LIMIT,
        }
    }
}

type AppendReply = oneshot::Sender<Result<AppendOutcome, SequencerError>>;

struct AppendRequest {
    append: Append,
    reply: AppendReply,
}

/// Appends to commit together, and their waiters in the same order: kept apart so that the
/// store reads the appends where they are, with no copy of each.
#[derive(Default)]
struct AppendBatch {
    appends: Vec<Append>,
    replies: Vec<AppendReply>,
}

impl AppendBatch {
    fn push(&mut self, request: AppendRequest) {
        self.appends.push(request.append);
        self.replies.push(request.reply);
    }

    fn len(&self) -> usize {
        self.appends.len()
    }

    /// The appends from `at` on, taken from this batch.
    fn split_off(&mut self, at: usize) -> Self {
        Self {
            appends: self.appends.split_off(at),
            replies: self.replies.split_off(at),
        }
    }

    /// Answers every waiter with `error`.
    fn refuse(self, error: impl Fn() -> SequencerError) {
        for reply in self.replies {
            let _ = reply.send(Err(error()));
        }
    }
}

// Appends are the common case: boxing them would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
enum Request {
    Append(AppendRequest),
    Trim {
        conversation_id: String,
        new_floor: u64,
        media: Vec<MediaReference>,
        reply: oneshot::Sender<Result<u64, SequencerError>>,
    },
    /// Answered once every request queued before it is done; the actor then stops.
    Freeze(oneshot::Sender<()>),
}

fn queued<T: Send + 'static>(
    queued: Result<(), SequencerError>,
    outcome: oneshot::Receiver<Result<T, SequencerError>>,
) -> BoxFuture<'static, Result<T, SequencerError>> {
    Box::pin(async move {
        queued?;
        outcome.await.unwrap_or(Err(SequencerError::ShardMoved))
    })
}

/// A shard as this node sees it.
#[derive(Default)]
enum Slot {
    #[default]
    NotOwned,
    Owned {
        lease: ShardLease,
        /// The shard's actor, started on first use.
        queue: Option<mpsc::Sender<Request>>,
    },
}

/// How long the load average of a shard takes to weigh a change by half.
pub const LOAD_HALF_LIFE: Duration = Duration::from_secs(15);

/// Appends per shard, counted by the actors and averaged every lease round.
struct ShardLoad {
    appended: Vec<AtomicU64>,
    ewma: Mutex<Vec<f64>>,
    last: Mutex<std::time::Instant>,
}

/// The in-process sequencer over one message store.
pub struct LocalSequencer {
    store: MessageStore,
    /// The runtime its shard actors run on: the one it was started on.
    actors: tokio::runtime::Handle,
    ownership: Ownership,
    shards: Vec<Mutex<Slot>>,
    load: Arc<ShardLoad>,
    /// The outbox lag of the shards this node owns, as last read.
    outbox: Arc<OutboxWatch>,
    /// Set by [`LocalSequencer::drain`]: no shard is taken any more.
    draining: AtomicBool,
    /// Held by the lease round running.
    keeping: tokio::sync::Mutex<()>,
    limits: SequencerLimits,
    /// Messages to each group conversation of the shards this node owns.
    group_sends: KeyedLimit,
    listener: Arc<dyn CommitListener>,
    metrics: Arc<Metrics>,
}

impl LocalSequencer {
    /// Takes every shard of `store` that no live lease of another node holds (bumping their
    /// epochs) and returns the sequencer, whose shard actors run on the runtime this is called
    /// on. Run [`LocalSequencer::keep_shards`] next to it.
    pub async fn start(
        store: MessageStore,
        ownership: Ownership,
        limits: SequencerLimits,
        listener: Arc<dyn CommitListener>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let count = store.shard_count() as usize;
        let shards = (0..count).map(|_| Mutex::new(Slot::NotOwned)).collect();
        let load = Arc::new(ShardLoad {
            appended: (0..count).map(|_| AtomicU64::new(0)).collect(),
            ewma: Mutex::new(vec![0.0; count]),
            last: Mutex::new(std::time::Instant::now()),
        });
        let sequencer = Arc::new(Self {
            outbox: Arc::new(OutboxWatch::new(count, limits.outbox_lag_limit)),
            store,
            actors: tokio::runtime::Handle::current(),
            ownership,
            shards,
            load,
            draining: AtomicBool::new(false),
            keeping: tokio::sync::Mutex::new(()),
            group_sends: KeyedLimit::new(limits.group_sends, "sends to this group"),
            limits,
            listener,
            metrics,
        });
        sequencer.take_free_shards().await?;
        Ok(sequencer)
    }

    /// Spawns this node's loops into `loops`: [`LocalSequencer::keep_shards`] and
    /// [`LocalSequencer::watch_outboxes`]. Both stop at once when cancelled, and are restarted
    /// if they fail: the leases are in the store, and the outbox lag is read again.
    pub fn spawn_loops(self: &Arc<Self>, loops: &BackgroundLoops) {
        let keeper = self.clone();
        loops.spawn("keep shard leases", move |cancel| {
            let keeper = keeper.clone();
            async move {
                cancel.run_until_cancelled(keeper.keep_shards()).await;
            }
        });
        let watcher = self.clone();
        loops.spawn("watch outbox lag", move |cancel| {
            let watcher = watcher.clone();
            async move {
                cancel.run_until_cancelled(watcher.watch_outboxes()).await;
            }
        });
    }

    /// Reads the outbox lag of the shards this node owns every [`OUTBOX_LAG_ROUND`], until
    /// the process ends ([`outbox_lag`]). A failed round is logged; the next one reads again.
    pub async fn watch_outboxes(self: Arc<Self>) {
        let mut rounds = tokio::time::interval(OUTBOX_LAG_ROUND);
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            rounds.tick().await;
            let owned: Vec<u32> = self.owned().iter().map(|lease| lease.shard).collect();
            if let Err(e) = self
                .outbox
                .round_now(&self.store, &owned, &self.metrics)
                .await
            {
                tracing::warn!(error = %e, "reading the outbox lag failed; retrying");
            }
        }
    }

    /// One round of [`LocalSequencer::watch_outboxes`] as if the time were `now_ms`: reads the
    /// outbox lag of the owned shards that may hold entries and decides which are behind.
    /// Returns the shards read.
    pub async fn watch_outboxes_at(&self, now_ms: u64) -> Result<usize, StoreError> {
        let owned: Vec<u32> = self.owned().iter().map(|lease| lease.shard).collect();
        self.outbox
            .round(&self.store, &owned, now_ms, &self.metrics)
            .await
    }

    /// Renews this node's leases every third of a lease, drops the shards another node took,
    /// and takes the free or lapsed ones, until the process ends. A failed round is logged and
    /// tried again at the next one (a lease outlives two failed renewals).
    pub async fn keep_shards(self: Arc<Self>) {
        let mut rounds = tokio::time::interval(self.ownership.round());
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rounds.tick().await;
        loop {
            rounds.tick().await;
            self.keep_round().await;
        }
    }

    /// One round of [`LocalSequencer::keep_shards`]: renew, drop what was taken over, take
    /// what is free or lapsed. Errors are logged; the next round tries again.
    pub async fn keep_round(&self) {
        // One round at a time (the loop's and an admin call's): two would race for the same
        // free shards, and one of them would fail.
        let _round = self.keeping.lock().await;
        self.update_load();
        self.group_sends.forget_idle();
        if let Err(e) = self.renew().await {
            tracing::warn!(error = %e, "renewing shard leases failed; retrying");
        }
        if self.is_draining() {
            if let Err(e) = self.give_back_handed().await {
                tracing::warn!(error = %e, "giving back shards handed to a drained node failed; retrying");
            }
            return;
        }
        if let Err(e) = self.take_free_shards().await {
            tracing::warn!(error = %e, "taking free shards failed; retrying");
        }
    }

    /// The shards this node owns, with their leases.
    pub fn owned(&self) -> Vec<ShardLease> {
        self.shards
            .iter()
            .filter_map(|slot| match &*lock(slot) {
                Slot::Owned { lease, .. } => Some(*lease),
                Slot::NotOwned => None,
            })
            .collect()
    }

    /// Hands `shard` to node `to`: freezes it here (new appends answer `ShardMoved`, those
    /// queued are committed first), then flips owner and epoch in one commit. Returns `to`'s
    /// lease. If the flip fails, the shard stays this node's in the store and
    /// [`LocalSequencer::keep_shards`] takes it back at its next round.
    #[tracing::instrument(skip(self), fields(node = %self.ownership.node))]
    pub async fn hand_off(&self, shard: u32, to: &str) -> Result<ShardLease, SequencerError> {
        // No lease round between the freeze and the flip: it would find the shard free here
        // and take it back with a new epoch.
        let _round = self.keeping.lock().await;
        let lease = self.freeze(shard).await.ok_or(SequencerError::ShardMoved)?;
        let flipped = self
            .store
            .hand_off_shard(
                lease,
                &self.ownership.node,
                to,
                now_ms(),
                self.ownership.lease_ms(),
            )
            .await?;
        tracing::info!(shard, to, epoch = flipped.epoch, "shard handed off");
        Ok(flipped)
    }

    /// Freezes `shard` if this node owns it: new appends answer `ShardMoved`, those queued
    /// are committed, and the shard is this node's no more (in memory; the store still says
    /// so). Returns its lease.
    async fn freeze(&self, shard: u32) -> Option<ShardLease> {
        let taken = self
            .shards
            .get(shard as usize)
            .map(|slot| std::mem::take(&mut *lock(slot)));
        let Some(Slot::Owned { lease, queue }) = taken else {
            return None;
        };
        self.outbox.dropped(shard);
        if let Some(queue) = queue {
            let (frozen, done) = oneshot::channel();
            if queue.send(Request::Freeze(frozen)).await.is_ok() {
                // The actor stopped (fenced out) if the answer never comes: nothing is in flight.
                let _ = done.await;
            }
        }
        self.metrics.owned_shards.dec();
        Some(lease)
    }

    /// Gives every shard up: stops taking shards, freezes each (what is queued is committed)
    /// and releases them in one commit, so the other sequencer nodes take them at their next
    /// round instead of waiting for the leases to lapse. Returns the shards released.
    #[tracing::instrument(skip(self), fields(node = %self.ownership.node))]
    pub async fn drain(&self) -> Result<Vec<u32>, StoreError> {
        // No lease round runs meanwhile: it could take back a shard just frozen.
        let _round = self.keeping.lock().await;
        self.draining.store(true, AtomicOrdering::Relaxed);
        let mut frozen = Vec::new();
        for shard in 0..self.shards.len() as u32 {
            frozen.extend(self.freeze(shard).await);
        }
        self.store
            .release_shards(Duty::Sequencing, &self.ownership.node, &frozen)
            .await?;
        let released = frozen.iter().map(|lease| lease.shard).collect();
        tracing::info!(shards = frozen.len(), "drained: shards released");
        Ok(released)
    }

    /// Whether [`LocalSequencer::drain`] was called: the node takes no shard any more.
    pub fn is_draining(&self) -> bool {
        self.draining.load(AtomicOrdering::Relaxed)
    }

    /// Events appended per second to each shard this node owns, an exponentially weighted
    /// moving average over about [`LOAD_HALF_LIFE`] (updated every lease round).
    pub fn load(&self) -> Vec<(ShardLease, f64)> {
        let ewma = lock(&self.load.ewma);
        self.owned()
            .into_iter()
            .map(|lease| (lease, ewma[lease.shard as usize]))
            .collect()
    }

    /// Folds the appends counted since the last round into each shard's average.
    fn update_load(&self) {
        let mut last = lock(&self.load.last);
        let elapsed = last.elapsed().as_secs_f64();
        if elapsed <= 0.0 {
            return;
        }
        *last = std::time::Instant::now();
        let weight = 1.0 - (-elapsed / LOAD_HALF_LIFE.as_secs_f64() * std::f64::consts::LN_2).exp();
        let mut ewma = lock(&self.load.ewma);
        for (shard, average) in ewma.iter_mut().enumerate() {
            let appended = self.load.appended[shard].swap(0, AtomicOrdering::Relaxed);
            *average += weight * (appended as f64 / elapsed - *average);
        }
    }

    async fn renew(&self) -> Result<(), StoreError> {
        let owned = self.owned();
        let lost = self
            .store
            .renew_shards(
                Duty::Sequencing,
                &self.ownership.node,
                &owned,
                now_ms(),
                self.ownership.lease_ms(),
            )
            .await?;
        for shard in lost {
            tracing::warn!(shard, "shard taken over by another node");
            self.drop_shard(shard);
        }
        Ok(())
    }

    async fn take_free_shards(&self) -> Result<(), StoreError> {
        let free: Vec<u32> = (0..self.shards.len() as u32)
            .filter(|&shard| matches!(&*lock(&self.shards[shard as usize]), Slot::NotOwned))
            .collect();
        if free.is_empty() {
            return Ok(());
        }
        let taken = self
            .store
            .acquire_shards(
                Duty::Sequencing,
                &self.ownership.node,
                &free,
                usize::MAX,
                now_ms(),
                self.ownership.lease_ms(),
            )
            .await?;
        if !taken.is_empty() {
            tracing::info!(shards = taken.len(), "took shards");
        }
        for lease in taken {
            self.outbox.taken(lease.shard);
            *lock(&self.shards[lease.shard as usize]) = Slot::Owned { lease, queue: None };
            self.metrics.owned_shards.inc();
        }
        Ok(())
    }

    /// On a drained node, which serves no shard: releases, in one commit, the shards the store
    /// says are this node's, as a move after the drain hands them (a drained node stays up, a
    /// live sequencer in the registry, until it is stopped). Held, they would go unserved
    /// until their leases lapsed; released, another node takes them at its next round.
    async fn give_back_handed(&self) -> Result<(), StoreError> {
        let now = now_ms();
        let handed: Vec<ShardLease> = self
            .store
            .shard_owners(Duty::Sequencing)
            .await?
            .into_iter()
            .filter(|owner| owner.node == self.ownership.node && owner.is_live(now))
            .map(|owner| ShardLease {
                shard: owner.shard,
                epoch: owner.epoch,
            })
            .collect();
        if handed.is_empty() {
            return Ok(());
        }
        self.store
            .release_shards(Duty::Sequencing, &self.ownership.node, &handed)
            .await?;
        let shards: Vec<u32> = handed.iter().map(|lease| lease.shard).collect();
        tracing::info!(?shards, "drained: gave back shards handed to this node");
        Ok(())
    }

    /// Forgets `shard` (its actor ends once its queue is empty; what it commits is refused).
    fn drop_shard(&self, shard: u32) {
        if let Slot::Owned { .. } = std::mem::take(&mut *lock(&self.shards[shard as usize])) {
            self.outbox.dropped(shard);
            self.metrics.owned_shards.dec();
        }
    }

    /// Takes a token of the group's send rate for a client's message or delete to a group: each
    /// is an event every member's devices receive. A retry of one already sequenced takes one
    /// too: a client that retries past the rate is the one to slow down.
    fn check_group_rate(&self, append: &Append) -> Result<(), SequencerError> {
        let conv = &append.conversation_id;
        let sent = matches!(
            append.payload,
            EventPayload::Message { .. } | EventPayload::Delete { .. }
        );
        if !(sent && ids::is_group(conv)) {
            return Ok(());
        }
        self.group_sends.wait(conv).map_err(|wait| {
            self.metrics
                .rate_limited
                .get_or_create(&ScopeLabel { scope: "group" })
                .inc();
            SequencerError::RateLimited {
                retry_after_ms: wait.as_millis().max(1) as u64,
            }
        })
    }

    /// Refuses a message to `shard` while its outbox is behind (the last round's verdict).
    fn check_outbox_lag(&self, shard: u32, append: &Append) -> Result<(), SequencerError> {
        if !(matches!(append.payload, EventPayload::Message { .. }) && self.outbox.is_behind(shard))
        {
            return Ok(());
        }
        // A verdict can outlive the shard's ownership (a round that read the shard as it
        // moved): a shard this node does not own answers `ShardMoved`, so that its callers
        // look for the new owner instead of retrying here.
        if !matches!(&*lock(&self.shards[shard as usize]), Slot::Owned { .. }) {
            return Err(SequencerError::ShardMoved);
        }
        self.metrics.delivery_behind_refusals.inc();
        Err(SequencerError::DeliveryBehind)
    }

    /// Queues `request` on `shard`'s actor, started on first use: `ShardMoved` when this node
    /// does not own the shard, `Overloaded` when its queue is full.
    fn queue(&self, shard: u32, request: Request) -> Result<(), SequencerError> {
        let mut slot = lock(&self.shards[shard as usize]);
        let Slot::Owned { lease, queue } = &mut *slot else {
            return Err(SequencerError::ShardMoved);
        };
        let queue = queue.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(self.limits.queue_capacity);
            let actor = ShardActor {
                store: self.store.clone(),
                load: self.load.clone(),
                outbox: self.outbox.clone(),
                lease: *lease,
                heads: HeadCache::with_capacity(CACHED_HEADS / self.shards.len()),
                limits: self.limits,
                listener: self.listener.clone(),
                metrics: self.metrics.clone(),
            };
            self.actors.spawn(actor.run(rx));
            tx
        });
        match queue.try_send(request) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(SequencerError::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The actor found the shard taken over and stopped.
                *slot = Slot::NotOwned;
                self.outbox.dropped(shard);
                self.metrics.owned_shards.dec();
                Err(SequencerError::ShardMoved)
            }
        }
    }
}

/// Locks `mutex`, whose data stays usable after a panic elsewhere (nothing it guards is left
/// half-written).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sequencer for LocalSequencer {
    fn submit(&self, append: Append) -> PendingAppend {
        let shard = self.store.shard_of(&append.conversation_id);
        // Behind first: a message refused for the lag takes no token of the group's rate.
        let checked = self
            .check_outbox_lag(shard, &append)
            .and_then(|()| self.check_group_rate(&append));
        if let Err(refused) = checked {
            return Box::pin(std::future::ready(Err(refused)));
        }
        let (reply, outcome) = oneshot::channel();
        let request = Request::Append(AppendRequest { append, reply });
        queued(self.queue(shard, request), outcome)
    }

    fn trim(
        &self,
        conversation_id: &str,
        new_floor: u64,
        media: Vec<MediaReference>,
    ) -> PendingTrim {
        let shard = self.store.shard_of(conversation_id);
        let (reply, outcome) = oneshot::channel();
        let request = Request::Trim {
            conversation_id: conversation_id.to_owned(),
            new_floor,
            media,
            reply,
        };
        queued(self.queue(shard, request), outcome)
    }
}

struct ShardActor {
    store: MessageStore,
    load: Arc<ShardLoad>,
    outbox: Arc<OutboxWatch>,
    lease: ShardLease,
    heads: HeadCache,
    limits: SequencerLimits,
    listener: Arc<dyn CommitListener>,
    metrics: Arc<Metrics>,
}

impl ShardActor {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        // Batches stay under the engine's limit by their estimated size.
        let max_bytes = self
            .limits
            .max_bytes
            .min(self.store.batch_limits().max_batch_bytes);
        let mut next = None;
        loop {
            let first = match next.take() {
                Some(request) => request,
                None => match requests.recv().await {
                    Some(request) => request,
                    None => return,
                },
            };
            let kept = match first {
                Request::Freeze(frozen) => {
                    let _ = frozen.send(());
                    false
                }
                Request::Trim {
                    conversation_id,
                    new_floor,
                    media,
                    reply,
                } => {
                    let result = self
                        .store
                        .trim(self.lease, &conversation_id, new_floor, &media)
                        .await;
                    let lost = matches!(result, Err(StoreError::FenceChanged { .. }));
                    let _ = reply.send(result.map_err(|e| {
                        if lost {
                            SequencerError::ShardMoved
                        } else {
                            e.into()
                        }
                    }));
                    !lost
                }
                Request::Append(first) => {
                    let mut bytes = first.append.approximate_size();
                    let mut batch = AppendBatch::default();
                    batch.push(first);
                    let deadline = tokio::time::Instant::now() + self.limits.linger;
                    while batch.len() < self.limits.max_appends && bytes < max_bytes {
                        let request = match requests.try_recv() {
                            Ok(request) => request,
                            Err(_) if self.limits.linger.is_zero() => break,
                            Err(_) => {
                                match tokio::time::timeout_at(deadline, requests.recv()).await {
                                    Ok(Some(request)) => request,
                                    _ => break,
                                }
                            }
                        };
                        match request {
                            Request::Append(append)
                                if bytes + append.append.approximate_size() <= max_bytes =>
                            {
                                bytes += append.append.approximate_size();
                                batch.push(append);
                            }
                            // A trim, or an append for the next batch.
                            other => {
                                next = Some(other);
                                break;
                            }
                        }
                    }
                    self.commit(batch).await
                }
            };
            if !kept {
                // The shard moved: refuse what is queued and stop.
                requests.close();
                let queued = next.take().into_iter();
                for request in queued.chain(std::iter::from_fn(|| requests.try_recv().ok())) {
                    match request {
                        Request::Append(r) => drop(r.reply.send(Err(SequencerError::ShardMoved))),
                        Request::Trim { reply, .. } => {
                            drop(reply.send(Err(SequencerError::ShardMoved)))
                        }
                        Request::Freeze(frozen) => drop(frozen.send(())),
                    }
                }
                return;
            }
        }
    }

    /// Commits `batch` and answers its waiters; `false` when the shard was lost. A batch the
    /// engine refuses as too large (its size was underestimated) is split in halves, committed
    /// in order, so that only an append too large on its own fails (`too_large`).
    async fn commit(&mut self, batch: AppendBatch) -> bool {
        // Parts still to commit, the next one last.
        let mut parts = vec![batch];
        while let Some(mut part) = parts.pop() {
            let started = std::time::Instant::now();
            let result = self
                .store
                .append_listed(self.lease, &mut self.heads, &part.appends)
                .await;
            self.metrics
                .stages
                .commit
                .observe(started.elapsed().as_secs_f64());
            let (shard, count) = (self.lease.shard, part.len());
            match result {
                Err(StoreError::TooLarge(_)) if count > 1 => {
                    let second = part.split_off(count / 2);
                    parts.push(second);
                    parts.push(part);
                }
                Ok(Appended { results, outbox }) => {
                    let new = results
                        .iter()
                        .filter(|r| r.as_ref().is_ok_and(|o| !o.duplicate))
                        .count();
                    for (reply, result) in part.replies.into_iter().zip(results) {
                        let _ = reply.send(result.map_err(SequencerError::from));
                    }
                    self.metrics.commit_batch_size.observe(count as f64);
                    self.load.appended[shard as usize]
                        .fetch_add(new as u64, AtomicOrdering::Relaxed);
                    self.metrics
                        .shard_appends
                        .get_or_create(&ShardLabel { shard })
                        .inc_by(new as u64);
                    if new > 0 {
                        self.outbox.committed(shard);
                        match outbox {
                            Some(entries) => self.listener.committed_entries(shard, entries),
                            None => self.listener.committed(shard, new),
                        }
                    }
                }
                Err(StoreError::FenceChanged { .. }) => {
                    tracing::warn!(
                        shard,
                        epoch = self.lease.epoch,
                        "shard taken over by another owner"
                    );
                    // The store does not say whether an attempt before the refused one was
                    // of unknown outcome: one whose answer a store node lost may be applied
                    // after the retry read, before the new owner's bump, its entries in the
                    // outbox, listed nowhere. Told as after any unknown outcome (a drain from
                    // the outbox, a read when nothing landed: the shard moves rarely).
                    self.listener.committed(shard, 0);
                    for part in parts.into_iter().chain([part]) {
                        part.refuse(|| SequencerError::ShardMoved);
                    }
                    return false;
                }
                Err(e) => {
                    tracing::error!(shard, error = %e, "append batch failed");
                    if matches!(e, StoreError::MaybeCommitted) {
                        // Its entries may be in the outbox all the same, listed nowhere.
                        self.outbox.committed(shard);
                        self.listener.committed(shard, 0);
                    }
                    part.refuse(|| SequencerError::Store(e.clone()));
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_core::error::ApiError;
    use courier_core::sequencing::Listeners;
    use courier_proto::{Body, ErrorCode, EventPayload, Sender};
    use courier_store::faulty_engine::FaultyEngine;
    use courier_store::{AppendKey, NewConversation};

    fn message(conv: &str, client_msg_id: &str, text: &str) -> Append {
        let sender = Sender {
            user: "alice".into(),
            device: "phone".into(),
        };
        let body = Body::Text(text.into());
        Append {
            create: Some(NewConversation::direct("alice", "bob")),
            ..Append::message(conv.into(), sender, client_msg_id.into(), body, None)
        }
    }

    pub(crate) fn node(id: &str, lease: Duration) -> Ownership {
        Ownership {
            node: id.into(),
            lease,
        }
    }

    pub(crate) async fn node_on(store: &MessageStore, ownership: Ownership) -> Arc<LocalSequencer> {
        LocalSequencer::start(
            store.clone(),
            ownership,
            SequencerLimits::default(),
            Arc::new(Listeners(Vec::new())),
            Arc::new(Metrics::new()),
        )
        .await
        .unwrap()
    }

    async fn seq_of(sequencer: &LocalSequencer, id: &str) -> Result<u64, SequencerError> {
        sequencer
            .submit(message("d:1", id, id))
            .await
            .map(|outcome| outcome.seq)
    }

    #[tokio::test]
    async fn messages_past_a_groups_send_rate_are_refused_with_the_wait() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let limits = SequencerLimits {
            group_sends: Rate {
                per_second: 1,
                burst: 2,
            },
            ..SequencerLimits::default()
        };
        let sequencer = node_with(&store, "n1", limits).await;
        let rate_limited = |result: Result<AppendOutcome, SequencerError>| match result {
            Err(SequencerError::RateLimited { retry_after_ms }) => {
                assert!(retry_after_ms > 0);
                true
            }
            _ => false,
        };
        // The burst of g:1 passes the rate (the store then refuses: alice is no member).
        for i in 0..2 {
            let burst = sequencer
                .submit(message("g:1", &format!("b{i}"), "x"))
                .await;
            assert!(!rate_limited(burst));
        }
        let past = sequencer.submit(message("g:1", "past", "x")).await;
        assert!(rate_limited(past));
        // A delete is an event to every member too, and takes the same rate.
        let delete = Append {
            key: AppendKey::Server("delete:1".into()),
            payload: EventPayload::Delete { target_seq: 1 },
            create: None,
            ..message("g:1", "unused", "x")
        };
        assert!(rate_limited(sequencer.submit(delete).await));
        let api = ApiError::from(SequencerError::RateLimited { retry_after_ms: 7 });
        assert_eq!(
            (api.code, api.retry_after_ms),
            (ErrorCode::RateLimited, Some(7))
        );
        // Other groups and direct conversations have their own rate, or none.
        assert!(!rate_limited(
            sequencer.submit(message("g:2", "o", "x")).await
        ));
        for i in 0..5 {
            let direct = sequencer
                .submit(message("d:1", &format!("d{i}"), "x"))
                .await;
            assert!(!rate_limited(direct));
        }
    }

    /// A conversation of `store` on another shard than `of`.
    fn on_another_shard(store: &MessageStore, of: &str) -> String {
        (2..)
            .map(|i| format!("d:{i}"))
            .find(|conv| store.shard_of(conv) != store.shard_of(of))
            .unwrap()
    }

    /// Moves fanout's bound past every entry of `shard`'s outbox, as fanout does once it
    /// delivered them.
    async fn drain_outbox(store: &MessageStore, shard: u32) {
        let delivery = store
            .acquire_shards(Duty::Delivery, "f1", &[shard], usize::MAX, now_ms(), 60_000)
            .await
            .unwrap();
        let entries = store.outbox(shard, None, usize::MAX).await.unwrap();
        store
            .advance_delivered(&[courier_store::DeliveredBound {
                lease: delivery[0],
                bound: courier_store::bound_after(&entries.last().unwrap().0),
            }])
            .await
            .unwrap();
    }

    /// Sequencer node `id` of `store` with `limits`.
    async fn node_with(
        store: &MessageStore,
        id: &str,
        limits: SequencerLimits,
    ) -> Arc<LocalSequencer> {
        LocalSequencer::start(
            store.clone(),
            node(id, Duration::from_secs(10)),
            limits,
            Arc::new(Listeners(Vec::new())),
            Arc::new(Metrics::new()),
        )
        .await
        .unwrap()
    }

    /// The only sequencer node of `store`, refusing messages to shards whose outbox is older
    /// than `limit`.
    async fn with_outbox_lag_limit(store: &MessageStore, limit: Duration) -> Arc<LocalSequencer> {
        let limits = SequencerLimits {
            outbox_lag_limit: limit,
            ..SequencerLimits::default()
        };
        node_with(store, "n1", limits).await
    }

    /// An outbox row that does not decode fails its own shard's reading only: the watch goes
    /// on judging the other shards (one such row froze every shard's verdict: a shard behind
    /// kept refusing sends after fanout caught up, and one falling behind was never marked).
    #[tokio::test]
    async fn an_outbox_row_that_does_not_decode_leaves_the_other_shards_watched() {
        use courier_store::kv::{Batch, KvEngine};
        const LIMIT: Duration = Duration::from_secs(5);
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let sequencer = with_outbox_lag_limit(&store, LIMIT).await;
        let damaged = on_another_shard(&store, "d:1");
        let mut key = store.keys().outbox(store.shard_of(&damaged)).start;
        key.push(1);
        let mut row = Batch::new();
        row.set(key, b"not an outbox row".to_vec());
        engine.commit(row).await.unwrap();
        let first = sequencer.submit(message("d:1", "m1", "x")).await.unwrap();

        let past_limit = first.ts_ms + LIMIT.as_millis() as u64 + 1;
        assert_eq!(sequencer.watch_outboxes_at(past_limit).await.unwrap(), 4);
        assert!(matches!(
            seq_of(&sequencer, "m2").await,
            Err(SequencerError::DeliveryBehind)
        ));
    }

    #[tokio::test]
    async fn a_shard_whose_outbox_is_behind_refuses_messages_until_it_drains() {
        const LIMIT: Duration = Duration::from_secs(5);
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let sequencer = with_outbox_lag_limit(&store, LIMIT).await;
        let shard = store.shard_of("d:1");
        let other = on_another_shard(&store, "d:1");
        // The first round reads every shard just taken; with nothing committed since, the
        // next reads none.
        assert_eq!(sequencer.watch_outboxes_at(now_ms()).await.unwrap(), 4);
        assert_eq!(sequencer.watch_outboxes_at(now_ms()).await.unwrap(), 0);
        let first = sequencer.submit(message("d:1", "m1", "x")).await.unwrap();

        // Waiting exactly the limit is not behind; past it is.
        let at_limit = first.ts_ms + LIMIT.as_millis() as u64;
        assert_eq!(sequencer.watch_outboxes_at(at_limit).await.unwrap(), 1);
        assert_eq!(seq_of(&sequencer, "m2").await.unwrap(), 2);
        sequencer.watch_outboxes_at(at_limit + 1).await.unwrap();
        assert!(matches!(
            seq_of(&sequencer, "m3").await,
            Err(SequencerError::DeliveryBehind)
        ));
        let api = ApiError::from(SequencerError::DeliveryBehind);
        assert_eq!(
            (api.code, api.retry_after_ms),
            (ErrorCode::Unavailable, Some(500))
        );
        // Nothing was committed for the refused message.
        let waiting = store.outbox(shard, None, usize::MAX).await.unwrap();
        assert_eq!(waiting.len(), 2);
        // The other shards accept, and appends other than messages pass on this one.
        let elsewhere = sequencer.submit(message(&other, "o1", "x")).await.unwrap();
        assert_eq!(elsewhere.seq, 1);
        let delete = Append {
            key: AppendKey::Server("delete:1".into()),
            payload: EventPayload::Delete { target_seq: 1 },
            create: None,
            ..message("d:1", "-", "")
        };
        assert_eq!(sequencer.submit(delete).await.unwrap().seq, 3);

        // Fanout delivers the outbox: the next round accepts again.
        drain_outbox(&store, shard).await;
        sequencer.watch_outboxes_at(at_limit + 1).await.unwrap();
        assert_eq!(seq_of(&sequencer, "m3").await.unwrap(), 4);
        // The message just sent waits in turn; once it is older than the limit, refused again.
        let waiting = store.oldest_outbox_entries(&[shard]).await.unwrap();
        let later = waiting[0].as_ref().unwrap().as_ref().unwrap().ts_ms;
        sequencer
            .watch_outboxes_at(later + LIMIT.as_millis() as u64 + 1)
            .await
            .unwrap();
        assert!(matches!(
            seq_of(&sequencer, "m4").await,
            Err(SequencerError::DeliveryBehind)
        ));
    }

    /// A round reads each shard's outbox from fanout's bound: entries fanout delivered (and
    /// the tombstones of those the push notifier cleared) lie below it.
    #[tokio::test]
    async fn a_round_reads_an_outbox_from_fanouts_bound() {
        const LIMIT: Duration = Duration::from_secs(5);
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let sequencer = with_outbox_lag_limit(&store, LIMIT).await;
        let shard = store.shard_of("d:1");
        let outbox = store.keys().outbox(shard);
        let read_from = || {
            let read = engine.take_ranges_read().into_iter();
            read.filter(|range| range.end == outbox.end)
                .map(|range| range.start)
                .collect::<Vec<_>>()
        };
        sequencer.watch_outboxes_at(now_ms()).await.unwrap();
        for id in ["m1", "m2"] {
            sequencer.submit(message("d:1", id, "x")).await.unwrap();
        }
        drain_outbox(&store, shard).await;
        let last_key = store.outbox(shard, None, usize::MAX).await.unwrap()[1]
            .0
            .clone();
        read_from();
        sequencer.watch_outboxes_at(now_ms()).await.unwrap();
        assert_eq!(read_from(), [courier_store::bound_after(&last_key)]);

        let third = sequencer.submit(message("d:1", "m3", "x")).await.unwrap();
        sequencer
            .watch_outboxes_at(third.ts_ms + LIMIT.as_millis() as u64 + 1)
            .await
            .unwrap();
        assert!(matches!(
            seq_of(&sequencer, "m4").await,
            Err(SequencerError::DeliveryBehind)
        ));
    }

    #[tokio::test]
    async fn a_shard_taken_over_with_an_old_outbox_is_read_by_its_new_owner() {
        const LIMIT: Duration = Duration::from_secs(5);
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let limits = SequencerLimits {
            outbox_lag_limit: LIMIT,
            ..SequencerLimits::default()
        };
        let from = node_with(&store, "n1", limits).await;
        let to = node_with(&store, "n2", limits).await;
        let sent = from.submit(message("d:1", "m1", "x")).await.unwrap();
        let shard = store.shard_of("d:1");
        let past_limit = sent.ts_ms + LIMIT.as_millis() as u64 + 1;
        from.watch_outboxes_at(past_limit).await.unwrap();
        // The shard moves; the former owner answers `ShardMoved` (its caller looks for the
        // new owner), not `DeliveryBehind`.
        from.hand_off(shard, "n2").await.unwrap();
        assert!(matches!(
            seq_of(&from, "m2").await,
            Err(SequencerError::ShardMoved)
        ));
        // Even when a round that began before the move writes its verdict after it.
        from.outbox
            .round(&store, &[shard], past_limit, &from.metrics)
            .await
            .unwrap();
        assert!(from.outbox.is_behind(shard));
        assert!(matches!(
            seq_of(&from, "m2").await,
            Err(SequencerError::ShardMoved)
        ));
        to.keep_round().await;
        // Nothing was committed through n2, yet its first round reads the outbox it took.
        to.watch_outboxes_at(past_limit).await.unwrap();
        assert!(matches!(
            seq_of(&to, "m2").await,
            Err(SequencerError::DeliveryBehind)
        ));
        drain_outbox(&store, shard).await;
        to.watch_outboxes_at(past_limit).await.unwrap();
        assert_eq!(seq_of(&to, "m2").await.unwrap(), 2);
    }

    /// `courier serve` starts the sequencer on a runtime apart from the connections': its
    /// shard actors run there, whoever submits. The sequencer is built with `block_on`, not in
    /// a spawned task, so no finished task lingers in the ordering runtime's count (a task
    /// wakes its `JoinHandle` before the runtime releases it).
    #[test]
    fn shard_actors_run_on_the_runtime_the_sequencer_was_started_on() {
        let submitter = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ordering = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let engine = FaultyEngine::new();
        let store = submitter.block_on(engine.store(4));
        let sequencer = ordering.block_on(node_on(&store, node("n1", Duration::from_secs(10))));
        let before = ordering.metrics().num_alive_tasks();
        assert_eq!(submitter.block_on(seq_of(&sequencer, "m1")).unwrap(), 1);
        assert_eq!(
            ordering.metrics().num_alive_tasks(),
            before + 1,
            "the shard's actor runs on the sequencer's runtime"
        );
        ordering.shutdown_background();
    }

    #[tokio::test]
    async fn a_second_node_takes_no_shard_a_live_node_holds() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let first = node_on(&store, node("n1", Duration::from_secs(10))).await;
        let second = node_on(&store, node("n2", Duration::from_secs(10))).await;
        assert_eq!(first.owned().len(), 4);
        assert!(second.owned().is_empty());
        assert!(matches!(
            seq_of(&second, "m1").await,
            Err(SequencerError::ShardMoved)
        ));
        assert_eq!(seq_of(&first, "m1").await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_hand_off_commits_what_was_queued_then_the_new_owner_goes_on() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let from = node_on(&store, node("n1", Duration::from_secs(10))).await;
        let to = node_on(&store, node("n2", Duration::from_secs(10))).await;
        let shard = store.shard_of("d:1");
        // Queued before the freeze: every one of them is committed, in order.
        let queued: Vec<_> = (1..=20)
            .map(|i| from.submit(message("d:1", &format!("q{i}"), "x")))
            .collect();
        let flipped = from.hand_off(shard, "n2").await.unwrap();
        let seqs: Vec<u64> = futures::future::join_all(queued)
            .await
            .into_iter()
            .map(|r| r.unwrap().seq)
            .collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
        assert!(matches!(
            seq_of(&from, "late").await,
            Err(SequencerError::ShardMoved)
        ));
        assert_eq!(
            store
                .shard_owner(Duty::Sequencing, shard)
                .await
                .unwrap()
                .unwrap()
                .epoch,
            flipped.epoch
        );
        to.keep_round().await;
        assert!(to.owned().iter().any(|lease| lease.shard == shard));
        assert_eq!(
            seq_of(&to, "late").await.unwrap(),
            21,
            "dense across the move"
        );
    }

    /// A drained node stays up (an admin `Drain`) and may still be handed a shard: it gives
    /// it back at its next round instead of holding it unserved until the lease lapses, and
    /// the former owner takes it back at once.
    #[tokio::test]
    async fn a_drained_node_gives_back_a_shard_handed_to_it() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let from = node_on(&store, node("n1", Duration::from_secs(3600))).await;
        let drained = node_on(&store, node("n2", Duration::from_secs(3600))).await;
        assert!(drained.drain().await.unwrap().is_empty());
        let shard = store.shard_of("d:1");
        assert_eq!(seq_of(&from, "m1").await.unwrap(), 1);

        from.hand_off(shard, "n2").await.unwrap();
        drained.keep_round().await;
        assert!(drained.owned().is_empty(), "a drained node takes nothing");
        let owner = store
            .shard_owner(Duty::Sequencing, shard)
            .await
            .unwrap()
            .unwrap();
        assert!(
            !owner.is_live(now_ms()),
            "the shard is free again, not held by n2 for its lease: {owner:?}"
        );
        from.keep_round().await;
        assert_eq!(
            seq_of(&from, "m2").await.unwrap(),
            2,
            "served again by n1, dense"
        );
    }

    #[tokio::test]
    async fn a_node_that_stops_renewing_loses_its_shards_and_can_take_them_back_later() {
        let engine = FaultyEngine::new();
        let store = engine.store(1).await;
        let lease = Duration::from_millis(300);
        // n1 never runs `keep_shards`: it is paused, as far as the store can tell.
        let paused = node_on(&store, node("n1", lease)).await;
        assert_eq!(seq_of(&paused, "m1").await.unwrap(), 1);
        let survivor = node_on(&store, node("n2", lease)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while survivor.owned().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "n1's lease never lapsed"
            );
            tokio::time::sleep(lease / 3).await;
            survivor.keep_round().await;
        }
        // The paused node wakes up: its batch is refused by the epoch, whatever it thinks.
        assert!(matches!(
            seq_of(&paused, "m2").await,
            Err(SequencerError::ShardMoved)
        ));
        paused.keep_round().await;
        assert!(
            paused.owned().is_empty(),
            "it sees the shard is not its own"
        );
        assert_eq!(seq_of(&survivor, "m2").await.unwrap(), 2);

        // Once the survivor gives the shard up, the first node takes it again (a fenced-out
        // shard is not refused until restart).
        survivor.drain().await.unwrap();
        paused.keep_round().await;
        assert_eq!(paused.owned().len(), 1);
        assert_eq!(seq_of(&paused, "m3").await.unwrap(), 3);
    }

    async fn sequencer(engine: &Arc<FaultyEngine>) -> Arc<LocalSequencer> {
        LocalSequencer::start(
            engine.store(4).await,
            Ownership {
                node: "n1".into(),
                lease: Duration::from_secs(10),
            },
            SequencerLimits::default(),
            Arc::new(Listeners(Vec::new())),
            Arc::new(Metrics::new()),
        )
        .await
        .unwrap()
    }

    /// A sequencer on a faulty engine's store, and what its commit listener is told.
    async fn recorded_sequencer() -> (
        Arc<FaultyEngine>,
        MessageStore,
        Arc<Recorded>,
        Arc<LocalSequencer>,
    ) {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let told = Arc::new(Recorded::default());
        let sequencer = LocalSequencer::start(
            store.clone(),
            node("n1", Duration::from_secs(10)),
            SequencerLimits::default(),
            told.clone(),
            Arc::new(Metrics::new()),
        )
        .await
        .unwrap();
        (engine, store, told, sequencer)
    }

    /// What a listener was told: the keys and seqs of the entries listed, or a count.
    #[derive(Debug, PartialEq)]
    enum Told {
        Listed(u32, Vec<(Vec<u8>, u64)>),
        Count(u32, usize),
    }

    #[derive(Default)]
    struct Recorded(std::sync::Mutex<Vec<Told>>);

    impl Recorded {
        fn take(&self) -> Vec<Told> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl CommitListener for Recorded {
        fn committed(&self, shard: u32, events: usize) {
            self.0.lock().unwrap().push(Told::Count(shard, events));
        }

        fn committed_entries(&self, shard: u32, entries: Vec<courier_store::ListedEntry>) {
            let listed = entries
                .iter()
                .map(|e| (e.key.clone(), e.event.seq))
                .collect();
            self.0.lock().unwrap().push(Told::Listed(shard, listed));
        }
    }

    /// A commit lists its outbox entries, under the keys the store holds them at; a commit
    /// whose outcome was unknown for a while may have left entries no one lists, and its
    /// listener is told so without a list, whether a retry then succeeded or not.
    #[tokio::test]
    async fn listeners_get_each_commits_entries_and_no_list_after_an_unknown_outcome() {
        let (engine, store, told, sequencer) = recorded_sequencer().await;
        let shard = store.shard_of("d:1");
        let outbox_from = |after: usize| {
            let store = store.clone();
            async move {
                let entries = store.outbox(shard, None, 100).await.unwrap();
                entries[after..]
                    .iter()
                    .map(|(key, event)| (key.clone(), event.seq))
                    .collect::<Vec<_>>()
            }
        };

        assert_eq!(seq_of(&sequencer, "m1").await.unwrap(), 1);
        assert_eq!(told.take(), [Told::Listed(shard, outbox_from(0).await)]);

        // The first attempt's outcome is unknown, the store's retry commits.
        let failed_once = std::sync::atomic::AtomicBool::new(false);
        engine.set_fault(Some(Box::new(move |_| {
            (!failed_once.swap(true, AtomicOrdering::Relaxed)).then_some(StoreError::MaybeCommitted)
        })));
        assert_eq!(seq_of(&sequencer, "m2").await.unwrap(), 2);
        assert_eq!(told.take(), [Told::Count(shard, 1)]);
        assert_eq!(outbox_from(1).await.len(), 1);

        // Unknown to the last attempt: the client gets an error, the listener a notice.
        engine.set_fault(Some(Box::new(|_| Some(StoreError::MaybeCommitted))));
        assert!(seq_of(&sequencer, "m3").await.is_err());
        assert_eq!(told.take(), [Told::Count(shard, 0)]);
    }

    /// A commit that landed with its answer lost, whose retry then fails otherwise (the store
    /// node went away), left entries no one lists: the client is told the outcome is unknown
    /// and the listener is told of the shard without a list (it was told nothing: in one
    /// process fanout's tail went on with the next commit's entries, and the landed message
    /// was neither delivered live nor pushed).
    #[tokio::test]
    async fn a_landed_commit_whose_retry_fails_otherwise_is_told_without_a_list() {
        let (engine, store, told, sequencer) = recorded_sequencer().await;
        let shard = store.shard_of("d:1");
        assert_eq!(seq_of(&sequencer, "m1").await.unwrap(), 1);
        told.take();

        // m2's commit lands, its answer is lost; from then on the store cannot be read.
        let unreadable = Arc::new(AtomicBool::new(false));
        let landed = unreadable.clone();
        engine.set_landed_fault(Some(Box::new(move |_| {
            (!landed.swap(true, AtomicOrdering::Relaxed)).then_some(StoreError::MaybeCommitted)
        })));
        let reads = unreadable.clone();
        engine.set_read_fault(Some(Box::new(move |_| {
            reads
                .load(AtomicOrdering::Relaxed)
                .then(|| StoreError::Engine("store node unreachable".into()))
        })));
        let refused = seq_of(&sequencer, "m2").await.unwrap_err();
        assert!(
            matches!(refused, SequencerError::Store(StoreError::MaybeCommitted)),
            "{refused:?}"
        );
        assert_eq!(told.take(), [Told::Count(shard, 0)]);

        // m2 is stored, at 2; its retry says so.
        engine.set_read_fault(None);
        let outbox = store.outbox(shard, None, 100).await.unwrap();
        assert_eq!(outbox.len(), 2);
        let retried = sequencer.submit(message("d:1", "m2", "m2")).await.unwrap();
        assert_eq!((retried.seq, retried.duplicate), (2, true));
    }

    /// A commit of unknown outcome whose retry finds the shard taken over (another node bumped
    /// its epoch meanwhile) may have landed: on a store node, an attempt whose answer was lost
    /// can be applied after the retry read, before the new owner's bump. The client is told the
    /// shard moved (it retries with the same id, and the new owner's idempotency record
    /// answers it) and the listener is told of the shard without a list. It was told nothing:
    /// a landed message waited for a later commit's notice or a lease round to be delivered
    /// live, and in one process fanout's tail went on without it.
    #[tokio::test]
    async fn a_fence_that_moved_after_an_unknown_outcome_is_told_without_a_list() {
        let (engine, store, told, sequencer) = recorded_sequencer().await;
        let shard = store.shard_of("d:1");
        assert_eq!(seq_of(&sequencer, "m1").await.unwrap(), 1);
        told.take();

        // m2's first attempt is of unknown outcome; its retry is fenced out.
        let unknown = Arc::new(AtomicBool::new(false));
        let epoch = store.keys().shard_epoch(Duty::Sequencing, shard);
        engine.set_fault(Some(Box::new(move |_| {
            Some(if unknown.swap(true, AtomicOrdering::Relaxed) {
                StoreError::FenceChanged { key: epoch.clone() }
            } else {
                StoreError::MaybeCommitted
            })
        })));
        let refused = seq_of(&sequencer, "m2").await.unwrap_err();
        assert!(matches!(refused, SequencerError::ShardMoved), "{refused:?}");
        assert_eq!(told.take(), [Told::Count(shard, 0)]);
    }

    #[tokio::test]
    async fn unknown_outcomes_and_overload_reach_clients_as_unavailable() {
        let engine = FaultyEngine::new();
        let sequencer = sequencer(&engine).await;
        let faults = [
            StoreError::MaybeCommitted,
            StoreError::Overloaded("throttled".into()),
            StoreError::Engine("I/O error".into()),
        ];
        for (i, fault) in faults.into_iter().enumerate() {
            let injected = fault.clone();
            engine.set_fault(Some(Box::new(move |_| Some(injected.clone()))));
            let refused = sequencer
                .submit(message("d:1", &format!("m{i}"), "hello"))
                .await
                .unwrap_err();
            let api = ApiError::from(refused);
            assert_eq!(api.code, ErrorCode::Unavailable, "{fault:?}: {api:?}");
            assert!(api.retry_after_ms.is_some(), "{fault:?}: {api:?}");
        }
        engine.set_fault(None);
        // The retry the client makes with the same id is sequenced, once.
        let sent = sequencer
            .submit(message("d:1", "m0", "hello"))
            .await
            .unwrap();
        assert_eq!((sent.seq, sent.duplicate), (1, false));
    }

    #[tokio::test]
    async fn a_burst_too_large_for_one_commit_is_split_and_only_a_lone_oversize_append_fails() {
        const BATCH_LIMIT: usize = 160 << 10;
        // Known up front, the limit bounds batches by their estimated size; lowered once the
        // shard's actor runs, the estimate no longer keeps batches under it (as when it is
        // wrong) and the engine refuses them: they are split.
        for limit_known in [true, false] {
            let engine = FaultyEngine::new();
            if limit_known {
                engine.set_max_batch_bytes(BATCH_LIMIT);
            }
            let sequencer = sequencer(&engine).await;
            sequencer.submit(message("d:1", "m0", "hi")).await.unwrap();
            engine.set_max_batch_bytes(BATCH_LIMIT);
            // Each body is well under the limit, the burst together far over it (each append
            // writes its body twice: the event and the outbox entry).
            let body = "x".repeat(16 << 10);
            // Alone over the batch limit (written twice), under the value limit.
            let oversize = "y".repeat(90_000);
            let pending: Vec<_> = (1..=40)
                .map(|i| {
                    let text = if i == 20 { &oversize } else { &body };
                    sequencer.submit(message("d:1", &format!("m{i}"), text))
                })
                .collect();
            let mut seqs = Vec::new();
            for (i, outcome) in (1..).zip(futures::future::join_all(pending).await) {
                match outcome {
                    Ok(sent) if i != 20 => seqs.push(sent.seq),
                    Err(e) if i == 20 => {
                        assert_eq!(ApiError::from(e).code, ErrorCode::TooLarge);
                    }
                    other => panic!("append {i} (limit known: {limit_known}): {other:?}"),
                }
            }
            assert_eq!(seqs, (2..=40).collect::<Vec<u64>>(), "dense, in order");
        }
    }

    #[tokio::test]
    async fn the_size_estimate_covers_what_an_append_writes() {
        let engine = FaultyEngine::new();
        let store = engine.store(1).await;
        let lease = store
            .acquire_shards(Duty::Sequencing, "test", &[0], usize::MAX, 0, u64::MAX)
            .await
            .unwrap()[0];
        let written = Arc::new(std::sync::Mutex::new(0));
        let seen = written.clone();
        engine.set_fault(Some(Box::new(move |batch| {
            *seen.lock().unwrap() = batch.approximate_size();
            None
        })));
        let caption = courier_proto::Media {
            media_id: "m1".into(),
            mime: "image/png".into(),
            size: 1,
            sha256: "0".repeat(64),
            name: Some("cat.png".into()),
            caption: Some("c".repeat(30_000)),
        };
        let mut media = message("d:2", "media", "");
        if let EventPayload::Message { body, .. } = &mut media.payload {
            *body = Some(Body::Media(Box::new(caption)));
        }
        let group = Append {
            conversation_id: "g:1".into(),
            key: AppendKey::Server("created".into()),
            payload: EventPayload::GroupCreated {
                name: "friends".into(),
                members: (0..100).map(|i| format!("user{i}")).collect(),
            },
            create: None,
            ..message("g:1", "-", "")
        };
        let appends = [
            message("d:1", "first", &"x".repeat(60_000)),
            message("d:1", "second", "hi"),
            media,
            group,
        ];
        for append in appends {
            let estimate = append.approximate_size();
            store
                .append(
                    lease,
                    &mut HeadCache::default(),
                    std::slice::from_ref(&append),
                )
                .await
                .unwrap();
            let written = *written.lock().unwrap();
            assert!(
                written <= estimate && estimate < 2 * written + 1024,
                "{:?}: estimate {estimate}, written {written}",
                append.payload
            );
        }
    }
}
