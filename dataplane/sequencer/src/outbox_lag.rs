//! Backpressure from the outbox lag, kept by the owner of each shard.
//!
//! **Role.** A message committed to a shard waits in the shard's outbox until fanout has
//! handed it to the gateways. When fanout falls behind on a shard (overloaded, paused, dead
//! until another fanout node takes its shards), the shard's sequencer refuses new messages to
//! it ([`SequencerError::DeliveryBehind`], which a client sees as `unavailable` with
//! `retry_after_ms`: it retries with the same `client_msg_id`) instead of queueing them without
//! bound. The measure is read from the store, so it holds whichever node runs fanout, and
//! whether or not that node is alive.
//!
//! **The rule: age, not count.** A shard is *behind* when the oldest entry waiting in its
//! outbox was committed more than the limit ago (`--outbox-lag-limit`). Age is what a user
//! feels (how late a message arrives), it means the same for a quiet shard and a busy one
//! (a fanout that keeps up holds a busy shard's page of a few hundred entries for a few
//! milliseconds), and it costs one entry to read, where a count would cost as many entries as
//! it counts. The age is the watching node's clock minus the `ts_ms` the committing sequencer
//! wrote: clock skew between nodes shifts it by the skew.
//!
//! **Cost.** One loop per sequencer node ([`crate::LocalSequencer::watch_outboxes`]), a round
//! every [`OUTBOX_LAG_ROUND`]. A round reads, for each owned shard that may hold entries (it
//! had entries at the last round, had events committed here since, or was just taken), its
//! oldest entry fanout has not delivered: fanout's bound in the outbox, then a range read of
//! one row (a commit's entries, decision 0008) from there
//! (`MessageStore::oldest_outbox_entries`, 64 shards per engine call, one call after the
//! other). Entries below the bound wait only for the push notifier, which clears them
//! (decision 0006): a read from the bound steps over no cleared entry (on the embedded engine
//! a tombstone until a compaction). An idle node reads nothing; a node whose every shard is
//! busy reads one bound and one row per shard. The path of an append reads
//! one flag in memory (the last round's verdict).
//!
//! **Invariants.** Only this node commits to the outboxes of the shards it owns, so a shard
//! found with nothing waiting stays so until this node commits to it: the commit marks it to
//! be read.
//! A shard just taken (from a dead or moved owner, maybe with an old outbox) is read at the
//! next round and accepts until then. A shard this node no longer owns answers `ShardMoved`,
//! never `DeliveryBehind`, even if a round that read it as it moved left it marked behind (so
//! that chat nodes look for its new owner). Only messages are refused: membership changes and
//! deletes are rare and are an admin's or a user's deliberate act; trims clear, never add.
//!
//! **Failure policy.** A round whose read fails is logged; the verdicts of the last round stand
//! and the shards it was to read are read at the next round. (A store that cannot be read
//! fails the appends too.) What is refused was never committed: nothing is lost.

