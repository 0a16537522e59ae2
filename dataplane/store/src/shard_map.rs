//! The cluster's shard map as the store has it: for every shard, who sequences it and who
//! drains its outbox (the ownership records, live or lapsed), and how far its outbox is
//! behind. Any node can read it: it is what the admin API's `ListShardMap` answers, so that
//! the operator sees every shard, including those no live node holds.
//!
//! **Cost of one map** of `n` shards with `count_limit` (at most [`MAX_OUTBOX_COUNT_LIMIT`]):
//! two range reads of the ownership records (one small record per shard each), then per
//! shard one range read of at most `count_limit + 1` outbox entries (keys and values: a
//! committed event each), at most [`CONCURRENT_READS`] shards at a time. On a cluster whose
//! fanout keeps up, each outbox holds at most the page being delivered, so the reads are
//! small; a shard far behind costs `count_limit + 1` entries, never its whole backlog. On the
//! embedded engine the read of an outbox also steps over the tombstones of entries cleared
//! since the last compaction (FoundationDB clears ranges without per-key tombstones).

use crate::kv::StoreError;
use crate::message_store::{MessageStore, corrupt};
use crate::outbox_rows::{self, EventHeader};
use crate::ownership::{Duty, ShardOwner};
use futures::{StreamExt, TryStreamExt};
use std::collections::BTreeMap;

/// Outbox entries counted per shard when the caller does not say.
pub const DEFAULT_OUTBOX_COUNT_LIMIT: usize = 100;

/// Most outbox entries counted per shard, whatever the caller asks: bounds the bytes one map
/// reads (see the module documentation).
pub const MAX_OUTBOX_COUNT_LIMIT: usize = 1000;

/// Shards whose outboxes are read at the same time while building a map.
pub const CONCURRENT_READS: usize = 16;

/// Shards whose oldest outbox entries [`MessageStore::oldest_outbox_entries`] reads in one
/// [`crate::KvEngine::ranges`] call (one gRPC call on a store node; concurrent reads on the
/// other engines).
pub const OLDEST_ENTRIES_PER_CALL: usize = 64;

/// The oldest entry waiting in a shard's outbox: its key, and when its event was committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldestOutboxEntry {
    pub key: Vec<u8>,
    /// Its event's `ts_ms` (set by the sequencer that committed it).
    pub ts_ms: u64,
}

/// The first entry of the outbox row `key` holding `value`.
fn oldest_entry_of(key: &[u8], value: &[u8]) -> Result<OldestOutboxEntry, StoreError> {
    let (key, event) = outbox_rows::stored_entries(key, value)?
        .into_iter()
        .next()
        .ok_or_else(|| corrupt(key, "an outbox row without entries"))?;
    let ts_ms = EventHeader::decode_stored(&key, event)?.ts_ms;
    Ok(OldestOutboxEntry { key, ts_ms })
}

/// How far a shard's outbox is behind: the entries waiting for fanout, from its bound on
/// (counted up to a limit)
/// and when the oldest of them was committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxLag {
    /// Entries waiting, up to the limit counted.
    pub entries: usize,
    /// More entries wait than `entries` says (the count stopped at its limit).
    pub more: bool,
    /// The commit time of the oldest waiting entry (its event's `ts_ms`), if any waits.
    pub oldest_ts_ms: Option<u64>,
}

impl OutboxLag {
    /// How long the oldest waiting entry has waited at `now_ms` (0 when none waits).
    pub fn oldest_age_ms(&self, now_ms: u64) -> u64 {
        self.oldest_ts_ms
            .map_or(0, |ts_ms| now_ms.saturating_sub(ts_ms))
    }
}

/// One shard of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardState {
    pub shard: u32,
    /// Its sequencer's ownership record (live or lapsed), if it ever had one.
    pub sequencing: Option<ShardOwner>,
    /// Its outbox consumer's (fanout) ownership record, if it ever had one.
    pub delivery: Option<ShardOwner>,
    pub outbox: OutboxLag,
}

/// The part of an outbox that waits for fanout: from its bound on (entries below it wait
/// only for the push notifier).
fn waiting(
    outbox: std::ops::Range<Vec<u8>>,
    delivered: Option<Vec<u8>>,
) -> std::ops::Range<Vec<u8>> {
    match delivered {
        Some(bound) => bound.max(outbox.start)..outbox.end,
        None => outbox,
    }
}

