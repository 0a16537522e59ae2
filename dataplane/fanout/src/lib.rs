//! The fanout role (delivery): tails the outbox of each shard it owns in commit order and hands
//! every event to the connected devices of the conversation's members, except the sending
//! device (it got `sent`). Messages are stored once per conversation (fanout-on-read): nothing
//! is written per recipient. Delivery is at-least-once: fanout's bound in an outbox moves past
//! an entry only after the gateways took its event, and devices that miss a live event catch
//! up from their cursor.
//!
//! **Which shards.** A node drains the outboxes of the shards it owns for
//! [`Duty::Delivery`] (`courier_store::ownership`): leases renewed every third of
//! `--shard-lease`, each change of owner bumping the shard's delivery epoch, on which every
//! record of fanout's bound fences, so a deposed node can deliver twice but never record what
//! it did not deliver. Each node takes at most its fair share of the shards (all of them
//! divided by the live nodes with the fanout role, rounded up) and gives back what it holds
//! beyond it, so a node that joins gets its share within two rounds and the shards of a node
//! that died are taken once its leases lapse. One `courier serve` is the only fanout node: it
//! takes every shard.
//!
//! **Waking up.** Whoever learns of a commit tells the shard's fanout
//! ([`Fanout::committed`], in-process, or over gRPC from another node); on a cluster node every
//! round also looks at every owned shard, so a lost notice delays a delivery by at most a round.
//!
//! **Tails.** In one process the sequencer lists the entries each commit added
//! ([`CommitListener::committed_entries`]: keys and events), and a shard whose outbox a drain
//! has read to its end keeps them, so that the next drains take them without reading them back
//! ([`Tails`]). Entries of a commit nobody lists (an unknown outcome) drop the tail, and so do a
//! failed drain and a restarted worker: the next drain reads the outbox. Tails hold at most
//! [`TAILS_MAX_BYTES`] of events together; a tail that would pass it is dropped. A cluster node,
//! whose outboxes other nodes also write, keeps none.
//!
//! Shards are split over a fixed number of workers (`shard % workers`), so one shard is
//! always drained by one worker, in order. Recipients come from the [`MembershipCache`], kept
//! in step with each conversation's order. The events of one outbox page go to the gateways as
//! one batch ([`Gateways::deliver`]: one call per gateway in a cluster). Events of groups
//! larger than the large-group threshold take a slow path: their own bounded queue and worker,
//! so a huge group cannot starve 1:1 traffic; when that queue is full the shard waits (nothing
//! is dropped), and fanout's bound passes such an event only after that worker delivered it.
//! Connections reorder nothing: they skip what they have and fill gaps from the store.
//!
//! **Recording (decision 0006).** Fanout clears nothing: it records, per shard, a bound in the
//! outbox below which every entry was handed to the gateways (`("fcur", shard)`); the push
//! notifier, the outbox's other reader, clears it below both readers' bounds. Each drained
//! range (a page, or the part of a page before a large-group event, or that event) is numbered
//! in its lease's order and goes to one background task, the recorder, which moves the bound
//! over ranges in that order only (a range drained after a large-group event waits for it)
//! and takes the bounds of every shard that moved within [`RECORD_LINGER`] into one deferred
//! commit (a record that a power loss takes back only fans those entries out again). A worker
//! does not wait for that commit (it reads on from its in-memory bound), so a drain costs no
//! commit of its own: with many busy conversations (one outbox entry per shard per drain) a
//! commit per drain would bound delivery at a few thousand events a second. The queue holds
//! [`RECORD_QUEUE`] ranges; when it is full, workers wait for it. A failed commit is retried,
//! without the bound of a shard this node lost (its entries are its new owner's to deliver);
//! a crash before it only delivers those entries again (at-least-once). A node that takes a
//! shard starts at its recorded bound, unless that lies past every entry the outbox holds
//! (damage, or entries cleared since): then no higher than the push notifier's bound, and
//! below every entry held, so that a bound damaged past the commits to come cannot silence
//! the shard (`Fanout::starting_bound`).
//!
//! **Loops and their failures.** The workers, the large-group worker, the recorder and the lease
//! keeper are loops owned by the node's [`BackgroundLoops`]. Each is restarted if it panics: a
//! worker's state (its dirty shards, the shard cursors) lives in [`Fanout`] and a restarted
//! worker rescans all its shards from their cursors, so what it was delivering is delivered
//! again (connections skip what they have); the two queues' receivers and the recorder's state
//! are kept in [`Fanout`] and taken up again, with what the failed run held: the large-group
//! event it was delivering is delivered again, and the bounds it had taken and not yet
//! recorded are recorded (lost, either would hold its shard's bound back for good, and every
//! range after it in the recorder's memory). At shutdown the workers stop at once
//! (connections have drained by then), and the recorder stops last: it records everything
//! queued, and ends when the last worker is gone.
//!
//! **Entries that do not decode.** An outbox entry, or a whole row, that does not decode
//! (damage, a sequencer of another version) is passed over: logged at error with its shard and
//! key, counted (`courier_outbox_undecodable_entries_total{reader="fanout"}`), and the bound
//! moves past it as past a delivered entry, so the push notifier clears it with the others.
//! Its events stay in the event log: their recipients miss the live delivery only, and read
//! them at a later event's gap fill or their next catch-up. Failing the drain instead retried
//! it for good: the shard delivered nothing more, and past `--outbox-lag-limit` its sends were
//! refused.
//!
//! **Backlog.** `courier_fanout_backlog_events` counts the events of the shards this node
//! drains that it was told of ([`Fanout::committed`]) and has not yet handed off. Entries left
//! in an outbox before this node took the shard (a crash between commit and fanout, a previous
//! owner) were never counted, so the drain does not subtract them: the newest outbox key of
//! each shard is read when it is taken, and entries up to it are delivered without being
//! counted.

use courier_core::clock::now_ms;
use courier_core::context::Context;
use courier_core::gateways::{DeliveryError, Gateways};
use courier_core::leases::Ownership;
use courier_core::listed_tails::Tails;
use courier_core::loops::{BackgroundLoops, CancellationToken};
use courier_core::membership::{Members, MembershipCache};
use courier_core::metrics::{Metrics, ReaderLabel};
use courier_core::sequencing::CommitListener;
use courier_core::shard_cursors::ShardCursors;
use courier_proto::Event;
use courier_store::ownership::Duty;
use courier_store::{
    DeliveredBound, ListedEntry, MessageStore, OutboxPage, ShardLease, StoreError, bound_after,
};
use foldhash::{HashMap, HashMapExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// Events queued for the large-group path before fanout waits.
const LARGE_GROUP_QUEUE: usize = 1024;

/// Outbox entries one step of a shard takes from its tail, and rows (a commit's entries each)
/// it reads from the store.
const OUTBOX_PAGE: usize = 256;

/// Entries one step of a shard takes at most from the rows it reads from the store: under load
/// a commit's row lists many entries, and a step that took [`OUTBOX_PAGE`] of them read the
/// same rows again at the next step (a cluster's node reads every page from the store).
const STORE_PAGE_ENTRIES: usize = 4096;

/// Bytes of listed events kept across all shards' tails (as stored, encoded); past it, the
/// tail that would grow beyond it is dropped and its shard's outbox read again.
const TAILS_MAX_BYTES: usize = 16 << 20;

/// Delivered outbox ranges waiting for the recorder before workers wait.
const RECORD_QUEUE: usize = 4096;

/// Most ranges taken into one commit of bounds.
const RANGES_PER_COMMIT: usize = 1024;

/// How long the recorder gathers ranges after the first before it commits: nobody waits for
/// it, so under a light load this turns one commit per drain into one per linger, and one
/// write of a busy shard's bound per drain into one per linger. A crash takes back at most
/// this much of fanout's progress (delivered again, skipped by the connections).
const RECORD_LINGER: Duration = Duration::from_millis(100);

/// Wait before a failed delivery or record is tried again.
const RETRY: Duration = Duration::from_millis(100);

/// The role name nodes register with, counted for the fair share.
const ROLE: &str = "fanout";

/// How the fanout runs.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// Tasks draining shards (`shard % workers`).
    pub workers: usize,
    /// Groups with more members than this take the large-group path.
    pub large_group_threshold: usize,
    /// This node's id and lease length in the shards' delivery ownership records.
    pub ownership: Ownership,
    /// Whether every round looks at every owned shard: on a cluster node, where notices of
    /// commits travel over the network and may be lost. In one process no notice is lost.
    pub look_at_every_shard_each_round: bool,
}

