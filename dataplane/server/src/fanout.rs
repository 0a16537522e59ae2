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

use crate::membership::{Members, MembershipCache};
use crate::metrics::Metrics;
use crate::routes::{Delivery, Handoff, Routes, SharedEvent};
use crate::sequencer::CommitListener;
use courier_store::{MessageStore, StoreError};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// Events queued for the large-group path before fanout waits.
const LARGE_GROUP_QUEUE: usize = 1024;

/// Outbox entries read per step of one shard.
const OUTBOX_PAGE: usize = 256;

struct Worker {
    dirty: Mutex<BTreeSet<u32>>,
    wake: Notify,
}

type LargeDelivery = (Arc<SharedEvent>, Members);

/// The last key a consumer took from each shard's queue (in memory: after a restart the first
/// read starts at the head of the queue).
#[derive(Default)]
pub struct ShardCursors(Mutex<std::collections::HashMap<u32, Vec<u8>>>);

impl ShardCursors {
    pub fn get(&self, shard: u32) -> Option<Vec<u8>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shard)
            .cloned()
    }

    pub fn set(&self, shard: u32, last: Vec<u8>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(shard, last);
    }
}

pub struct Fanout {
    store: MessageStore,
    routes: Arc<Routes>,
    membership: Arc<MembershipCache>,
    metrics: Arc<Metrics>,
    workers: Vec<Worker>,
    backlog: AtomicI64,
    cursors: ShardCursors,
    large_group_threshold: usize,
    large: mpsc::Sender<LargeDelivery>,
    large_queue: Mutex<Option<mpsc::Receiver<LargeDelivery>>>,
}

impl Fanout {
    pub fn new(
        store: MessageStore,
        routes: Arc<Routes>,
        membership: Arc<MembershipCache>,
        metrics: Arc<Metrics>,
        workers: usize,
        large_group_threshold: usize,
    ) -> Arc<Self> {
        let (large, large_queue) = mpsc::channel(LARGE_GROUP_QUEUE);
        let workers = (0..workers.max(1))
            .map(|_| Worker {
                dirty: Mutex::new(BTreeSet::new()),
                wake: Notify::new(),
            })
            .collect();
        Arc::new(Self {
            store,
            routes,
            membership,
            metrics,
            workers,
            backlog: AtomicI64::new(0),
            cursors: ShardCursors::default(),
            large_group_threshold,
            large,
            large_queue: Mutex::new(Some(large_queue)),
        })
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
                    fanout.hand_off(&event, &recipients);
                }
            });
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
            let count = entries.len();
            for (_, event) in entries {
                self.deliver(event).await?;
            }
            self.store.clear_outbox(&first, &last).await?;
            self.cursors.set(shard, last);
            let left = self.backlog.fetch_sub(count as i64, Ordering::Relaxed) - count as i64;
            self.metrics.fanout_backlog.set(left.max(0));
        }
    }

    async fn deliver(&self, event: courier_proto::Event) -> Result<(), StoreError> {
        let recipients = self.membership.recipients(&event).await?;
        let shared = SharedEvent::new(event);
        if recipients.len() > self.large_group_threshold {
            self.metrics.large_group_queue.inc();
            // The receiver lives as long as the process; a send error cannot happen.
            let _ = self.large.send((shared, recipients)).await;
            return Ok(());
        }
        self.hand_off(&shared, &recipients);
        Ok(())
    }

    /// Hands an event to the connections of its recipients, except the sending device.
    fn hand_off(&self, shared: &Arc<SharedEvent>, recipients: &Members) {
        let lag = now_ms().saturating_sub(shared.event.ts_ms) as f64 / 1000.0;
        let sender = &shared.event.sender;
        for member in recipients.iter() {
            for connection in self.routes.connections(member) {
                if *member == sender.user && connection.device == sender.device {
                    continue;
                }
                match connection.deliver(Delivery::Event(shared.clone())) {
                    Handoff::Lagged => {
                        self.metrics.lagged_deliveries.inc();
                    }
                    Handoff::Kicked => {
                        self.metrics.slow_consumer_disconnects.inc();
                    }
                    Handoff::Queued | Handoff::Gone => {}
                }
                self.metrics.delivery_lag.observe(lag);
            }
        }
    }
}

impl CommitListener for Fanout {
    fn committed(&self, shard: u32, events: usize) {
        let now = self.backlog.fetch_add(events as i64, Ordering::Relaxed) + events as i64;
        self.metrics.fanout_backlog.set(now.max(0));
        self.mark(shard);
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
