//! The fanout role (delivery): tails each shard's outbox in commit order and hands every
//! event to the connected devices of the conversation's members, except the sending device
//! (it got `sent`). Messages are stored once per conversation (fanout-on-read): nothing is
//! written per recipient. Delivery is at-least-once: an outbox entry is cleared only after its
//! events were handed off, and devices that miss a live event catch up from their cursor.
//!
//! Shards are split over a fixed number of workers (`shard % workers`), so one shard is
//! always drained by one worker, in order. Recipients come from the [`MembershipCache`], kept
//! in step with each conversation's order. Events of groups larger than the large-group
//! threshold take a slow path: their own bounded queue and worker, so a huge group cannot
//! starve 1:1 traffic; when that queue is full the shard waits (nothing is dropped). A delivery
//! to the gateway is one call carrying the event and its recipients; connections reorder
//! nothing, they skip what they have and fill gaps from the store.
//!
//! **Clearing.** Handed-off outbox entries are cleared by one background task, which takes
//! the ranges of every shard queued at that moment into one commit. A worker does not wait
//! for that commit (it already reads after its in-memory cursor), so a drain costs no commit
//! of its own: with many busy conversations (one outbox entry per shard per drain) a commit per
//! drain would bound delivery at a few thousand events a second. The queue holds
//! [`CLEAR_QUEUE`] ranges; when it is full, workers wait for it. A failed clear is retried;
//! a crash before it only delivers those entries again at start-up (at-least-once).
//!
//! **Loops and their failures.** The workers, the large-group worker and the clearer are loops
//! owned by the node's [`BackgroundLoops`]. Each is restarted if it panics: a worker's state
//! (its dirty shards, the shard cursors) lives in [`Fanout`] and a restarted worker rescans all
//! its shards from their cursors, so what it was delivering is delivered again (connections
//! skip what they have); the two queues' receivers are kept in [`Fanout`] and taken up again,
//! and what the failed run held (one large-group event, a batch of ranges to clear) is lost:
//! the event is read from the store by the connections that see the gap, the ranges are
//! delivered again at the next start. At shutdown the workers stop at once (connections have
//! drained by then), and the clearer stops last: it clears everything the workers queued,
//! and ends when the last worker is gone.
//!
//! **Backlog.** `courier_fanout_backlog_events` (and the send backpressure built on it) counts
//! the events this process committed and has not yet handed off: the commit listener adds,
//! the drain subtracts. Entries an earlier process left in the outbox (a crash between commit
//! and fanout) were never added, so the drain does not subtract them: the newest outbox key of
//! each shard is read when the fanout is built, before this process can commit, and entries up
//! to it are delivered without being counted.

use courier_core::clock::now_ms;
use courier_core::gateways::Gateways;
use courier_core::loops::{BackgroundLoops, CancellationToken};
use courier_core::membership::{Members, MembershipCache};
use courier_core::metrics::Metrics;
use courier_core::sequencing::CommitListener;
use courier_core::shard_cursors::ShardCursors;
use courier_store::{MessageStore, StoreError};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// Events queued for the large-group path before fanout waits.
const LARGE_GROUP_QUEUE: usize = 1024;

/// Outbox entries read per step of one shard.
const OUTBOX_PAGE: usize = 256;

/// Handed-off outbox ranges waiting to be cleared before workers wait.
const CLEAR_QUEUE: usize = 4096;

/// Most ranges cleared in one commit.
const CLEARS_PER_COMMIT: usize = 1024;

/// Wait before a failed clear is tried again.
const CLEAR_RETRY: Duration = Duration::from_millis(100);

/// Outbox entries `first..=last` of one shard.
type OutboxRange = (Vec<u8>, Vec<u8>);

struct Worker {
    dirty: Mutex<BTreeSet<u32>>,
    wake: Notify,
}

type LargeDelivery = (courier_proto::Event, Members);

/// What a worker hands off: large-group events to their worker, drained ranges to the clearer.
/// Only the workers hold these senders, so each queue closes once the last worker is gone.
#[derive(Clone)]
struct Handoffs {
    large: mpsc::Sender<LargeDelivery>,
    clears: mpsc::Sender<OutboxRange>,
}

