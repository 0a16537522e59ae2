//! Retention: a background job that clears events once every active member device has them
//! delivered and they are older than the retention window, then moves the conversation's
//! floor up. Trims go through the sequencer, so they are fenced by the shard's epoch like
//! every other shard write. A device unseen for `device_inactive_after` no longer holds events
//! back; when it returns with a cursor below the floor it gets a `trimmed` frame first.

use crate::fanout::now_ms;
use crate::metrics::Metrics;
use crate::sequencer::{Sequencer, SequencerError};
use courier_proto::{Body, EventPayload};
use courier_store::{MessageStore, StoreError};
use std::sync::Arc;
use std::time::Duration;

/// Conversations read per step of a pass.
const PAGE: usize = 256;

#[derive(Debug, Clone, Copy)]
pub struct RetentionPolicy {
    /// Events younger than this are kept, delivered or not.
    pub window: Duration,
    /// A device unseen for this long stops counting as active.
    pub device_inactive_after: Duration,
    /// Time between passes.
    pub interval: Duration,
}

pub struct Retention {
    store: MessageStore,
    sequencer: Arc<dyn Sequencer>,
    policy: RetentionPolicy,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sequencer(#[from] SequencerError),
}

impl Retention {
    pub fn new(
        store: MessageStore,
        sequencer: Arc<dyn Sequencer>,
        policy: RetentionPolicy,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            sequencer,
            policy,
            metrics,
        })
    }

    /// Runs a pass every `interval`, forever.
    pub fn start(self: &Arc<Self>) {
        let retention = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(retention.policy.interval).await;
                match retention.run_once().await {
                    Ok(0) => {}
                    Ok(cleared) => tracing::info!(cleared, "retention pass"),
                    Err(e) => tracing::warn!(error = %e, "retention pass failed; will retry"),
                }
            }
        });
    }

    /// One pass over every conversation; returns the number of events cleared.
    pub async fn run_once(&self) -> Result<u64, RetentionError> {
        let mut cleared = 0;
        let mut after: Option<String> = None;
        loop {
            let page = self.store.conversation_ids(after.as_deref(), PAGE).await?;
            let Some(last) = page.last().cloned() else {
                return Ok(cleared);
            };
            for conv in &page {
                cleared += self.trim_conversation(conv).await?;
            }
            after = Some(last);
        }
    }

    async fn trim_conversation(&self, conv: &str) -> Result<u64, RetentionError> {
        let floor = self.store.floor(conv).await?;
        let head = self.store.head(conv).await?;
        if head < floor {
            return Ok(0);
        }
        let now = now_ms();
        let delivered = self.delivered_everywhere(conv, head, now).await?;
        let cutoff = now.saturating_sub(self.policy.window.as_millis() as u64);
        let mut old_enough = floor - 1;
        let mut media = Vec::new();
        'scan: while old_enough < delivered {
            let events = self.store.events(conv, old_enough, PAGE).await?;
            if events.is_empty() {
                break;
            }
            for event in events {
                if event.ts_ms > cutoff || event.seq > delivered {
                    break 'scan;
                }
                old_enough = event.seq;
                if let EventPayload::Message {
                    body: Some(Body::Media(m)),
                    ..
                } = event.payload
                {
                    media.push((m.media_id, event.seq));
                }
            }
        }
        let new_floor = old_enough.min(delivered) + 1;
        if new_floor <= floor {
            return Ok(0);
        }
        let cleared = self.sequencer.trim(conv, new_floor).await?;
        // Media follows its messages: unreferenced, it is swept after its TTL.
        if !media.is_empty() {
            self.store.clear_media_references(conv, &media).await?;
        }
        self.metrics.retention_cleared.inc_by(cleared);
        Ok(cleared)
    }

    /// The highest seq every active device of every member has acknowledged as delivered. A
    /// former member's devices count until they have everything up to its removal.
    async fn delivered_everywhere(
        &self,
        conv: &str,
        head: u64,
        now: u64,
    ) -> Result<u64, StoreError> {
        let active_since = now.saturating_sub(self.policy.device_inactive_after.as_millis() as u64);
        let mut lowest = head;
        for (user, member) in self.store.member_records(conv).await? {
            for (device, record) in self.store.devices(&user).await? {
                if record.unlinked_ms == 0 && record.last_seen_ms >= active_since {
                    let cursor = self.store.device_cursor(&user, &device, conv).await?;
                    if member.is_member() || cursor < member.version() {
                        lowest = lowest.min(cursor);
                    }
                }
            }
        }
        Ok(lowest)
    }
}