impl MessageStore {
    /// The outbox lag of `shard`, counting at most `count_limit` entries (clamped to
    /// `1..=`[`MAX_OUTBOX_COUNT_LIMIT`]): a read of at most `count_limit + 1` entries from
    /// fanout's bound. An entry that does not decode counts as waiting (fanout passes it over
    /// when it comes to it); the oldest age is then that of the oldest entry that decodes.
    pub async fn outbox_lag(
        &self,
        shard: u32,
        count_limit: usize,
    ) -> Result<OutboxLag, StoreError> {
        let limit = count_limit.clamp(1, MAX_OUTBOX_COUNT_LIMIT);
        let delivered = self.delivered_bounds(&[shard]).await?.pop().flatten();
        let entries = self
            .outbox_entries(shard, delivered.as_deref(), limit + 1)
            .await?;
        Ok(OutboxLag {
            entries: entries.len().min(limit),
            more: entries.len() > limit,
            oldest_ts_ms: entries
                .iter()
                .find_map(|(_, event)| event.as_ref().ok().map(|event| event.ts_ms)),
        })
    }

    /// The oldest outbox entry of each of `shards` that fanout has not delivered, in the
    /// order asked (`None`: none waits): fanout's bound of each, then a range read of one row
    /// from there, which steps over no cleared entry (only entries below the bound are
    /// cleared), and its first entry. A row the bound falls inside (fanout stopped within a
    /// commit's entries) is passed over: the age is then that of the next row, a commit's
    /// later one or the next commit's. Reads [`OLDEST_ENTRIES_PER_CALL`] shards per engine
    /// call, one call after the other. A row that does not decode fails its own shard's answer
    /// only (the inner `Result`): the other shards' are still read.
    pub async fn oldest_outbox_entries(
        &self,
        shards: &[u32],
    ) -> Result<Vec<Result<Option<OldestOutboxEntry>, StoreError>>, StoreError> {
        let mut oldest = Vec::with_capacity(shards.len());
        for chunk in shards.chunks(OLDEST_ENTRIES_PER_CALL) {
            let delivered = self.delivered_bounds(chunk).await?;
            let ranges = chunk
                .iter()
                .zip(delivered)
                .map(|(&shard, delivered)| waiting(self.keys().outbox(shard), delivered))
                .collect();
            for rows in self.kv().ranges(ranges, 1).await? {
                oldest.push(match rows.into_iter().next() {
                    Some((key, value)) => oldest_entry_of(&key, &value).map(Some),
                    None => Ok(None),
                });
            }
        }
        Ok(oldest)
    }

