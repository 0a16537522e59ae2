//! The fanout role (delivery): tails each shard's outbox in commit order and hands every
//! event to the connected devices of the conversation's members, except the sending device
//! (it got `sent`). Messages are stored once per conversation (fanout-on-read): nothing is
//! written per recipient. Delivery is at-least-once: an outbox entry is cleared only after its
//! events were handed off, and devices that miss a live event catch up from their cursor.
//!
//! Shards are split over a fixed number of workers (`shard % workers`), so one shard is
//! always drained by one worker, in order.

use crate::metrics::Metrics;
use crate::routes::{Delivery, Handoff, Routes, SharedEvent};
use crate::sequencer::CommitListener;
use courier_store::MessageStore;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Outbox entries read per step of one shard.
const OUTBOX_PAGE: usize = 256;

struct Worker {
    dirty: Mutex<BTreeSet<u32>>,
    wake: Notify,
}

pub struct Fanout {
    store: MessageStore,
    routes: Arc<Routes>,
    metrics: Arc<Metrics>,
    workers: Vec<Worker>,
    backlog: AtomicI64,
}

impl Fanout {
    pub fn new(
        store: MessageStore,
        routes: Arc<Routes>,
        metrics: Arc<Metrics>,
        workers: usize,
    ) -> Arc<Self> {
        let workers = (0..workers.max(1))
            .map(|_| Worker {
                dirty: Mutex::new(BTreeSet::new()),
                wake: Notify::new(),
            })
            .collect();
        Arc::new(Self {
            store,
            routes,
            metrics,
            workers,
            backlog: AtomicI64::new(0),
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
    async fn drain(&self, shard: u32) -> Result<(), courier_store::StoreError> {
        loop {
            let entries = self.store.outbox(shard, OUTBOX_PAGE).await?;
            let Some((last, _)) = entries.last() else {
                return Ok(());
            };
            let last = last.clone();
            let count = entries.len();
            for (_, event) in entries {
                self.deliver(event).await?;
            }
            self.store.clear_outbox(shard, &last).await?;
            let left = self.backlog.fetch_sub(count as i64, Ordering::Relaxed) - count as i64;
            self.metrics.fanout_backlog.set(left.max(0));
        }
    }

    async fn deliver(&self, event: courier_proto::Event) -> Result<(), courier_store::StoreError> {
        let members = self.store.members(&event.conversation_id).await?;
        let lag = now_ms().saturating_sub(event.ts_ms) as f64 / 1000.0;
        let shared = SharedEvent::new(event);
        let sender = &shared.event.sender;
        for member in members {
            for connection in self.routes.connections(&member) {
                if member == sender.user && connection.device == sender.device {
                    continue;
                }
                if connection.deliver(Delivery::Event(shared.clone())) == Handoff::Kicked {
                    self.metrics.slow_consumer_disconnects.inc();
                }
                self.metrics.delivery_lag.observe(lag);
            }
        }
        Ok(())
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