pub struct Fanout {
    store: MessageStore,
    gateways: Arc<dyn Gateways>,
    membership: Arc<MembershipCache>,
    metrics: Arc<Metrics>,
    workers: Vec<Worker>,
    backlog: AtomicI64,
    /// Per shard, the newest outbox key written before this process started (not counted in
    /// `backlog`).
    inherited: HashMap<u32, Vec<u8>>,
    cursors: ShardCursors,
    large_group_threshold: usize,
    /// The senders of the two queues below, until [`Fanout::start`] hands them to the workers.
    handoffs: Mutex<Option<Handoffs>>,
    /// Large-group events waiting for their worker (held by it while it runs).
    large_queue: Arc<tokio::sync::Mutex<mpsc::Receiver<LargeDelivery>>>,
    /// Drained outbox ranges waiting to be cleared (held by the clearer while it runs).
    clear_queue: Arc<tokio::sync::Mutex<mpsc::Receiver<OutboxRange>>>,
}

impl Fanout {
    /// Builds the fanout and notes what earlier processes left in the outbox. Build it before
    /// the sequencer that reports commits to it.
    pub async fn new(
        store: MessageStore,
        gateways: Arc<dyn Gateways>,
        membership: Arc<MembershipCache>,
        metrics: Arc<Metrics>,
        workers: usize,
        large_group_threshold: usize,
    ) -> Result<Arc<Self>, StoreError> {
        let mut inherited = HashMap::new();
        for shard in 0..store.shard_count() {
            if let Some(last) = store.last_outbox_key(shard).await? {
                inherited.insert(shard, last);
            }
        }
        let (large, large_queue) = mpsc::channel(LARGE_GROUP_QUEUE);
        let (clears, clear_queue) = mpsc::channel(CLEAR_QUEUE);
        let workers = (0..workers.max(1))
            .map(|_| Worker {
                dirty: Mutex::new(BTreeSet::new()),
                wake: Notify::new(),
            })
            .collect();
        Ok(Arc::new(Self {
            store,
            gateways,
            membership,
            metrics,
            workers,
            backlog: AtomicI64::new(0),
            inherited,
            cursors: ShardCursors::default(),
            large_group_threshold,
            handoffs: Mutex::new(Some(Handoffs { large, clears })),
            large_queue: Arc::new(tokio::sync::Mutex::new(large_queue)),
            clear_queue: Arc::new(tokio::sync::Mutex::new(clear_queue)),
        }))
    }

    /// Starts the workers, the large-group worker and the clearer as loops of `loops` (once;
    /// later calls do nothing). Each worker scans all its shards first (and again after a
    /// restart): entries left by a crash between commit and fanout are delivered now.
    pub fn start(self: &Arc<Self>, loops: &BackgroundLoops) {
        let Some(handoffs) = self
            .handoffs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        for index in 0..self.workers.len() {
            let (fanout, handoffs) = (self.clone(), handoffs.clone());
            loops.spawn(format!("fanout worker {index}"), move |cancel| {
                let (fanout, handoffs) = (fanout.clone(), handoffs.clone());
                async move {
                    let shards = fanout.store.shard_count();
                    (index as u32..shards)
                        .step_by(fanout.workers.len())
                        .for_each(|shard| fanout.mark(shard));
                    cancel
                        .run_until_cancelled(fanout.run(index, &handoffs))
                        .await;
                }
            });
        }
        drop(handoffs);
        let fanout = self.clone();
        loops.spawn("fanout large-group worker", move |cancel| {
            let fanout = fanout.clone();
            async move {
                let mut queue = fanout.large_queue.lock().await;
                while let Some(Some((event, recipients))) =
                    cancel.run_until_cancelled(queue.recv()).await
                {
                    fanout.metrics.large_group_queue.dec();
                    fanout.gateways.deliver(event, &recipients);
                }
            }
        });
        let (store, queue) = (self.store.clone(), self.clear_queue.clone());
        loops.spawn("fanout outbox clearer", move |cancel| {
            let (store, queue) = (store.clone(), queue.clone());
            async move {
                let mut queue = queue.lock().await;
                clear_outboxes(&store, &mut queue, &cancel).await;
            }
        });
    }

    fn mark(&self, shard: u32) {
        let worker = &self.workers[shard as usize % self.workers.len()];
        worker
            .dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(shard);
        worker.wake.notify_one();
    }

