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
//! **Backlog.** `courier_fanout_backlog_events` (and the send backpressure built on it) counts
//! the events this process committed and has not yet handed off: the commit listener adds,
//! the drain subtracts. Entries an earlier process left in the outbox (a crash between commit
//! and fanout) were never added, so the drain does not subtract them: the newest outbox key of
//! each shard is read when the fanout is built, before this process can commit, and entries up
//! to it are delivered without being counted.

use courier_core::clock::now_ms;
use courier_core::gateways::Gateways;
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
    large: mpsc::Sender<LargeDelivery>,
    large_queue: Mutex<Option<mpsc::Receiver<LargeDelivery>>>,
    clears: mpsc::Sender<OutboxRange>,
    clear_queue: Mutex<Option<mpsc::Receiver<OutboxRange>>>,
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
            large,
            large_queue: Mutex::new(Some(large_queue)),
            clears,
            clear_queue: Mutex::new(Some(clear_queue)),
        }))
    }

    /// Starts the workers. Every shard is scanned once first: entries left by a crash between
    /// commit and fanout are delivered now.
    pub fn start(self: &Arc<Self>) {
        for shard in 0..self.store.shard_count() {
            self.mark(shard);
        }
        for index in 0..self.workers.len() {
            let fanout = self.clone();
            tokio::spawn(async move { fanout.run(index).await });
        }
        let queue = self
            .large_queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut queue) = queue {
            let fanout = self.clone();
            tokio::spawn(async move {
                while let Some((event, recipients)) = queue.recv().await {
                    fanout.metrics.large_group_queue.dec();
                    fanout.gateways.deliver(event, &recipients);
                }
            });
        }
        let clears = self
            .clear_queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(clears) = clears {
            tokio::spawn(clear_outboxes(self.store.clone(), clears));
        }
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

    async fn run(&self, index: usize) {
        let worker = &self.workers[index];
        loop {
            let next = worker
                .dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_first();
            match next {
                Some(shard) => {
                    if let Err(e) = self.drain(shard).await {
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
    async fn drain(&self, shard: u32) -> Result<(), StoreError> {
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
                self.deliver(event).await?;
            }
            self.cursors.set(shard, last.clone());
            // The receiver lives as long as the process; a send error cannot happen.
            let _ = self.clears.send((first, last)).await;
            let left = self.backlog.fetch_sub(counted, Ordering::Relaxed) - counted;
            // Below zero only for a moment: the drain can read an entry before the sequencer
            // has reported its commit.
            self.metrics.fanout_backlog.set(left.max(0));
        }
    }

    async fn deliver(&self, event: courier_proto::Event) -> Result<(), StoreError> {
        let recipients = self.membership.recipients(&event).await?;
        if recipients.len() > self.large_group_threshold {
            self.metrics.large_group_queue.inc();
            // The receiver lives as long as the process; a send error cannot happen.
            let _ = self.large.send((event, recipients)).await;
            return Ok(());
        }
        self.gateways.deliver(event, &recipients);
        Ok(())
    }
}

/// Clears handed-off outbox ranges, all those queued at the moment in one commit, until the
/// fanout is gone.
async fn clear_outboxes(store: MessageStore, mut queue: mpsc::Receiver<OutboxRange>) {
    let mut ranges = Vec::with_capacity(CLEARS_PER_COMMIT);
    while queue.recv_many(&mut ranges, CLEARS_PER_COMMIT).await > 0 {
        while let Err(e) = store.clear_outbox(&ranges).await {
            tracing::warn!(error = %e, ranges = ranges.len(), "outbox clear failed; retrying");
            tokio::time::sleep(CLEAR_RETRY).await;
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
        fanout.start();
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