struct Worker {
    dirty: Mutex<BTreeSet<u32>>,
    wake: Notify,
}

/// A range of one shard's outbox handed to the gateways: the `order`-th of its lease (from
/// 0), ending below `bound`. The recorder moves the shard's bound over ranges in their order,
/// so a large-group range delivered late holds back the ranges after it.
#[derive(Debug)]
struct Drained {
    lease: ShardLease,
    order: u64,
    bound: Vec<u8>,
}

/// A large-group event with its recipients, and its drained range, recorded once it was
/// delivered.
struct LargeDelivery {
    delivery: (Event, Members),
    drained: Drained,
}

/// The large-group queue, and the delivery its worker took from it and has not yet handed to
/// the recorder: kept here, so that a worker restarted after a panic delivers it again.
struct LargeGroupQueue {
    queue: mpsc::Receiver<LargeDelivery>,
    taken: Option<LargeDelivery>,
}

/// What a worker hands off: large-group events to their worker, drained ranges to the
/// recorder. Only the workers and the large-group worker hold these senders, so each queue
/// closes once they are gone.
#[derive(Clone)]
struct Handoffs {
    large: mpsc::Sender<LargeDelivery>,
    drained: mpsc::Sender<Drained>,
}

/// A shard whose outbox this node drains.
struct OwnedShard {
    lease: ShardLease,
    /// The newest outbox key written before this node took the shard (not counted in
    /// `backlog`).
    inherited: Option<Vec<u8>>,
    /// The order of the next range drained under `lease`.
    next_order: u64,
}