    async fn run(&self, index: usize, handoffs: &Handoffs) {
        let worker = &self.workers[index];
        loop {
            let next = worker
                .dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_first();
            match next {
                Some(shard) => {
                    if let Err(e) = self.drain(shard, handoffs).await {
                        tracing::error!(shard, error = %e, "fanout failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        self.mark(shard);
                    }
                }
                None => worker.wake.notified().await,
            }
        }
    }

    /// Delivers and clears the outbox of `shard` until it is empty.
    async fn drain(&self, shard: u32, handoffs: &Handoffs) -> Result<(), StoreError> {
        loop {
            let after = self.cursors.get(shard);
            let entries = self
                .store
                .outbox(shard, after.as_deref(), OUTBOX_PAGE)
                .await?;
            let (Some((first, _)), Some((last, _))) = (entries.first(), entries.last()) else {
                return Ok(());
            };
            let (first, last) = (first.clone(), last.clone());
            let counted = match self.inherited.get(&shard) {
                Some(inherited) => entries.iter().filter(|(key, _)| key > inherited).count(),
                None => entries.len(),
            } as i64;
            let now = now_ms();
            for (_, event) in entries {
                let lag = now.saturating_sub(event.ts_ms) as f64 / 1000.0;
                self.metrics.stages.outbox_read.observe(lag);
                self.deliver(event, handoffs).await?;
            }
            self.cursors.set(shard, last.clone());
            // The receiver is kept in `self`: a send error cannot happen.
            let _ = handoffs.clears.send((first, last)).await;
            let left = self.backlog.fetch_sub(counted, Ordering::Relaxed) - counted;
            // Below zero only for a moment: the drain can read an entry before the sequencer
            // has reported its commit.
            self.metrics.fanout_backlog.set(left.max(0));
        }
    }

    async fn deliver(
        &self,
        event: courier_proto::Event,
        handoffs: &Handoffs,
    ) -> Result<(), StoreError> {
        let recipients = self.membership.recipients(&event).await?;
        if recipients.len() > self.large_group_threshold {
            self.metrics.large_group_queue.inc();
            // The receiver is kept in `self`: a send error cannot happen.
            let _ = handoffs.large.send((event, recipients)).await;
            return Ok(());
        }
        self.gateways.deliver(event, &recipients);
        Ok(())
    }
}

/// Clears handed-off outbox ranges, all those queued at the moment in one commit, until the
/// queue closes (the last worker is gone). Cancellation does not stop it, so that what the
/// workers queued before they stopped is cleared; once cancelled, a failed clear is not retried
/// (those entries are delivered again at the next start).
async fn clear_outboxes(
    store: &MessageStore,
    queue: &mut mpsc::Receiver<OutboxRange>,
    cancel: &CancellationToken,
) {
    let mut ranges = Vec::with_capacity(CLEARS_PER_COMMIT);
    while queue.recv_many(&mut ranges, CLEARS_PER_COMMIT).await > 0 {
        while let Err(e) = store.clear_outbox(&ranges).await {
            if cancel.is_cancelled() {
                tracing::warn!(error = %e, ranges = ranges.len(), "outbox clear failed while stopping; these entries are delivered again at the next start");
                break;
            }
            tracing::warn!(error = %e, ranges = ranges.len(), "outbox clear failed; retrying");
            cancel
                .run_until_cancelled(tokio::time::sleep(CLEAR_RETRY))
                .await;
        }
        ranges.clear();
    }
}

impl CommitListener for Fanout {
    fn committed(&self, shard: u32, events: usize) {
        let now = self.backlog.fetch_add(events as i64, Ordering::Relaxed) + events as i64;
        self.metrics.fanout_backlog.set(now.max(0));
        self.mark(shard);
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

    async fn until_outbox_empty(store: &MessageStore, shard: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !store.outbox(shard, None, 1).await.unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the outbox was not drained");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn entries_left_by_an_earlier_process_do_not_lower_the_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
        let store = MessageStore::open(kv, b"", 4).await.unwrap();
        let shard = store.shard_of("d:1");
        let lease = store
            .acquire_shards("test", &[shard], 0, u64::MAX)
            .await
            .unwrap()[0];
        let mut heads = HeadCache::default();
        // Committed by a process that crashed before fanning them out.
        let left = [message("a"), message("b"), message("c")];
        store.append(lease, &mut heads, &left).await.unwrap();

        let metrics = Arc::new(Metrics::new());
        let fanout = Fanout::new(
            store.clone(),
            Arc::new(NoGateways),
            Arc::new(MembershipCache::new(store.clone())),
            metrics.clone(),
            1,
            1000,
        )
        .await
        .unwrap();
        let loops = BackgroundLoops::new();
        fanout.start(&loops);
        until_outbox_empty(&store, shard).await;
        assert_eq!(fanout.backlog.load(Ordering::Relaxed), 0);

        // This process's own commit is counted, then drained back to zero.
        store
            .append(lease, &mut heads, &[message("d")])
            .await
            .unwrap();
        fanout.committed(shard, 1);
        until_outbox_empty(&store, shard).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while fanout.backlog.load(Ordering::Relaxed) != 0 {
            assert!(Instant::now() < deadline, "the backlog did not return to 0");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(metrics.fanout_backlog.get(), 0);
    }
}