    /// Every shard of the store, in order, with its owners and outbox lag (module
    /// documentation: what it costs).
    pub async fn shard_map(&self, count_limit: usize) -> Result<Vec<ShardState>, StoreError> {
        let by_shard = |owners: Vec<ShardOwner>| -> BTreeMap<u32, ShardOwner> {
            owners.into_iter().map(|o| (o.shard, o)).collect()
        };
        let mut sequencing = by_shard(self.shard_owners(Duty::Sequencing).await?);
        let mut delivery = by_shard(self.shard_owners(Duty::Delivery).await?);
        let lags: Vec<OutboxLag> = futures::stream::iter(0..self.shard_count())
            .map(|shard| self.outbox_lag(shard, count_limit))
            .buffered(CONCURRENT_READS)
            .try_collect()
            .await?;
        Ok(lags
            .into_iter()
            .zip(0..)
            .map(|(outbox, shard)| ShardState {
                shard,
                sequencing: sequencing.remove(&shard),
                delivery: delivery.remove(&shard),
                outbox,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message_store::{DeliveredBound, HeadCache, bound_after};
    use crate::testing::{direct_message, temp_store};

    const LEASE: u64 = 10_000;

    #[tokio::test]
    async fn the_map_lists_every_shard_with_its_owners_and_its_outbox_lag() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        let shard = store.shard_of("d:1");
        let other = (shard + 1) % 4;
        let lease = store
            .acquire_shards(Duty::Sequencing, "s1", &[shard], usize::MAX, 1_000, LEASE)
            .await
            .unwrap()[0];
        // Another shard's sequencer released it: listed, with a lease that ended.
        let released = store
            .acquire_shards(Duty::Sequencing, "s2", &[other], usize::MAX, 1_000, LEASE)
            .await
            .unwrap();
        store
            .release_shards(Duty::Sequencing, "s2", &released)
            .await
            .unwrap();
        let delivery = store
            .acquire_shards(Duty::Delivery, "f1", &[shard], usize::MAX, 1_000, LEASE)
            .await
            .unwrap()[0];
        let mut heads = HeadCache::default();
        for i in 0..5 {
            store
                .append(lease, &mut heads, &[direct_message(&format!("m{i}"))])
                .await
                .unwrap();
        }
        let first_ts = store.outbox(shard, None, 1).await.unwrap()[0].1.ts_ms;

        let map = store.shard_map(3).await.unwrap();
        assert_eq!(
            map.iter().map(|s| s.shard).collect::<Vec<_>>(),
            [0, 1, 2, 3],
            "every shard, owned or not"
        );
        let busy = &map[shard as usize];
        let owner = busy.sequencing.as_ref().unwrap();
        assert_eq!((owner.node.as_str(), owner.epoch), ("s1", lease.epoch));
        assert_eq!(owner.lease_until_ms, 1_000 + LEASE);
        let consumer = busy.delivery.as_ref().unwrap();
        assert_eq!(
            (consumer.node.as_str(), consumer.epoch),
            ("f1", delivery.epoch)
        );
        assert_eq!(
            busy.outbox,
            OutboxLag {
                entries: 3,
                more: true,
                oldest_ts_ms: Some(first_ts),
            },
            "counted up to the limit, and the oldest entry's commit time"
        );
        assert_eq!(busy.outbox.oldest_age_ms(first_ts + 250), 250);
        let lapsed = &map[other as usize];
        assert_eq!(lapsed.sequencing.as_ref().unwrap().lease_until_ms, 0);
        assert_eq!(lapsed.delivery, None);
        assert_eq!(lapsed.outbox, OutboxLag::default());
        let idle = map
            .iter()
            .find(|s| s.shard != shard && s.shard != other)
            .unwrap();
        assert_eq!((&idle.sequencing, &idle.delivery), (&None, &None));

        // Fanout delivered the first three entries: two wait, the oldest is the fourth.
        let entries = store.outbox(shard, None, 3).await.unwrap();
        let fourth_ts = store.outbox(shard, None, 4).await.unwrap()[3].1.ts_ms;
        store
            .advance_delivered(&[DeliveredBound {
                lease: delivery,
                bound: bound_after(&entries[2].0),
            }])
            .await
            .unwrap();
        assert_eq!(
            store.outbox_lag(shard, 3).await.unwrap(),
            OutboxLag {
                entries: 2,
                more: false,
                oldest_ts_ms: Some(fourth_ts),
            }
        );
        assert_eq!(
            store.outbox_lag(shard, 0).await.unwrap().entries,
            1,
            "a limit of 0 counts one entry"
        );
    }

    /// The oldest entries of `shards`, each read without error.
    async fn oldest_of(store: &MessageStore, shards: &[u32]) -> Vec<Option<OldestOutboxEntry>> {
        let answers = store.oldest_outbox_entries(shards).await.unwrap();
        answers.into_iter().map(Result::unwrap).collect()
    }

    #[tokio::test]
    async fn the_oldest_outbox_entries_are_read_from_fanouts_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        let shard = store.shard_of("d:1");
        let idle = (shard + 1) % 4;
        let lease = store
            .acquire_shards(Duty::Sequencing, "s1", &[shard], usize::MAX, 1_000, LEASE)
            .await
            .unwrap()[0];
        let delivery = store
            .acquire_shards(Duty::Delivery, "f1", &[shard], usize::MAX, 1_000, LEASE)
            .await
            .unwrap()[0];
        let mut heads = HeadCache::default();
        for i in 0..3 {
            store
                .append(lease, &mut heads, &[direct_message(&format!("m{i}"))])
                .await
                .unwrap();
        }
        let entries = store.outbox(shard, None, 3).await.unwrap();
        let oldest = |i: usize| {
            Some(OldestOutboxEntry {
                key: entries[i].0.clone(),
                ts_ms: entries[i].1.ts_ms,
            })
        };

        let first = oldest_of(&store, &[shard, idle]).await;
        assert_eq!(first, [oldest(0), None], "in the order asked");
        // Read again: the same entry.
        let again = oldest_of(&store, &[shard]).await;
        assert_eq!(again, [oldest(0)]);

        store
            .advance_delivered(&[DeliveredBound {
                lease: delivery,
                bound: bound_after(&entries[1].0),
            }])
            .await
            .unwrap();
        let after_two = oldest_of(&store, &[shard]).await;
        assert_eq!(after_two, [oldest(2)], "read from fanout's bound");
        store
            .advance_delivered(&[DeliveredBound {
                lease: delivery,
                bound: bound_after(&entries[2].0),
            }])
            .await
            .unwrap();
        let drained = oldest_of(&store, &[shard]).await;
        assert_eq!(drained, [None], "every entry delivered, none cleared yet");
        assert_eq!(store.outbox(shard, None, 10).await.unwrap().len(), 3);
        // More shards than one call reads: every one is answered, in order.
        let many: Vec<u32> = (0..2 * OLDEST_ENTRIES_PER_CALL + 1)
            .map(|i| i as u32 % 4)
            .collect();
        let answered = oldest_of(&store, &many).await;
        assert_eq!(answered.len(), many.len());
        assert!(answered.iter().all(Option::is_none));
    }
}