pub struct Fanout {
    store: MessageStore,
    gateways: Arc<dyn Gateways>,
    membership: Arc<MembershipCache>,
    metrics: Arc<Metrics>,
    workers: Vec<Worker>,
    backlog: AtomicI64,
    owned: Mutex<HashMap<u32, OwnedShard>>,
    /// The entries this process's commits listed, kept for the next drains of the owned
    /// shards: only where this process's sequencer lists every entry of the outboxes fanout
    /// drains, or tells of the ones it cannot list (one process).
    tails: Tails<ListedEntry>,
    cursors: ShardCursors,
    large_group_threshold: usize,
    ownership: Ownership,
    look_at_every_shard_each_round: bool,
    /// Held by the lease round running.
    keeping: tokio::sync::Mutex<()>,
    /// The senders of the two queues below, until [`Fanout::start`] hands them to the workers.
    handoffs: Mutex<Option<Handoffs>>,
    /// Large-group events waiting for their worker, and the one it is delivering (held by it
    /// while it runs).
    large_queue: Arc<tokio::sync::Mutex<LargeGroupQueue>>,
    /// Drained outbox ranges waiting to be recorded, and where each lease's ranges stand (held
    /// by the recorder while it runs, kept for it if it is restarted).
    recorder: Arc<tokio::sync::Mutex<Recorder>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fanout {
    /// Builds the fanout and takes its share of the shards (every free one when it is the
    /// only fanout node). Build it before the sequencer that reports commits to it.
    pub async fn new(context: Context, config: FanoutConfig) -> Result<Arc<Self>, StoreError> {
        let Context {
            store,
            gateways,
            membership,
            metrics,
        } = context;
        let (large, large_queue) = mpsc::channel(LARGE_GROUP_QUEUE);
        let (drained, record_queue) = mpsc::channel(RECORD_QUEUE);
        let workers = (0..config.workers.max(1))
            .map(|_| Worker {
                dirty: Mutex::new(BTreeSet::new()),
                wake: Notify::new(),
            })
            .collect();
        let fanout = Arc::new(Self {
            store,
            gateways,
            membership,
            metrics,
            workers,
            backlog: AtomicI64::new(0),
            owned: Mutex::default(),
            tails: Tails::new(TAILS_MAX_BYTES),
            cursors: ShardCursors::default(),
            large_group_threshold: config.large_group_threshold,
            ownership: config.ownership,
            look_at_every_shard_each_round: config.look_at_every_shard_each_round,
            keeping: tokio::sync::Mutex::new(()),
            handoffs: Mutex::new(Some(Handoffs { large, drained })),
            large_queue: Arc::new(tokio::sync::Mutex::new(LargeGroupQueue {
                queue: large_queue,
                taken: None,
            })),
            recorder: Arc::new(tokio::sync::Mutex::new(Recorder {
                queue: record_queue,
                shards: HashMap::new(),
                unrecorded: BTreeMap::new(),
            })),
        });
        fanout
            .tails
            .set_keeping(!config.look_at_every_shard_each_round);
        let share = fanout.fair_share().await?;
        fanout.take_free_shards(share).await?;
        Ok(fanout)
    }

    /// Starts the workers, the large-group worker, the recorder and the lease keeper as loops of
    /// `loops` (once; later calls do nothing). The shards taken so far are drained first:
    /// entries left by a crash between commit and fanout are delivered now.
    pub fn start(self: &Arc<Self>, loops: &BackgroundLoops) {
        let Some(handoffs) = lock(&self.handoffs).take() else {
            return;
        };
        for index in 0..self.workers.len() {
            let (fanout, handoffs) = (self.clone(), handoffs.clone());
            loops.spawn(format!("fanout worker {index}"), move |cancel| {
                let (fanout, handoffs) = (fanout.clone(), handoffs.clone());
                async move {
                    for shard in fanout.owned_shards() {
                        if shard as usize % fanout.workers.len() == index {
                            // A worker restarted after a panic may have taken entries from
                            // the tail that it never handed off: read them again.
                            fanout.tails.drop_shard(shard);
                            fanout.mark(shard);
                        }
                    }
                    cancel
                        .run_until_cancelled(fanout.run(index, &handoffs))
                        .await;
                }
            });
        }
        let (fanout, drained) = (self.clone(), handoffs.drained.clone());
        drop(handoffs);
        loops.spawn("fanout large-group worker", move |cancel| {
            let (fanout, drained) = (fanout.clone(), drained.clone());
            async move {
                let mut large = fanout.large_queue.lock().await;
                loop {
                    let next = match large.taken.take() {
                        Some(taken) => taken,
                        None => match cancel.run_until_cancelled(large.queue.recv()).await {
                            Some(Some(next)) => {
                                fanout.metrics.large_group_queue.dec();
                                next
                            }
                            _ => break,
                        },
                    };
                    let taken = &large.taken.insert(next).delivery;
                    if !fanout
                        .deliver_until_taken(std::slice::from_ref(taken), &cancel)
                        .await
                    {
                        break;
                    }
                    if let Some(delivered) = large.taken.take() {
                        // The receiver is kept in `fanout`: a send error cannot happen.
                        let _ = drained.send(delivered.drained).await;
                    }
                }
            }
        });
        let (store, recorder) = (self.store.clone(), self.recorder.clone());
        loops.spawn("fanout bound recorder", move |cancel| {
            let (store, recorder) = (store.clone(), recorder.clone());
            async move {
                let mut recorder = recorder.lock().await;
                record_bounds(&store, &mut recorder, &cancel).await;
            }
        });
        let keeper = self.clone();
        // Stops at once when cancelled; restarted if it panics: the leases are in the store.
        loops.spawn("keep fanout shard leases", move |cancel| {
            let keeper = keeper.clone();
            async move {
                let keep = async {
                    let mut rounds = tokio::time::interval(keeper.ownership.round());
                    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    rounds.tick().await;
                    loop {
                        rounds.tick().await;
                        keeper.keep_round().await;
                    }
                };
                cancel.run_until_cancelled(keep).await;
            }
        });
    }

    /// One lease round: renew, drop what was taken over, give back what is beyond this node's
    /// fair share, take free or lapsed shards up to it, and (on a cluster node) look at every
    /// owned shard. Errors are logged; the next round tries again.
    pub async fn keep_round(&self) {
        let _round = self.keeping.lock().await;
        if let Err(e) = self.renew().await {
            tracing::warn!(error = %e, "renewing fanout shard leases failed; retrying");
        }
        match self.fair_share().await {
            Ok(share) => {
                if let Err(e) = self.give_back_beyond(share).await {
                    tracing::warn!(error = %e, "giving fanout shards back failed; they lapse with their leases");
                }
                if let Err(e) = self.take_free_shards(share).await {
                    tracing::warn!(error = %e, "taking free fanout shards failed; retrying");
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the node registry failed; retrying"),
        }
        if self.look_at_every_shard_each_round {
            for shard in self.owned_shards() {
                self.mark(shard);
            }
        }
    }

    /// Gives every shard back (a node that stops): the other fanout nodes take them at their
    /// next round instead of waiting for the leases to lapse. Returns the shards given back.
    pub async fn release(&self) -> Result<Vec<u32>, StoreError> {
        let _round = self.keeping.lock().await;
        self.give_back_beyond(0).await
    }

    /// The shards whose outboxes this node drains, in order.
    pub fn owned_shards(&self) -> Vec<u32> {
        let mut shards: Vec<u32> = lock(&self.owned).keys().copied().collect();
        shards.sort_unstable();
        shards
    }

    fn lease_of(&self, shard: u32) -> Option<ShardLease> {
        lock(&self.owned).get(&shard).map(|owned| owned.lease)
    }

    /// All shards divided by the live fanout nodes (this one included), rounded up.
    async fn fair_share(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        let others = self
            .store
            .nodes()
            .await?
            .into_iter()
            .filter(|(id, node)| {
                *id != self.ownership.node
                    && node.is_live(now)
                    && node.roles.iter().any(|role| role == ROLE)
            })
            .count();
        Ok((self.store.shard_count() as usize).div_ceil(others + 1))
    }

    async fn renew(&self) -> Result<(), StoreError> {
        let leases: Vec<ShardLease> = lock(&self.owned).values().map(|o| o.lease).collect();
        let lost = self
            .store
            .renew_shards(
                Duty::Delivery,
                &self.ownership.node,
                &leases,
                now_ms(),
                self.ownership.lease_ms(),
            )
            .await?;
        for shard in lost {
            tracing::warn!(shard, "fanout shard taken over by another node");
            self.forget(shard);
        }
        Ok(())
    }

    /// Gives back the highest-numbered shards beyond `share`.
    async fn give_back_beyond(&self, share: usize) -> Result<Vec<u32>, StoreError> {
        let beyond: Vec<ShardLease> = {
            let owned = lock(&self.owned);
            let mut leases: Vec<ShardLease> = owned.values().map(|o| o.lease).collect();
            leases.sort_unstable_by_key(|lease| lease.shard);
            leases.split_off(share.min(leases.len()))
        };
        if beyond.is_empty() {
            return Ok(Vec::new());
        }
        // Forgotten first: no drain of them starts after this point, and a drain in progress
        // can deliver twice but not record (the next owner bumps the epoch its record fences on).
        for lease in &beyond {
            self.forget(lease.shard);
        }
        self.store
            .release_shards(Duty::Delivery, &self.ownership.node, &beyond)
            .await?;
        let shards: Vec<u32> = beyond.iter().map(|lease| lease.shard).collect();
        tracing::info!(shards = shards.len(), "gave fanout shards back");
        Ok(shards)
    }

    /// Takes free or lapsed shards until this node holds `share`.
    async fn take_free_shards(&self, share: usize) -> Result<(), StoreError> {
        let (wanted, candidates) = {
            let owned = lock(&self.owned);
            let candidates: Vec<u32> = (0..self.store.shard_count())
                .filter(|shard| !owned.contains_key(shard))
                .collect();
            (share.saturating_sub(owned.len()), candidates)
        };
        if wanted == 0 {
            return Ok(());
        }
        let taken = self
            .store
            .acquire_shards(
                Duty::Delivery,
                &self.ownership.node,
                &candidates,
                wanted,
                now_ms(),
                self.ownership.lease_ms(),
            )
            .await?;
        if !taken.is_empty() {
            tracing::info!(shards = taken.len(), "took fanout shards");
        }
        for lease in taken {
            let inherited = self.store.last_outbox_key(lease.shard).await?;
            let recorded = self
                .store
                .delivered_bounds(&[lease.shard])
                .await?
                .pop()
                .flatten();
            match self
                .starting_bound(lease.shard, recorded, inherited.as_deref())
                .await?
            {
                Some(bound) => self.cursors.set(lease.shard, bound),
                None => self.cursors.forget(lease.shard),
            }
            let shard = OwnedShard {
                lease,
                inherited,
                next_order: 0,
            };
            self.tails.drop_shard(lease.shard);
            lock(&self.owned).insert(lease.shard, shard);
            self.metrics.fanout_owned_shards.inc();
            self.mark(lease.shard);
        }
        Ok(())
    }

    /// Where the drains of `shard`, just taken, start: its `recorded` bound, unless that lies
    /// past every entry its outbox holds (`newest`, read after the take). Entries are cleared
    /// from the start of the outbox only (below both readers' bounds), so a bound past the
    /// newest entry held is damage, or lies past entries cleared since: then the drains start
    /// at the lower of it and the push notifier's bound (below which everything was cleared;
    /// at the outbox's start without one), and never past an entry held. Taken as it was, a
    /// damaged bound past the stamps of the commits to come silenced the shard: every new entry
    /// lay below it, delivered by no drain.
    async fn starting_bound(
        &self,
        shard: u32,
        recorded: Option<Vec<u8>>,
        newest: Option<&[u8]>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(recorded) = recorded else {
            return Ok(None);
        };
        let after_newest = newest.map(bound_after);
        if after_newest
            .as_ref()
            .is_some_and(|after| recorded <= *after)
        {
            return Ok(Some(recorded));
        }
        if after_newest.is_some() {
            // With entries held, a bound past them all is damage for certain.
            tracing::error!(
                shard,
                bound = %recorded.escape_ascii(),
                "fanout's recorded bound lies past every entry of the outbox: the entries held are delivered again"
            );
        }
        // No bound of the notifier's: it cleared nothing, and the outbox is read from its start.
        let pushed = self.store.pushed_bounds(&[shard]).await?.pop().flatten();
        let lower = pushed.map(|pushed| pushed.min(recorded));
        Ok(match after_newest {
            Some(after) => lower.filter(|lower| *lower <= after),
            None => lower,
        })
    }

    fn forget(&self, shard: u32) {
        if lock(&self.owned).remove(&shard).is_some() {
            self.tails.drop_shard(shard);
            self.metrics.fanout_owned_shards.dec();
        }
    }

    /// The next entries of `shard` from `from` on, from its tail if complete (and whether it
    /// holds more); `None` when the outbox must be read, its tail then kept from now on.
    fn take_tail(&self, shard: u32, from: Option<&[u8]>) -> Option<OutboxPage<Event>> {
        let (entries, more) = self.tails.take(shard, from, OUTBOX_PAGE)?;
        let taken = entries
            .into_iter()
            .map(|entry| (entry.key, Ok(entry.event)))
            .collect();
        Some((taken, more))
    }

    /// An outbox entry (or a whole row) of `shard` under `key` that does not decode: passed
    /// over, logged and counted. Its events are in the event log; what their recipients miss
    /// is their live delivery (the push notifier, which reads the same row, passes it over
    /// too): they get them from the event log, by a later event's gap fill or at their next
    /// catch-up. Held for it, the shard would deliver nothing more, for good.
    fn pass_over(&self, shard: u32, key: &[u8], error: &StoreError) {
        tracing::error!(
            shard,
            key = %key.escape_ascii(),
            %error,
            "an outbox entry that does not decode is passed over: its events are not delivered live"
        );
        self.metrics
            .outbox_undecodable_entries
            .get_or_create(&ReaderLabel { reader: "fanout" })
            .inc();
    }

    fn mark(&self, shard: u32) {
        let worker = &self.workers[shard as usize % self.workers.len()];
        lock(&worker.dirty).insert(shard);
        worker.wake.notify_one();
    }

    async fn run(&self, index: usize, handoffs: &Handoffs) {
        let worker = &self.workers[index];
        loop {
            let next = lock(&worker.dirty).pop_first();
            match next {
                Some(shard) => {
                    if let Err(e) = self.drain(shard, handoffs).await {
                        tracing::error!(shard, error = %e, "fanout failed; retrying");
                        // What it had taken from the tail is read again from the outbox.
                        self.tails.drop_shard(shard);
                        tokio::time::sleep(RETRY).await;
                        self.mark(shard);
                    }
                }
                None => worker.wake.notified().await,
            }
        }
    }

    /// Delivers `shard`'s outbox until a read finds less than a page, or the shard is this
    /// node's no more. Nothing is read again after a short page: an event committed after that
    /// read is told of after its commit, and its notice marks the shard again.
    async fn drain(&self, shard: u32, handoffs: &Handoffs) -> Result<(), DeliveryError> {
        while let Some(lease) = self.lease_of(shard) {
            let from = self.cursors.get(shard);
            let (entries, more) = match self.take_tail(shard, from.as_deref()) {
                Some(taken) => taken,
                None => {
                    self.metrics
                        .outbox_pages_read
                        .get_or_create(&ReaderLabel { reader: "fanout" })
                        .inc();
                    let (entries, more) = self
                        .store
                        .outbox_page(shard, from.as_deref(), OUTBOX_PAGE, STORE_PAGE_ENTRIES)
                        .await?;
                    if !more {
                        self.tails.complete(shard);
                    }
                    (entries, more)
                }
            };
            let Some((last, _)) = entries.last() else {
                return Ok(());
            };
            let bound = bound_after(last);
            let counted = match lock(&self.owned)
                .get(&shard)
                .and_then(|o| o.inherited.clone())
            {
                Some(inherited) => entries.iter().filter(|(key, _)| *key > inherited).count(),
                None => entries.len(),
            } as i64;
            let now = now_ms();
            let mut batch = Vec::with_capacity(entries.len());
            // Entries read since the last range handed to the recorder: passed over, or in
            // `batch`.
            let mut unhanded = false;
            for (key, event) in entries {
                let event = match event {
                    Ok(event) => event,
                    Err(e) => {
                        self.pass_over(shard, &key, &e);
                        unhanded = true;
                        continue;
                    }
                };
                let lag = now.saturating_sub(event.ts_ms) as f64 / 1000.0;
                self.metrics.stages.outbox_read.observe(lag);
                let recipients = self.membership.recipients(&event).await?;
                if recipients.len() <= self.large_group_threshold {
                    batch.push((event, recipients));
                    unhanded = true;
                    continue;
                }
                // What comes before it first, recorded before it.
                if !batch.is_empty() {
                    self.gateways.deliver(std::mem::take(&mut batch)).await?;
                    self.hand_off(lease, key.clone(), handoffs).await;
                }
                self.metrics.large_group_queue.inc();
                let drained = self.drained(lease, bound_after(&key));
                // The receiver is kept in `self`: a send error cannot happen.
                let _ = handoffs
                    .large
                    .send(LargeDelivery {
                        delivery: (event, recipients),
                        drained,
                    })
                    .await;
                unhanded = false;
            }
            if !batch.is_empty() {
                self.gateways.deliver(batch).await?;
            }
            // Entries passed over at the page's end are recorded as the delivered ones are:
            // else the bound would stay below them until a later event's range.
            if unhanded {
                self.hand_off(lease, bound.clone(), handoffs).await;
            }
            self.cursors.set(shard, bound);
            let left = self.backlog.fetch_sub(counted, Ordering::Relaxed) - counted;
            // Below zero only for a moment: the drain can read an entry before its commit was
            // reported.
            self.metrics.fanout_backlog.set(left.max(0));
            if !more {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The next range drained under `lease`, ending below `bound`.
    fn drained(&self, lease: ShardLease, bound: Vec<u8>) -> Drained {
        let order = match lock(&self.owned).get_mut(&lease.shard) {
            Some(owned) if owned.lease == lease => {
                owned.next_order += 1;
                owned.next_order - 1
            }
            // Lost meanwhile: its recorder state is dropped with the lease's fence.
            _ => u64::MAX,
        };
        Drained {
            lease,
            order,
            bound,
        }
    }

    /// Hands a range delivered under `lease`, ending below `bound`, to the recorder.
    async fn hand_off(&self, lease: ShardLease, bound: Vec<u8>, handoffs: &Handoffs) {
        let drained = self.drained(lease, bound);
        // The receiver is kept in `self`: a send error cannot happen.
        let _ = handoffs.drained.send(drained).await;
    }

    /// Hands `batch` to the gateways until they take it or the fanout is cancelled; returns
    /// whether they took it.
    async fn deliver_until_taken(
        &self,
        batch: &[(Event, Members)],
        cancel: &CancellationToken,
    ) -> bool {
        loop {
            match self.gateways.deliver(batch.to_vec()).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, "large-group delivery failed; retrying");
                    if cancel
                        .run_until_cancelled(tokio::time::sleep(RETRY))
                        .await
                        .is_none()
                    {
                        return false;
                    }
                }
            }
        }
    }
}

/// The recorder's queue and state.
struct Recorder {
    queue: mpsc::Receiver<Drained>,
    shards: HashMap<u32, Recorded>,
    /// Bounds taken from the queue and not yet committed: kept here, so that a recorder
    /// restarted after a panic commits them first.
    unrecorded: BTreeMap<u32, DeliveredBound>,
}

/// Where one lease's ranges stand in the recorder: the order of the next range its bound
/// may move over, and the ranges that came before it (a large-group range delivered late).
#[derive(Default)]
struct Recorded {
    epoch: u64,
    next: u64,
    early: BTreeMap<u64, Vec<u8>>,
}

impl Recorded {
    /// Takes `drained`; returns the bound it lets the shard move to, if any. A range of a
    /// lease older than the one whose ranges came already (this node lost the shard and took
    /// it again, and a large-group event of the former lease was delivered late) is dropped:
    /// its bound can no longer be recorded (its epoch moved), and starting the ranges of the
    /// current lease over would hold its bound back for good (their first orders came).
    fn take(&mut self, drained: Drained) -> Option<Vec<u8>> {
        if drained.lease.epoch < self.epoch {
            return None;
        }
        if drained.lease.epoch > self.epoch {
            *self = Recorded {
                epoch: drained.lease.epoch,
                ..Recorded::default()
            };
        }
        self.early.insert(drained.order, drained.bound);
        let mut moved = None;
        while let Some(bound) = self.early.remove(&self.next) {
            self.next += 1;
            moved = Some(bound);
        }
        moved
    }
}

/// Records fanout's bound in each shard's outbox, the ranges of every shard queued at the
/// moment in one commit, until the queue closes (the last worker is gone). Cancellation does
/// not stop it, so that what the workers queued before they stopped is recorded; once
/// cancelled, a failed commit is not retried (those entries are delivered again by the
/// shard's next owner). The bound of a shard this node lost is dropped: a commit fenced out
/// by its delivery epoch is tried again without it.
async fn record_bounds(store: &MessageStore, recorder: &mut Recorder, cancel: &CancellationToken) {
    let Recorder {
        queue,
        shards,
        unrecorded,
    } = recorder;
    let mut received = Vec::with_capacity(RANGES_PER_COMMIT);
    loop {
        // A recorder restarted with bounds left by the one before commits them at once.
        if unrecorded.is_empty() {
            if queue.recv_many(&mut received, RANGES_PER_COMMIT).await == 0 {
                return;
            }
            if received.len() < RANGES_PER_COMMIT && !cancel.is_cancelled() {
                cancel
                    .run_until_cancelled(tokio::time::sleep(RECORD_LINGER))
                    .await;
            }
        }
        while received.len() < RANGES_PER_COMMIT
            && let Ok(drained) = queue.try_recv()
        {
            received.push(drained);
        }
        for drained in received.drain(..) {
            let lease = drained.lease;
            let recorded = shards.entry(lease.shard).or_default();
            if let Some(bound) = recorded.take(drained) {
                unrecorded.insert(lease.shard, DeliveredBound { lease, bound });
            } else if unrecorded
                .get(&lease.shard)
                .is_some_and(|waiting| waiting.lease.epoch < recorded.epoch)
            {
                // The bound of a lease the ranges of a newer one came after: refused by its
                // fence, it would take the newer lease's ranges away with it (below).
                unrecorded.remove(&lease.shard);
            }
        }
        while !unrecorded.is_empty() {
            let bounds: Vec<DeliveredBound> = unrecorded.values().cloned().collect();
            let e = match store.advance_delivered(&bounds).await {
                Ok(()) => {
                    unrecorded.clear();
                    break;
                }
                Err(e) => e,
            };
            if let StoreError::FenceChanged { key } = &e
                && let Some(shard) = store.delivery_fence_shard(key)
            {
                tracing::info!(
                    shard,
                    "fanout shard moved: its delivered entries are left to its new owner"
                );
                unrecorded.remove(&shard);
                shards.remove(&shard);
                continue;
            }
            if cancel.is_cancelled() {
                tracing::warn!(error = %e, shards = bounds.len(), "recording fanout bounds failed while stopping; these entries are delivered again");
                unrecorded.clear();
                break;
            }
            tracing::warn!(error = %e, shards = bounds.len(), "recording fanout bounds failed; retrying");
            cancel.run_until_cancelled(tokio::time::sleep(RETRY)).await;
        }
    }
}

impl Fanout {
    /// Counts and drains `events` new events of `shard` if this node drains it, after
    /// `keep` did what it does with the shard's tail.
    fn told(&self, shard: u32, events: usize, keep: impl FnOnce()) {
        if !lock(&self.owned).contains_key(&shard) {
            return;
        }
        keep();
        let now = self.backlog.fetch_add(events as i64, Ordering::Relaxed) + events as i64;
        self.metrics.fanout_backlog.set(now.max(0));
        self.mark(shard);
    }
}

impl CommitListener for Fanout {
    /// Counts and drains `events` new events of `shard` if this node drains it, from its
    /// outbox (they are not listed); any other node's fanout finds them at its next round if
    /// nobody tells it.
    fn committed(&self, shard: u32, events: usize) {
        self.told(shard, events, || self.tails.drop_shard(shard));
    }

    /// As `committed`, keeping the entries in the shard's tail if it has one.
    fn committed_entries(&self, shard: u32, entries: Vec<ListedEntry>) {
        self.told(shard, entries.len(), || self.tails.listed(shard, entries));
    }

    fn keeps_entries(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_core::gateways::NoGateways;
    use courier_proto::{Body, Sender};
    use courier_store::embedded::EmbeddedEngine;
    use courier_store::{Append, HeadCache, NewConversation};
    use std::time::Instant;

    fn message(id: &str) -> Append {
        let sender = Sender {
            user: "alice".into(),
            device: "phone".into(),
        };
        Append {
            create: Some(NewConversation::direct("alice", "bob")),
            ..Append::message("d:1".into(), sender, id.into(), Body::Text(id.into()), None)
        }
    }

    fn config(node: &str, large_group_threshold: usize) -> FanoutConfig {
        FanoutConfig {
            workers: 2,
            large_group_threshold,
            ownership: Ownership {
                node: node.into(),
                lease: Duration::from_secs(30),
            },
            look_at_every_shard_each_round: true,
        }
    }

    async fn store(dir: &tempfile::TempDir, shards: u32) -> MessageStore {
        let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
        MessageStore::open(kv, b"", shards).await.unwrap()
    }

    async fn register(store: &MessageStore, node: &str) {
        let record = courier_store::nodes::NodeRecord {
            roles: vec![ROLE.into()],
            address: String::new(),
            lease_until_ms: now_ms() + 60_000,
            started_ms: now_ms(),
            connections: 0,
            ..courier_store::nodes::NodeRecord::default()
        };
        store.register_node(node, &record).await.unwrap();
    }

    async fn fanout_on(
        store: &MessageStore,
        node: &str,
        gateways: Arc<dyn Gateways>,
    ) -> Arc<Fanout> {
        let context = context(store, gateways, Arc::new(Metrics::new()));
        Fanout::new(context, config(node, 1)).await.unwrap()
    }

    /// Fanout's context on `store`: its gateways and metrics, a membership cache of its own.
    fn context(
        store: &MessageStore,
        gateways: Arc<dyn Gateways>,
        metrics: Arc<Metrics>,
    ) -> Context {
        Context {
            store: store.clone(),
            gateways,
            membership: Arc::new(MembershipCache::new(store.clone())),
            metrics,
        }
    }

    #[tokio::test]
    async fn fanout_nodes_split_the_shards_and_a_node_that_joins_gets_its_share() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 8).await;
        register(&store, "a").await;
        let a = fanout_on(&store, "a", Arc::new(NoGateways)).await;
        assert_eq!(
            a.owned_shards().len(),
            8,
            "alone, a node drains every shard"
        );

        register(&store, "b").await;
        let b = fanout_on(&store, "b", Arc::new(NoGateways)).await;
        assert!(b.owned_shards().is_empty(), "a's leases still run");
        a.keep_round().await;
        assert_eq!(
            a.owned_shards(),
            [0, 1, 2, 3],
            "a gives back what is beyond its share"
        );
        b.keep_round().await;
        assert_eq!(b.owned_shards(), [4, 5, 6, 7]);
        for shard in 0..8 {
            let owner = store
                .shard_owner(Duty::Delivery, shard)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(owner.node, if shard < 4 { "a" } else { "b" });
        }
        let sequencer = store.shard_owner(Duty::Sequencing, 0).await.unwrap();
        assert_eq!(
            sequencer, None,
            "delivery ownership leaves the sequencer's alone"
        );

        // A node that stops gives its shards back; the other takes them at its next round.
        assert_eq!(b.release().await.unwrap(), [4, 5, 6, 7]);
        store
            .register_node(
                "b",
                &courier_store::nodes::NodeRecord {
                    roles: vec![ROLE.into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        a.keep_round().await;
        assert_eq!(a.owned_shards().len(), 8);
    }

    #[tokio::test]
    async fn a_deposed_fanout_node_moves_no_bound_of_the_shard_it_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 4).await;
        let shard = one_message_waiting(&store).await;
        let entries = store.outbox(shard, None, 10).await.unwrap();
        let (key, _) = entries[0].clone();
        let old = store
            .acquire_shards(Duty::Delivery, "a", &[shard], 1, 0, 1_000)
            .await
            .unwrap()[0];
        // a's lease lapsed (paused, say): b takes the shard with a new delivery epoch.
        let new = store
            .acquire_shards(Duty::Delivery, "b", &[shard], 1, 5_000, 1_000)
            .await
            .unwrap()[0];
        assert_eq!(new.epoch, old.epoch + 1);
        let past = |lease| DeliveredBound {
            lease,
            bound: bound_after(&key),
        };
        let refused = store.advance_delivered(&[past(old)]).await.unwrap_err();
        let StoreError::FenceChanged { key: fence } = refused else {
            panic!("expected a fenced-out record, got {refused}");
        };
        assert_eq!(store.delivery_fence_shard(&fence), Some(shard));
        assert_eq!(
            store.outbox_lag(shard, 10).await.unwrap().entries,
            1,
            "nothing recorded"
        );
        store.advance_delivered(&[past(new)]).await.unwrap();
        assert_eq!(store.outbox_lag(shard, 10).await.unwrap().entries, 0);
    }

    /// A range drained after a large-group range waits for it: the bound moves over ranges in
    /// their order only.
    #[test]
    fn a_range_delivered_late_holds_the_bound_back() {
        let lease = ShardLease { shard: 3, epoch: 7 };
        let drained = |order, bound: &str| Drained {
            lease,
            order,
            bound: bound.as_bytes().to_vec(),
        };
        let mut recorded = Recorded::default();
        assert_eq!(recorded.take(drained(0, "a")), Some(b"a".to_vec()));
        // Range 1 went to the large-group worker; range 2 arrives first.
        assert_eq!(recorded.take(drained(2, "c")), None, "held back by range 1");
        assert_eq!(recorded.take(drained(1, "b")), Some(b"c".to_vec()));
        // A new lease (the shard taken again) starts its orders over.
        let taken_again = Drained {
            lease: ShardLease { shard: 3, epoch: 8 },
            order: 0,
            bound: b"d".to_vec(),
        };
        assert_eq!(recorded.take(taken_again), Some(b"d".to_vec()));
    }

    /// Gateways that panic at their first `panics` deliveries, refuse the next `failures`, then
    /// record what they take. When they refuse a batch they look a little later whether
    /// fanout's bound passed its events, and note those it did.
    struct FlakyGateways {
        store: MessageStore,
        panics: std::sync::atomic::AtomicUsize,
        failures: std::sync::atomic::AtomicUsize,
        taken: Mutex<Vec<String>>,
        passed_untaken: Mutex<Vec<String>>,
    }

    impl FlakyGateways {
        fn new(store: &MessageStore, panics: usize, failures: usize) -> Arc<Self> {
            Arc::new(Self {
                store: store.clone(),
                panics: panics.into(),
                failures: failures.into(),
                taken: Mutex::default(),
                passed_untaken: Mutex::default(),
            })
        }
    }

    #[async_trait::async_trait]
    impl Gateways for FlakyGateways {
        async fn deliver(&self, batch: Vec<(Event, Members)>) -> Result<(), DeliveryError> {
            if batch.is_empty() {
                return Ok(());
            }
            let take_one = |n: usize| n.checked_sub(1);
            if self
                .panics
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, take_one)
                .is_ok()
            {
                panic!("a bug in the gateways");
            }
            let failed = self
                .failures
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, take_one);
            if failed.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                for (event, _) in batch {
                    let shard = self.store.shard_of(&event.conversation_id);
                    let bound = self.store.delivered_bounds(&[shard]).await?.pop().flatten();
                    let waiting = self.store.outbox(shard, bound.as_deref(), 100).await?;
                    if !waiting
                        .iter()
                        .any(|(_, e)| e.server_msg_id == event.server_msg_id)
                    {
                        lock(&self.passed_untaken).push(event.server_msg_id.clone());
                    }
                }
                return Err(DeliveryError::Gateway {
                    gateway: "g".into(),
                    reason: "unreachable".into(),
                });
            }
            lock(&self.taken).extend(batch.iter().map(|(event, _)| event.server_msg_id.clone()));
            Ok(())
        }

        fn offer<'a>(
            &self,
            _: &[courier_core::gateways::Offer<'a>],
        ) -> courier_core::gateways::Refused<'a> {
            courier_core::gateways::Refused::new()
        }