use courier_core::clock::now_ms;
use courier_core::metrics::Metrics;
use courier_store::{MessageStore, StoreError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often the owner of a shard reads its outbox lag: a refusal starts at most this long
/// after the oldest entry passed the limit, and ends at most this long after fanout caught up.
pub const OUTBOX_LAG_ROUND: Duration = Duration::from_millis(250);

/// The default `--outbox-lag-limit`: longer than a fanout failover (a lease of 10 s, then the
/// next round of another fanout node, then its catch-up), so a failover delays deliveries
/// without refusing sends; short enough that a node past its fanout capacity pushes back
/// rather than making every message later.
pub const DEFAULT_OUTBOX_LAG_LIMIT: Duration = Duration::from_secs(30);

/// The outbox lag of each shard as the last round read it (see the module documentation).
pub(crate) struct OutboxWatch {
    limit_ms: u64,
    /// Per shard: messages are refused (the last round's verdict).
    behind: Vec<AtomicBool>,
    /// Per shard: to be read at the next round.
    to_read: Vec<AtomicBool>,
}

impl OutboxWatch {
    pub(crate) fn new(shards: usize, limit: Duration) -> Self {
        Self {
            limit_ms: limit.as_millis() as u64,
            behind: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            to_read: (0..shards).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Whether messages to `shard` are refused now.
    pub(crate) fn is_behind(&self, shard: u32) -> bool {
        self.behind[shard as usize].load(Ordering::Relaxed)
    }

    /// Events were committed to `shard`'s outbox: read it at the next round.
    pub(crate) fn committed(&self, shard: u32) {
        self.to_read[shard as usize].store(true, Ordering::Relaxed);
    }

    /// `shard` was just taken: its outbox may hold what its previous owner left. It accepts
    /// until the next round has read it.
    pub(crate) fn taken(&self, shard: u32) {
        self.behind[shard as usize].store(false, Ordering::Relaxed);
        self.to_read[shard as usize].store(true, Ordering::Relaxed);
    }

    /// `shard` is no longer this node's: it answers `ShardMoved`, never `DeliveryBehind`.
    pub(crate) fn dropped(&self, shard: u32) {
        self.behind[shard as usize].store(false, Ordering::Relaxed);
    }

    /// Reads the oldest outbox entry of every shard of `owned` that may hold one, and decides
    /// for each whether it is behind at `now_ms`. Returns the shards read.
    pub(crate) async fn round(
        &self,
        store: &MessageStore,
        owned: &[u32],
        now_ms: u64,
        metrics: &Metrics,
    ) -> Result<usize, StoreError> {
        // Cleared before the read: a commit meanwhile marks the shard again.
        let shards: Vec<u32> = owned
            .iter()
            .copied()
            .filter(|&shard| self.to_read[shard as usize].swap(false, Ordering::Relaxed))
            .collect();
        let oldest = match store.oldest_outbox_entries(&shards).await {
            Ok(oldest) => oldest,
            Err(e) => {
                for &shard in &shards {
                    self.to_read[shard as usize].store(true, Ordering::Relaxed);
                }
                return Err(e);
            }
        };
        let mut oldest_age_ms = 0;
        for (&shard, entry) in shards.iter().zip(oldest) {
            let index = shard as usize;
            let behind = match entry {
                // Read again at the next round; its verdict stands meanwhile (fanout, which
                // cannot read that row either, is behind on the shard if it was before).
                Err(e) => {
                    tracing::error!(shard, error = %e, "cannot read the oldest entry of this shard's outbox");
                    self.to_read[index].store(true, Ordering::Relaxed);
                    continue;
                }
                Ok(Some(entry)) => {
                    let age_ms = now_ms.saturating_sub(entry.ts_ms);
                    oldest_age_ms = oldest_age_ms.max(age_ms);
                    // Still waiting: read again at the next round.
                    self.to_read[index].store(true, Ordering::Relaxed);
                    age_ms > self.limit_ms
                }
                Ok(None) => false,
            };
            if self.behind[index].swap(behind, Ordering::Relaxed) != behind {
                match behind {
                    true => tracing::warn!(
                        shard,
                        limit_ms = self.limit_ms,
                        "delivery is behind on this shard: refusing its messages"
                    ),
                    false => tracing::info!(shard, "delivery caught up: accepting messages"),
                }
            }
        }
        // Shards not read this round hold nothing (module documentation).
        metrics
            .sequencer_outbox_lag
            .set(oldest_age_ms as f64 / 1000.0);
        let behind = owned.iter().filter(|&&shard| self.is_behind(shard)).count();
        metrics.sequencer_shards_behind.set(behind as i64);
        Ok(shards.len())
    }

    /// One round at the current time (see [`OutboxWatch::round`]).
    pub(crate) async fn round_now(
        &self,
        store: &MessageStore,
        owned: &[u32],
        metrics: &Metrics,
    ) -> Result<usize, StoreError> {
        self.round(store, owned, now_ms(), metrics).await
    }
}

#[cfg(doc)]
use courier_core::sequencing::SequencerError;