        fn missed(&self, _recipients: &[String], _at: Option<(&str, u64)>) {}

        fn unlinked(&self, _: &str, _: &str) {}

        async fn connected_devices(&self, _: &str) -> Result<Vec<String>, StoreError> {
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn fanout_records_an_entry_only_once_the_gateways_took_it_on_both_paths() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 4).await;
        let seq = store
            .acquire_shards(
                Duty::Sequencing,
                "s",
                &[0, 1, 2, 3],
                usize::MAX,
                0,
                u64::MAX,
            )
            .await
            .unwrap();
        let lease_of = |conv: &str| seq[store.shard_of(conv) as usize];
        let mut heads = HeadCache::default();
        // With a threshold of 1, a note to self takes the common path, a 1:1 message (two
        // members) the large-group one.
        let note = Append {
            create: Some(NewConversation::direct("alice", "alice")),
            ..Append::message(
                "d:self".into(),
                Sender {
                    user: "alice".into(),
                    device: "phone".into(),
                },
                "note".into(),
                Body::Text("note".into()),
                None,
            )
        };
        store
            .append(lease_of("d:self"), &mut heads, &[note])
            .await
            .unwrap();
        store
            .append(lease_of("d:1"), &mut heads, &[message("direct")])
            .await
            .unwrap();

        let gateways = FlakyGateways::new(&store, 0, 4);
        let fanout = fanout_on(&store, "local", gateways.clone()).await;
        let loops = BackgroundLoops::new();
        fanout.start(&loops);
        for conv in ["d:self", "d:1"] {
            until_delivered(&store, store.shard_of(conv)).await;
        }
        let mut taken = lock(&gateways.taken).clone();
        taken.sort();
        taken.dedup();
        assert_eq!(taken.len(), 2, "both events were delivered: {taken:?}");
        let passed = lock(&gateways.passed_untaken).clone();
        assert!(
            passed.is_empty(),
            "recorded as delivered before the gateways took them: {passed:?}"
        );
    }

    /// `shard`'s sequencing lease, taken by a test writer.
    async fn sequencing_lease(store: &MessageStore, shard: u32) -> ShardLease {
        store
            .acquire_shards(Duty::Sequencing, "s", &[shard], usize::MAX, 0, u64::MAX)
            .await
            .unwrap()[0]
    }

    /// A message of "d:1" appended before fanout starts, and its shard.
    async fn one_message_waiting(store: &MessageStore) -> u32 {
        let shard = store.shard_of("d:1");
        let lease = sequencing_lease(store, shard).await;
        store
            .append(lease, &mut HeadCache::default(), &[message("a")])
            .await
            .unwrap();
        shard
    }

    #[tokio::test]
    async fn a_large_group_delivery_cut_short_by_a_panic_is_delivered_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 4).await;
        let shard = one_message_waiting(&store).await;
        let gateways = FlakyGateways::new(&store, 1, 0);
        // A threshold of 1: the 1:1 message (two members) takes the large-group path.
        let fanout = fanout_on(&store, "local", gateways.clone()).await;
        let loops = BackgroundLoops::new();
        fanout.start(&loops);
        until_delivered(&store, shard).await;
        assert_eq!(gateways.panics.load(Ordering::Relaxed), 0, "it panicked");
        assert_eq!(lock(&gateways.taken).len(), 1, "delivered after the panic");
    }

    #[tokio::test]
    async fn bounds_a_panicked_recorder_held_are_recorded_by_the_next() {
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let store = engine.store(4).await;
        let shard = one_message_waiting(&store).await;
        let context = context(&store, Arc::new(NoGateways), Arc::new(Metrics::new()));
        let fanout = Fanout::new(context, config("local", 1000)).await.unwrap();
        // The next commit is the recorder's first (the lease keeper's first round is far off).
        engine.before_next_commit(Box::pin(async { panic!("a bug in the store") }));
        let loops = BackgroundLoops::new();
        fanout.start(&loops);
        until_delivered(&store, shard).await;
        assert!(loops.given_up().is_none());
    }

    /// A recorded bound past every entry of its outbox (damage, or a hostile write) does not
    /// silence the shard: the drain starts below every entry the outbox holds, and the new
    /// entries are delivered. Taken as it was, every entry then committed lay below it and none
    /// was delivered live again (only catch-ups found them), whether the outbox held entries
    /// or was empty when the shard was taken.
    #[tokio::test]
    async fn a_recorded_bound_past_every_entry_does_not_silence_the_shard() {
        use courier_store::kv::{Batch, KvEngine};
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let store = engine.store(4).await;
        // "d:1" has an entry waiting; the other conversation's shard has an empty outbox.
        let waiting = one_message_waiting(&store).await;
        let other = (2..)
            .map(|i| format!("d:{i}"))
            .find(|conv| store.shard_of(conv) != waiting)
            .unwrap();
        let empty = store.shard_of(&other);
        let mut damage = Batch::new();
        for shard in [waiting, empty] {
            damage.set(
                store.keys().delivered_bound(shard),
                store.keys().outbox(shard).end,
            );
        }
        engine.commit(damage).await.unwrap();

        let gateways = FlakyGateways::new(&store, 0, 0);
        let context = context(&store, gateways.clone(), Arc::new(Metrics::new()));
        let fanout = Fanout::new(context, config("local", 1000)).await.unwrap();
        let loops = BackgroundLoops::new();
        fanout.start(&loops);
        let to_other = Append {
            conversation_id: other.clone(),
            ..message("c")
        };
        for (shard, append) in [(waiting, message("b")), (empty, to_other)] {
            let lease = sequencing_lease(&store, shard).await;
            store
                .append(lease, &mut HeadCache::default(), &[append])
                .await
                .unwrap();
            fanout.committed(shard, 1);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&gateways.taken).len() < 3 {
            assert!(
                Instant::now() < deadline,
                "delivered: {:?}",
                lock(&gateways.taken)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        until_delivered(&store, waiting).await;
        until_delivered(&store, empty).await;
    }

    /// Waits until fanout's bound of `shard` is past every entry of its outbox.
    async fn until_delivered(store: &MessageStore, shard: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.outbox_lag(shard, 1).await.unwrap().entries > 0 {
            assert!(Instant::now() < deadline, "the outbox was not drained");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// In one process, once a drain read a shard's outbox to its end, the entries its
    /// sequencer lists after each commit reach the gateways without being read back; entries
    /// told of without a list (another writer, an unknown outcome) or past the tails' bound are
    /// read from the outbox, and nothing is skipped or delivered out of order either way.
    #[tokio::test]
    async fn listed_entries_are_delivered_without_reading_the_outbox_back() {
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let store = engine.store(4).await;
        let shard = store.shard_of("d:1");
        let lease = sequencing_lease(&store, shard).await;
        let mut heads = HeadCache::default();
        store
            .append(lease, &mut heads, &[message("a")])
            .await
            .unwrap();
        let gateways = FlakyGateways::new(&store, 0, 0);
        let metrics = Arc::new(Metrics::new());
        let context = context(&store, gateways.clone(), metrics.clone());
        let one_process = FanoutConfig {
            look_at_every_shard_each_round: false,
            ..config("local", 1000)
        };
        let fanout = Fanout::new(context, one_process).await.unwrap();
        let loops = BackgroundLoops::new();
        fanout.start(&loops);
        let taken = |n: usize| {
            let gateways = gateways.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                while lock(&gateways.taken).len() < n {
                    assert!(Instant::now() < deadline, "not delivered");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let outbox = store.keys().outbox(shard);
        let outbox_reads = || engine.take_reads_within(&outbox);
        let pages_read = || {
            metrics
                .outbox_pages_read
                .get_or_create(&ReaderLabel { reader: "fanout" })
                .get()
        };
        taken(1).await;
        assert!(outbox_reads() > 0, "what was there before is read");
        let pages = pages_read();
        assert!(pages > 0);

        for id in ["b", "c"] {
            let appended = store
                .append_listed(lease, &mut heads, &[message(id)])
                .await
                .unwrap();
            fanout.committed_entries(shard, appended.outbox.unwrap());
        }
        taken(3).await;
        assert_eq!(outbox_reads(), 0, "listed entries are not read back");
        assert_eq!(pages_read(), pages);

        // Told of without a list: read from the outbox, then listed ones are taken again.
        store
            .append(lease, &mut heads, &[message("d")])
            .await
            .unwrap();
        fanout.committed(shard, 0);
        taken(4).await;
        assert!(outbox_reads() > 0);
        let pages = pages_read();
        let appended = store
            .append_listed(lease, &mut heads, &[message("e")])
            .await
            .unwrap();
        fanout.committed_entries(shard, appended.outbox.unwrap());
        taken(5).await;
        assert_eq!((outbox_reads(), pages_read()), (0, pages));

        // A listing that would take the tails past their bound drops the shard's tail.
        let mut listed = store
            .append_listed(lease, &mut heads, &[message("f")])
            .await
            .unwrap()
            .outbox
            .unwrap();
        listed[0].bytes = TAILS_MAX_BYTES + 1;
        fanout.committed_entries(shard, listed);
        taken(6).await;
        assert!(outbox_reads() > 0, "read from the outbox instead");
        assert!(pages_read() > pages);
        assert_eq!(fanout.tails.bytes(), 0);

        let events = store.events("d:1", 0, u64::MAX, 10).await.unwrap();
        let in_order: Vec<String> = events.into_iter().map(|e| e.server_msg_id).collect();
        assert_eq!(*lock(&gateways.taken), in_order);
    }

    /// A node that reads every page from the store (a cluster's, which keeps no tails) takes
    /// every entry of the rows a read brings: a commit of 1,000 entries, one row, is one read
    /// of the outbox, where pages of 256 entries read that row again for each page.
    #[tokio::test]
    async fn a_commit_of_many_entries_is_read_from_the_outbox_once() {
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let store = engine.store(4).await;
        let shard = store.shard_of("d:1");
        let lease = sequencing_lease(&store, shard).await;
        let ids: Vec<String> = (0..1000).map(|i| format!("m{i}")).collect();
        let batch: Vec<Append> = ids.iter().map(|id| message(id)).collect();
        store
            .append(lease, &mut HeadCache::default(), &batch)
            .await
            .unwrap();
        let outbox = store.keys().outbox(shard);
        let outbox_reads = || engine.take_reads_within(&outbox);
        outbox_reads();
        let gateways = FlakyGateways::new(&store, 0, 0);
        let context = context(&store, gateways.clone(), Arc::new(Metrics::new()));
        let fanout = Fanout::new(context, config("local", 1000)).await.unwrap();
        let loops = BackgroundLoops::new();
        fanout.start(&loops);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&gateways.taken).len() < ids.len() {
            assert!(Instant::now() < deadline, "not delivered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // The shard's first drain; a later round's drain may have read it again, empty.
        let reads = outbox_reads();
        assert!(
            (1..ids.len() / OUTBOX_PAGE).contains(&reads),
            "{reads} reads of the outbox"
        );
        let stored = store.events("d:1", 0, u64::MAX, 2000).await.unwrap();
        let in_order: Vec<String> = stored.into_iter().map(|e| e.server_msg_id).collect();
        assert_eq!(*lock(&gateways.taken), in_order);
    }

    /// An outbox row that does not decode (here an entry whose event is no event, and a row
    /// whose framing is damaged, the outbox's last), met in a page read from the store, is
    /// passed over: logged, counted, and fanout's bound recorded past it, so the shard goes on
    /// delivering the events after it (the drain failed and was retried for good: the shard
    /// delivered nothing more, and past `--outbox-lag-limit` its sends were refused).
    #[tokio::test]
    async fn an_outbox_row_that_does_not_decode_is_passed_over_and_the_shard_goes_on() {
        use courier_store::{Batch, KvEngine};
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let store = engine.store(4).await;
        let shard = store.shard_of("d:1");
        let lease = sequencing_lease(&store, shard).await;
        let mut heads = HeadCache::default();
        let damaged = |value: Vec<u8>| {
            let mut row = Batch::new();
            row.set_versionstamped_key(store.keys().outbox_entry(shard, 0), value);
            row
        };
        store
            .append(lease, &mut heads, &[message("a")])
            .await
            .unwrap();
        engine.commit(damaged(vec![0xff; 3])).await.unwrap();
        store
            .append(lease, &mut heads, &[message("b")])
            .await
            .unwrap();
        // The last row: no event after it moves the bound past it.
        engine.commit(damaged(vec![0, 0xff, 0xff])).await.unwrap();
        let outbox = store.keys().outbox(shard);
        let last_row = engine.range(outbox, 1, true).await.unwrap()[0].0.clone();

        let gateways = FlakyGateways::new(&store, 0, 0);
        let metrics = Arc::new(Metrics::new());
        let context = context(&store, gateways.clone(), metrics.clone());
        let fanout = Fanout::new(context, config("local", 1000)).await.unwrap();
        let loops = BackgroundLoops::new();
        fanout.start(&loops);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let bound = store.delivered_bounds(&[shard]).await.unwrap().pop();
            if bound.flatten().is_some_and(|bound| bound > last_row) {
                break;
            }
            assert!(Instant::now() < deadline, "the bound did not pass the rows");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let events = store.events("d:1", 0, u64::MAX, 10).await.unwrap();
        let in_order: Vec<String> = events.into_iter().map(|e| e.server_msg_id).collect();
        assert_eq!(in_order.len(), 2);
        assert_eq!(*lock(&gateways.taken), in_order);
        let passed_over = metrics
            .outbox_undecodable_entries
            .get_or_create(&ReaderLabel { reader: "fanout" })
            .get();
        assert_eq!(passed_over, 2);
        assert_eq!(store.outbox_lag(shard, 10).await.unwrap().entries, 0);
    }

    #[tokio::test]
    async fn entries_left_by_an_earlier_process_do_not_lower_the_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 4).await;
        let shard = store.shard_of("d:1");
        let lease = sequencing_lease(&store, shard).await;
        let mut heads = HeadCache::default();
        // Committed by a process that crashed before fanning them out.
        let left = [message("a"), message("b"), message("c")];
        store.append(lease, &mut heads, &left).await.unwrap();

        let metrics = Arc::new(Metrics::new());
        let context = context(&store, Arc::new(NoGateways), metrics.clone());
        let fanout = Fanout::new(context, config("local", 1000)).await.unwrap();
        let loops = BackgroundLoops::new();
        fanout.start(&loops);
        until_delivered(&store, shard).await;
        assert_eq!(fanout.backlog.load(Ordering::Relaxed), 0);

        // This process's own commit is counted, then drained back to zero.
        store
            .append(lease, &mut heads, &[message("d")])
            .await
            .unwrap();
        fanout.committed(shard, 1);
        until_delivered(&store, shard).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while fanout.backlog.load(Ordering::Relaxed) != 0 {
            assert!(Instant::now() < deadline, "the backlog did not return to 0");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(metrics.fanout_backlog.get(), 0);
    }

    /// Leases of `shard` for node a with a's ranges crossing them: a's first lease, then
    /// (after b held the shard between) a's current one.
    async fn two_leases_of_a(store: &MessageStore, shard: u32) -> (ShardLease, ShardLease) {
        let mut leases = Vec::new();
        for node in ["a", "b", "a"] {
            let lease = store
                .acquire_shards(Duty::Delivery, node, &[shard], 1, now_ms(), 60_000)
                .await
                .unwrap()[0];
            leases.push(lease);
            store
                .release_shards(Duty::Delivery, node, &[lease])
                .await
                .unwrap();
        }
        store
            .acquire_shards(Duty::Delivery, "a", &[shard], 1, now_ms(), 60_000)
            .await
            .unwrap();
        let current = ShardLease {
            shard,
            epoch: leases[2].epoch + 1,
        };
        (leases[0], current)
    }

    /// Runs the recorder over `ranges` (and what `state` kept of an earlier run), as a
    /// recorder restarted between two batches would; returns what it kept.
    async fn record(
        store: &MessageStore,
        ranges: Vec<(ShardLease, u64, &[u8])>,
        state: (HashMap<u32, Recorded>, BTreeMap<u32, DeliveredBound>),
    ) -> (HashMap<u32, Recorded>, BTreeMap<u32, DeliveredBound>) {
        let (sender, queue) = mpsc::channel(ranges.len().max(1));
        for (lease, order, bound) in ranges {
            let bound = bound.to_vec();
            sender
                .try_send(Drained {
                    lease,
                    order,
                    bound,
                })
                .unwrap();
        }
        drop(sender);
        let mut recorder = Recorder {
            queue,
            shards: state.0,
            unrecorded: state.1,
        };
        record_bounds(store, &mut recorder, &CancellationToken::new()).await;
        (recorder.shards, recorder.unrecorded)
    }

    /// A node that lost a shard and took it again may still hand the recorder a range of its
    /// earlier lease (a large-group event its worker delivered late) after ranges of the
    /// current one: that range is dropped, and the current lease's ranges are recorded in
    /// their order (they were held back for good: the shard's bound never moved again, and
    /// its senders were refused as behind once its outbox aged past the lag limit).
    #[tokio::test]
    async fn a_late_range_of_an_earlier_lease_holds_back_no_range_of_the_current_one() {
        let shard = 1;
        let bound = |store: MessageStore| async move {
            store
                .delivered_bounds(&[shard])
                .await
                .unwrap()
                .pop()
                .flatten()
        };

        // The earlier lease's range comes after the current lease's first.
        let dir = tempfile::tempdir().unwrap();
        let one = store(&dir, 4).await;
        let (earlier, current) = two_leases_of_a(&one, shard).await;
        let ranges = vec![
            (current, 0, &b"n0"[..]),
            (earlier, 1, b"o1"),
            (current, 1, b"n1"),
        ];
        let kept = record(&one, ranges, Default::default()).await;
        assert_eq!(bound(one.clone()).await.as_deref(), Some(&b"n1"[..]));
        // And the current lease's next ones go on.
        record(&one, vec![(current, 2, b"n2"), (current, 3, b"n3")], kept).await;
        assert_eq!(bound(one.clone()).await.as_deref(), Some(&b"n3"[..]));

        // The earlier lease's bound waits to be recorded when the current lease's second range
        // comes, ahead of its first (a large-group event), which comes after a commit.
        let dir = tempfile::tempdir().unwrap();
        let two = store(&dir, 4).await;
        let (earlier, current) = two_leases_of_a(&two, shard).await;
        let ranges = vec![(earlier, 0, &b"o0"[..]), (current, 1, b"n1")];
        let kept = record(&two, ranges, Default::default()).await;
        record(&two, vec![(current, 0, b"n0")], kept).await;
        assert_eq!(
            bound(two.clone()).await.as_deref(),
            Some(&b"n1"[..]),
            "the current lease's second range is recorded"
        );
    }
}
