//! Who runs what in a cluster: the owner of each shard (an ownership record with an epoch and
//! a lease, one per [`Duty`]). The nodes themselves are in the registry (`crate::nodes`).
//!
//! **Two duties per shard.** A shard's appends are sequenced by one node ([`Duty::Sequencing`])
//! and its outbox is drained to the gateways by one node ([`Duty::Delivery`], the fanout role).
//! Each duty has its own records and epochs, kept the same way: what follows says it for the
//! sequencer; for delivery, read "outbox clear" where it says "append batch".
//!
//! **Ownership and fence are two keys.** Every append batch of a shard fences on the shard's
//! epoch (`("shard", n)`) and on nothing else. Who owns the shard, and until when, is a record
//! of its own (`("own", n)`): renewing a lease rewrites only that record, so a renewal never
//! fails an append in flight. Taking a shard (after its owner's lease lapsed, or by a hand-off)
//! writes both in one commit: the record names the new owner and the epoch is bumped, so every
//! later batch of the former owner is refused.
//!
//! **Safety rests on the epoch alone.** Leases only decide when another node may take a shard
//! whose owner stopped renewing (liveness). A node whose clock runs late or which was paused
//! past its lease can delay a failover or lose its shards; it can never commit next to the new
//! owner, because its batches fence on an epoch that moved.
//!
//! Every operation here is one small, fenced commit: safe to retry, and a concurrent change of
//! the record it read makes it fail with [`StoreError::FenceChanged`] rather than overwrite.
//!
//! **A record that does not decode** (damage, or a bug) names no owner anyone can read: its
//! owner's renewals count the shard lost, and the next node to take free shards takes it as a
//! lapsed one (logged at error both times), with a new epoch and a record that decodes. Safety
//! holds, resting on the epoch; failing instead, its owner renewed none of its leases and no
//! node took a free shard again. A stored epoch at `u64::MAX` has no next one, and one of
//! another length than the 8 bytes a take writes none sure to be new (read as a number, it
//! could give an epoch an earlier owner held): a take passes the shard over, logged at error,
//! and a hand-off of it is refused (at `u64::MAX` as damage, [`StoreError::Corrupt`], logged at
//! error; of the wrong length by its fence). At `u64::MAX` its owner, if any, goes on at that
//! epoch; once its lease lapses (at once for an epoch of the wrong length, which fails every
//! batch's fence) no node serves the shard until an operator repairs the record. A record whose lease ends further ahead
//! than any node writes one (more than a day past the taker's own lease) is damage too: the
//! next node to take free shards takes it as a lapsed one, logged at error.

use crate::kv::{Batch, StoreError};
use std::collections::HashMap;
use std::ops::Range;

/// Attempts of an operation on records that another operation of the same owner may rewrite
/// at the same moment (a renewal racing a hand-off or a release): each attempt reads the
/// records again, so only a real change of owner stops it.
const ATTEMPTS: usize = 5;
use crate::message_store::{MessageStore, ShardLease, corrupt};
use prost::Message;

/// What the owner of a shard does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Duty {
    /// Sequences the appends of the shard's conversations (the sequencer role). Every append
    /// batch fences on this duty's epoch.
    Sequencing,
    /// Drains the shard's outbox to the gateways (the fanout role). Every outbox clear fences
    /// on this duty's epoch, so a deposed consumer can no longer clear what it did not deliver.
    Delivery,
}

/// The ownership record of one shard, as stored.
#[derive(Clone, PartialEq, prost::Message)]
struct OwnerRecord {
    #[prost(string, tag = "1")]
    node: String,
    #[prost(uint64, tag = "2")]
    epoch: u64,
    /// The owner holds the shard until this time (ms since the Unix epoch); 0 once released.
    #[prost(uint64, tag = "3")]
    lease_until_ms: u64,
}

/// A shard's owner, as read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardOwner {
    pub shard: u32,
    pub node: String,
    pub epoch: u64,
    /// 0 once the owner released the shard.
    pub lease_until_ms: u64,
}

impl ShardOwner {
    /// Whether the owner's lease still runs at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.lease_until_ms > now_ms
    }
}

/// Runs `attempt` (which reads the records it fences on) again while its fence moved, at most
/// [`ATTEMPTS`] times.
pub(crate) async fn reading_again<T, F, Fut>(mut attempt: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut attempts = 1;
    loop {
        match attempt().await {
            Err(StoreError::FenceChanged { .. }) if attempts < ATTEMPTS => attempts += 1,
            result => return result,
        }
    }
}

impl MessageStore {
    /// The owner of `shard` for `duty`, if it ever had one.
    pub async fn shard_owner(
        &self,
        duty: Duty,
        shard: u32,
    ) -> Result<Option<ShardOwner>, StoreError> {
        let key = self.keys().shard_owner(duty, shard);
        let Some(value) = self.kv().get(&key).await? else {
            return Ok(None);
        };
        let record = OwnerRecord::decode(value.as_slice()).map_err(|e| corrupt(&key, e))?;
        Ok(Some(ShardOwner {
            shard,
            node: record.node,
            epoch: record.epoch,
            lease_until_ms: record.lease_until_ms,
        }))
    }

    /// The owner of every shard for `duty` that ever had one, in shard order: one range read
    /// of the ownership records (one small record per shard).
    pub async fn shard_owners(&self, duty: Duty) -> Result<Vec<ShardOwner>, StoreError> {
        let rows = self
            .kv()
            .range(self.keys().shard_owners(duty), usize::MAX, false)
            .await?;
        rows.into_iter()
            .map(|(key, value)| {
                let shard = self
                    .keys()
                    .shard_owner_shard(&key)
                    .ok_or_else(|| corrupt(&key, "not an ownership key"))?;
                let record = OwnerRecord::decode(value.as_slice()).map_err(|e| corrupt(&key, e))?;
                Ok(ShardOwner {
                    shard,
                    node: record.node,
                    epoch: record.epoch,
                    lease_until_ms: record.lease_until_ms,
                })
            })
            .collect()
    }

    /// Takes for `duty`, in one commit, the first `limit` shards of `shards` that no live
    /// lease of another node holds (never owned, released, lapsed, or already `node`'s: a
    /// restarted node takes its shards back at once), for `node` until `now_ms + lease_ms`.
    /// Each taken shard's epoch is bumped in the same commit, so whoever held it before cannot
    /// commit any more. Returns the leases taken, in the order of `shards`; the others are held
    /// by live leases of other nodes (or were beyond `limit`).
    pub async fn acquire_shards(
        &self,
        duty: Duty,
        node: &str,
        shards: &[u32],
        limit: usize,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Vec<ShardLease>, StoreError> {
        // Another node taking free shards at the same moment moves a fence: read again and
        // take what is left, rather than fail (two nodes starting together). With storage
        // partitions, one commit per run of shards in the same partition.
        let mut leases = Vec::new();
        for run in self.runs_by_partition(shards, |&shard| self.partition_of_shard(shard)) {
            let limit = limit - leases.len();
            if limit == 0 {
                break;
            }
            let taken =
                reading_again(|| self.try_acquire_shards(duty, node, run, limit, now_ms, lease_ms))
                    .await?;
            leases.extend(taken);
        }
        Ok(leases)
    }

    async fn try_acquire_shards(
        &self,
        duty: Duty,
        node: &str,
        shards: &[u32],
        limit: usize,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Vec<ShardLease>, StoreError> {
        let owners = self.records(self.keys().shard_owners(duty)).await?;
        let epochs = self.records(self.keys().shard_epochs(duty)).await?;
        let mut batch = Batch::new();
        let mut leases = Vec::with_capacity(shards.len().min(limit));
        for &shard in shards {
            if leases.len() == limit {
                break;
            }
            let owner_key = self.keys().shard_owner(duty, shard);
            let owner = owners.get(&owner_key).cloned();
            if let Some(value) = &owner {
                match OwnerRecord::decode(value.as_slice()) {
                    // No node writes a lease that ends this far ahead: damage (or a hostile
                    // write). Held by it, the shard stayed with a node that may be gone, and
                    // once that node was gone no node served the shard again. Taken as a
                    // lapsed one, which safety allows (the epoch moves).
                    Ok(record)
                        if record.node != node
                            && beyond_any_lease(record.lease_until_ms, now_ms, lease_ms) =>
                    {
                        tracing::error!(
                            shard,
                            owner = record.node,
                            lease_until_ms = record.lease_until_ms,
                            "an ownership record whose lease ends further ahead than any node writes one: the shard is taken over"
                        );
                    }
                    Ok(record) if record.node != node && record.lease_until_ms > now_ms => {
                        continue;
                    }
                    Ok(_) => {}
                    // No one can tell who holds it, its owner included (its renewals count the
                    // shard lost): taken as a lapsed one, which safety allows (the epoch moves)
                    // and which writes a record that decodes. Failing here, no node took any
                    // free shard again.
                    Err(e) => tracing::error!(
                        shard,
                        error = %corrupt(&owner_key, e),
                        "an ownership record that does not decode: the shard is taken over"
                    ),
                }
            }
            let epoch_key = self.keys().shard_epoch(duty, shard);
            let current = epochs.get(&epoch_key).cloned();
            let next = current
                .as_deref()
                .map_or(Ok(0), |value| stored_epoch(&epoch_key, value))
                .and_then(|epoch| next_epoch(epoch).ok_or_else(|| last_epoch(&epoch_key)));
            let epoch = match next {
                Ok(epoch) => epoch,
                // No epoch follows it that no owner held (at its maximum, or of the wrong
                // length): taken, the shard's fence could not move, or moved to an epoch an
                // earlier owner may still append at. Passed over, as its owner (if any) may
                // still append at it; failing here, no node took any free shard again.
                Err(error) => {
                    tracing::error!(
                        shard,
                        %error,
                        "a shard whose epoch is damaged is passed over: no node can take it"
                    );
                    continue;
                }
            };
            let record = OwnerRecord {
                node: node.to_owned(),
                epoch,
                lease_until_ms: now_ms.saturating_add(lease_ms),
            };
            batch
                .fence(owner_key.clone(), owner)
                .fence(epoch_key.clone(), current)
                .set(owner_key, record.encode_to_vec())
                .set(epoch_key, epoch.to_le_bytes().to_vec());
            leases.push(ShardLease { shard, epoch });
        }
        if !leases.is_empty() {
            self.kv().commit(batch).await?;
        }
        Ok(leases)
    }

    /// Every record in `range` by key: one range read where a read per shard would cost a
    /// round trip each on a store across the network (a lease round looks at every shard;
    /// the records are small, one per shard).
    async fn records(
        &self,
        range: Range<Vec<u8>>,
    ) -> Result<HashMap<Vec<u8>, Vec<u8>>, StoreError> {
        Ok(self
            .kv()
            .range(range, usize::MAX, false)
            .await?
            .into_iter()
            .collect())
    }

    /// Extends, in one commit, `node`'s leases to `now_ms + lease_ms`. Touches only the
    /// ownership records, never the epochs, so appends in flight are not disturbed. Returns the
    /// shards of `leases` that `node` no longer holds at their epoch (taken over, handed off):
    /// stop appending to those. A lease taken over between the read and the commit refuses the
    /// commit ([`StoreError::FenceChanged`]); the caller renews again at its next round.
    pub async fn renew_shards(
        &self,
        duty: Duty,
        node: &str,
        leases: &[ShardLease],
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Vec<u32>, StoreError> {
        self.rewrite_held(duty, node, leases, now_ms.saturating_add(lease_ms))
            .await
    }

    /// Gives `leases` up in one commit: their leases end now, so any node may take them at
    /// once. The epochs are left as they are (each next owner bumps its shard's). Returns the
    /// shards `node` did not hold any more.
    pub async fn release_shards(
        &self,
        duty: Duty,
        node: &str,
        leases: &[ShardLease],
    ) -> Result<Vec<u32>, StoreError> {
        self.rewrite_held(duty, node, leases, 0).await
    }

    /// Sets the lease deadline of every shard of `leases` that `node` holds at its epoch, in one
    /// commit fenced on each record read (one per storage partition); returns the others. A
    /// record changed between the read and the commit (a hand-off of one of them) makes it
    /// read them all again.
    async fn rewrite_held(
        &self,
        duty: Duty,
        node: &str,
        leases: &[ShardLease],
        lease_until_ms: u64,
    ) -> Result<Vec<u32>, StoreError> {
        let mut lost = Vec::new();
        for run in self.runs_by_partition(leases, |lease| self.partition_of_shard(lease.shard)) {
            lost.extend(
                reading_again(|| self.try_rewrite_held(duty, node, run, lease_until_ms)).await?,
            );
        }
        Ok(lost)
    }

    async fn try_rewrite_held(
        &self,
        duty: Duty,
        node: &str,
        leases: &[ShardLease],
        lease_until_ms: u64,
    ) -> Result<Vec<u32>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let owners = self.records(self.keys().shard_owners(duty)).await?;
        let mut batch = Batch::new();
        let mut lost = Vec::new();
        for &lease in leases {
            let key = self.keys().shard_owner(duty, lease.shard);
            let value = owners.get(&key).cloned();
            match held_record(key, value, lease, node) {
                Ok((key, value, mut record)) => {
                    record.lease_until_ms = lease_until_ms;
                    batch
                        .fence(key.clone(), Some(value))
                        .set(key, record.encode_to_vec());
                }
                Err(StoreError::FenceChanged { .. }) => lost.push(lease.shard),
                // Its owner unknown, the shard is lost here and taken over by the next node
                // that takes free shards; failing here renewed none of the node's leases.
                Err(error @ StoreError::Corrupt { .. }) => {
                    tracing::error!(
                        shard = lease.shard,
                        %error,
                        "an ownership record that does not decode: the shard is given up"
                    );
                    lost.push(lease.shard);
                }
                Err(e) => return Err(e),
            }
        }
        if !batch.is_empty() {
            self.kv().commit(batch).await?;
        }
        Ok(lost)
    }

    /// The hand-off's flip (sequencing): `lease.shard` goes from `from` to `to` in one commit, with the
    /// epoch bumped, and `to` holds it until `now_ms + lease_ms`. The caller froze the shard on
    /// `from` first (nothing of it in flight); after the flip, `from` could not commit even if
    /// it tried. Returns `to`'s lease.
    pub async fn hand_off_shard(
        &self,
        lease: ShardLease,
        from: &str,
        to: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<ShardLease, StoreError> {
        // The owner's own renewal may rewrite the record meanwhile: then read it again.
        reading_again(|| self.try_hand_off(lease, from, to, now_ms, lease_ms)).await
    }

    async fn try_hand_off(
        &self,
        lease: ShardLease,
        from: &str,
        to: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<ShardLease, StoreError> {
        let duty = Duty::Sequencing;
        let owner_key = self.keys().shard_owner(duty, lease.shard);
        let value = self.kv().get(&owner_key).await?;
        let (owner_key, value, _) = held_record(owner_key, value, lease, from)?;
        let epoch_key = self.keys().shard_epoch(duty, lease.shard);
        let epoch = next_epoch(lease.epoch).ok_or_else(|| last_epoch(&epoch_key))?;
        let record = OwnerRecord {
            node: to.to_owned(),
            epoch,
            lease_until_ms: now_ms.saturating_add(lease_ms),
        };
        let mut batch = Batch::new();
        batch
            .fence(owner_key.clone(), Some(value))
            .fence(epoch_key.clone(), Some(lease.epoch.to_le_bytes().to_vec()))
            .set(owner_key, record.encode_to_vec())
            .set(epoch_key, epoch.to_le_bytes().to_vec());
        self.kv().commit(batch).await?;
        Ok(ShardLease {
            shard: lease.shard,
            epoch,
        })
    }
}

/// How much further ahead than a node's own lease (`now + lease_ms`) a stored lease may end
/// and still be one a node wrote: a day, far beyond any clock skew between nodes (a minute,
/// `crate::idempotency`) and any difference between their lease lengths in one cluster.
const LEASE_HORIZON_MS: u64 = 24 * 60 * 60 * 1000;

/// Whether a stored lease ending at `lease_until_ms` lies beyond any a node writes, read at
/// `now_ms` by a node whose leases run `lease_ms`: damage (a deadline at `u64::MAX`, say), or a
/// hostile write, never a live owner's lease.
pub(crate) fn beyond_any_lease(lease_until_ms: u64, now_ms: u64, lease_ms: u64) -> bool {
    lease_until_ms
        > now_ms
            .saturating_add(lease_ms)
            .saturating_add(LEASE_HORIZON_MS)
}

/// The epoch after `epoch`, which a new owner takes; `None` past the last one. Epochs are read
/// from the store, so `u64::MAX` is damage (or a hostile write), never a count reached.
fn next_epoch(epoch: u64) -> Option<u64> {
    epoch.checked_add(1)
}

/// A shard's epoch as stored under `key`: the 8 bytes (little-endian) a take writes. Of another
/// length it is damage ([`StoreError::Corrupt`]): read as a number (shorter values
/// zero-extended, longer ones cut), the next epoch could be one an earlier owner held.
fn stored_epoch(key: &[u8], value: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(value)
        .map(u64::from_le_bytes)
        .map_err(|_| corrupt(key, format!("an epoch of {} bytes, not 8", value.len())))
}

/// The error of a shard whose epoch (under `key`) is at its maximum: no owner can follow the
/// one at that epoch.
fn last_epoch(key: &[u8]) -> StoreError {
    corrupt(
        key,
        "the shard's epoch is at its maximum: no new owner can take it",
    )
}

/// The ownership record of `lease.shard` (`value`, stored under `key`) if `node` holds it at
/// `lease.epoch`: its key, the stored bytes (to fence on) and the record;
/// [`StoreError::FenceChanged`] otherwise.
fn held_record(
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    lease: ShardLease,
    node: &str,
) -> Result<(Vec<u8>, Vec<u8>, OwnerRecord), StoreError> {
    let record = match &value {
        Some(value) => Some(OwnerRecord::decode(value.as_slice()).map_err(|e| corrupt(&key, e))?),
        None => None,
    };
    match (value, record) {
        (Some(value), Some(record)) if record.node == node && record.epoch == lease.epoch => {
            Ok((key, value, record))
        }
        _ => Err(StoreError::FenceChanged { key }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message_store::HeadCache;
    use crate::testing::{direct_message, temp_store};

    const LEASE: u64 = 10_000;

    /// `node`'s lease on `shard` taken at `now_ms`, if no other node's lease runs.
    async fn take(store: &MessageStore, node: &str, shard: u32, now_ms: u64) -> Option<ShardLease> {
        store
            .acquire_shards(Duty::Sequencing, node, &[shard], usize::MAX, now_ms, LEASE)
            .await
            .unwrap()
            .pop()
    }

    async fn append(store: &MessageStore, lease: ShardLease, id: &str) -> Result<u64, StoreError> {
        let results = store
            .append(lease, &mut HeadCache::default(), &[direct_message(id)])
            .await?;
        Ok(results.into_iter().next().unwrap().unwrap().seq)
    }

    #[tokio::test]
    async fn two_nodes_taking_free_shards_at_once_split_them_and_neither_fails() {
        use crate::faulty_engine::FaultyEngine;
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        let all: Vec<u32> = (0..8).collect();
        // b takes half between a's read of the records and a's commit: a's fences move.
        let (other, shards) = (store.clone(), all.clone());
        let b = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let b_taken = b.clone();
        engine.before_next_commit(Box::pin(async move {
            let taken = other
                .acquire_shards(Duty::Delivery, "b", &shards, 4, 1_000, LEASE)
                .await
                .unwrap();
            *b_taken.lock().unwrap() = taken;
        }));
        let a = store
            .acquire_shards(Duty::Delivery, "a", &all, 4, 1_000, LEASE)
            .await
            .unwrap();
        let b = b.lock().unwrap().clone();
        let mut taken: Vec<u32> = a.iter().chain(&b).map(|lease| lease.shard).collect();
        taken.sort();
        assert_eq!(taken, all, "a took {a:?}, b took {b:?}");
    }

    #[tokio::test]
    async fn a_live_lease_keeps_a_shard_and_a_lapsed_one_lets_another_node_take_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let shard = store.shard_of("d:1");
        let a = take(&store, "a", shard, 1_000).await.unwrap();
        assert_eq!(append(&store, a, "m1").await.unwrap(), 1);

        assert_eq!(
            take(&store, "b", shard, 1_000 + LEASE - 1).await,
            None,
            "b may not take a shard whose lease runs"
        );
        let b = take(&store, "b", shard, 1_000 + LEASE)
            .await
            .expect("lapsed");
        assert_eq!(b.epoch, a.epoch + 1);
        let owner = store
            .shard_owner(Duty::Sequencing, shard)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((owner.node.as_str(), owner.epoch), ("b", b.epoch));

        // The deposed owner (paused past its lease, say) can neither append nor renew.
        assert!(matches!(
            append(&store, a, "m2").await,
            Err(StoreError::FenceChanged { .. })
        ));
        let lost = store
            .renew_shards(Duty::Sequencing, "a", &[a], 1_000 + LEASE, LEASE)
            .await
            .unwrap();
        assert_eq!(lost, [shard]);
        assert_eq!(
            store
                .shard_owner(Duty::Sequencing, shard)
                .await
                .unwrap()
                .unwrap()
                .node,
            "b",
            "a's renewal wrote nothing"
        );
        assert_eq!(
            append(&store, b, "m2").await.unwrap(),
            2,
            "b resumes from the head"
        );
    }

    #[tokio::test]
    async fn renewing_touches_the_lease_only_so_appends_of_the_same_epoch_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let shard = store.shard_of("d:1");
        let lease = take(&store, "a", shard, 0).await.unwrap();
        for round in 1..=3u64 {
            let lost = store
                .renew_shards(Duty::Sequencing, "a", &[lease], round * LEASE / 2, LEASE)
                .await
                .unwrap();
            assert!(lost.is_empty());
            assert_eq!(
                append(&store, lease, &format!("m{round}")).await.unwrap(),
                round
            );
        }
        let owner = store
            .shard_owner(Duty::Sequencing, shard)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(owner.epoch, lease.epoch, "renewals never bump the epoch");
        assert_eq!(owner.lease_until_ms, 3 * LEASE / 2 + LEASE);
        assert!(owner.is_live(3 * LEASE / 2 + LEASE - 1));
        assert!(!owner.is_live(3 * LEASE / 2 + LEASE));
    }

    #[tokio::test]
    async fn one_commit_takes_every_free_shard_and_skips_the_held_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let held = take(&store, "b", 3, 0).await.unwrap();
        let all: Vec<u32> = (0..store.shard_count()).collect();
        let taken = store
            .acquire_shards(Duty::Sequencing, "a", &all, usize::MAX, 1, LEASE)
            .await
            .unwrap();
        let shards: Vec<u32> = taken.iter().map(|l| l.shard).collect();
        assert_eq!(shards, [0, 1, 2, 4, 5, 6, 7]);
        assert_eq!(
            store
                .shard_owner(Duty::Sequencing, 3)
                .await
                .unwrap()
                .unwrap()
                .epoch,
            held.epoch,
            "a held shard is left alone"
        );
    }

    /// Two shards of `store`, `kept` and `damaged` (that of `d:1`), taken by `node` at time 0
    /// for [`LEASE`]: their leases, in that order.
    async fn two_shards_taken_by(store: &MessageStore, node: &str) -> (u32, u32, Vec<ShardLease>) {
        let damaged = store.shard_of("d:1");
        let kept = (damaged + 1) % 8;
        let leases = store
            .acquire_shards(
                Duty::Sequencing,
                node,
                &[kept, damaged],
                usize::MAX,
                0,
                LEASE,
            )
            .await
            .unwrap();
        (kept, damaged, leases)
    }

    /// An ownership record whose lease ends further ahead than any node writes one (damage:
    /// a deadline at `u64::MAX`, say) is taken over as a lapsed one, with a new epoch: the
    /// shard was held for good by the node it named, and once that node was gone no node
    /// served it again (every send to its conversations refused). A lease of a day more than
    /// the taker's own is still a live one.
    #[tokio::test]
    async fn a_lease_ending_past_any_a_node_writes_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let (kept, damaged, gone) = two_shards_taken_by(&store, "gone").await;
        let mut damage = Batch::new();
        for (lease, until) in [(gone[0], LEASE_HORIZON_MS), (gone[1], u64::MAX)] {
            let record = OwnerRecord {
                node: "gone".into(),
                epoch: lease.epoch,
                lease_until_ms: until,
            };
            damage.set(
                store.keys().shard_owner(Duty::Sequencing, lease.shard),
                record.encode_to_vec(),
            );
        }
        store.kv().commit(damage).await.unwrap();
        let taken = store
            .acquire_shards(
                Duty::Sequencing,
                "b",
                &[kept, damaged],
                usize::MAX,
                1,
                LEASE,
            )
            .await
            .unwrap();
        assert_eq!(taken.len(), 1, "{taken:?}");
        assert_eq!(taken[0].shard, damaged);
        assert_eq!(taken[0].epoch, gone[1].epoch + 1);
        let owner = store
            .shard_owner(Duty::Sequencing, damaged)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (owner.node.as_str(), owner.lease_until_ms),
            ("b", 1 + LEASE)
        );
    }

    /// An ownership record that does not decode (damage) stops neither its owner's renewals
    /// nor the other nodes' takes: its owner counts the shard lost, and the next node to take
    /// free shards takes it as a lapsed one, with a new epoch, writing a record that decodes.
    /// It failed them all: its owner renewed none of its shards (they lapsed), and no node
    /// took any free shard again, every take reading it among the candidates, so the shards
    /// of a node that died or was drained stayed unserved for good.
    #[tokio::test]
    async fn an_ownership_record_that_does_not_decode_is_lost_by_its_owner_and_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let (kept, damaged, a) = two_shards_taken_by(&store, "a").await;
        let mut damage = Batch::new();
        damage.set(
            store.keys().shard_owner(Duty::Sequencing, damaged),
            vec![0xff; 3],
        );
        store.kv().commit(damage).await.unwrap();

        let lost = store
            .renew_shards(Duty::Sequencing, "a", &a, 1, LEASE)
            .await
            .unwrap();
        assert_eq!(lost, [damaged], "the other lease is renewed");
        let renewed = store.shard_owner(Duty::Sequencing, kept).await.unwrap();
        assert_eq!(renewed.unwrap().lease_until_ms, 1 + LEASE);

        let all: Vec<u32> = (0..8).collect();
        let taken = store
            .acquire_shards(Duty::Sequencing, "b", &all, usize::MAX, 2, LEASE)
            .await
            .unwrap();
        let shards: Vec<u32> = taken.iter().map(|lease| lease.shard).collect();
        let free: Vec<u32> = all.into_iter().filter(|&shard| shard != kept).collect();
        assert_eq!(
            shards, free,
            "a's live lease is kept, the damaged one taken"
        );
        let owner = store
            .shard_owner(Duty::Sequencing, damaged)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((owner.node.as_str(), owner.epoch), ("b", a[1].epoch + 1));
        assert!(matches!(
            append(&store, a[1], "m1").await,
            Err(StoreError::FenceChanged { .. })
        ));
        let b = taken.iter().find(|lease| lease.shard == damaged).unwrap();
        assert_eq!(append(&store, *b, "m1").await.unwrap(), 1);
    }

    /// A stored epoch at `u64::MAX` (damage, or a hostile write to the store) has no next
    /// epoch: the shard is passed over, logged, and the others are taken; a hand-off of a lease
    /// at that epoch is refused as damage. Both added one to it: a debug build's lease loop
    /// panicked at every round (no node took any free shard again), and a build without
    /// overflow checks wrapped the epoch round to 0, below those the fences had seen.
    #[tokio::test]
    async fn an_epoch_at_its_maximum_is_passed_over_not_overflowed() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let damaged = store.shard_of("d:1");
        let mut damage = Batch::new();
        damage.set(
            store.keys().shard_epoch(Duty::Sequencing, damaged),
            (u64::MAX - 1).to_le_bytes().to_vec(),
        );
        store.kv().commit(damage).await.unwrap();
        let last = take(&store, "a", damaged, 0).await.unwrap();
        assert_eq!(last.epoch, u64::MAX);

        let all: Vec<u32> = (0..8).collect();
        let taken = store
            .acquire_shards(Duty::Sequencing, "b", &all, usize::MAX, LEASE, LEASE)
            .await
            .unwrap();
        let shards: Vec<u32> = taken.iter().map(|lease| lease.shard).collect();
        let others: Vec<u32> = all.into_iter().filter(|&shard| shard != damaged).collect();
        assert_eq!(
            shards, others,
            "the lapsed shard at the last epoch is passed over"
        );
        let owner = store
            .shard_owner(Duty::Sequencing, damaged)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((owner.node.as_str(), owner.epoch), ("a", u64::MAX));

        assert!(matches!(
            store.hand_off_shard(last, "a", "b", 1, LEASE).await,
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(
            append(&store, last, "m1").await.unwrap(),
            1,
            "its owner still appends at that epoch"
        );
    }

    /// A stored epoch of another length than the 8 bytes a take writes (damage, or a hostile
    /// write) is passed over as one at its maximum is, logged, and the other shards are taken.
    /// Read as a number (shorter values zero-extended, longer ones cut), it gave the take an
    /// epoch an earlier owner may have held: that owner's batches passed the fence beside the
    /// new owner's.
    #[tokio::test]
    async fn an_epoch_of_the_wrong_length_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let damaged = store.shard_of("d:1");
        let all: Vec<u32> = (0..8).collect();
        for (round, value) in [vec![1], Vec::new(), vec![2; 9]].into_iter().enumerate() {
            let mut damage = Batch::new();
            damage.set(
                store.keys().shard_epoch(Duty::Sequencing, damaged),
                value.clone(),
            );
            store.kv().commit(damage).await.unwrap();
            let now_ms = round as u64 * LEASE;
            let taken = store
                .acquire_shards(Duty::Sequencing, "b", &all, usize::MAX, now_ms, LEASE)
                .await
                .unwrap();
            let shards: Vec<u32> = taken.iter().map(|lease| lease.shard).collect();
            let others: Vec<u32> = all.iter().copied().filter(|&s| s != damaged).collect();
            assert_eq!(shards, others, "{value:?}");
        }
    }

    #[tokio::test]
    async fn a_restarted_owner_takes_its_live_shard_back_with_a_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let shard = store.shard_of("d:1");
        let before = take(&store, "a", shard, 0).await.unwrap();
        let after = take(&store, "a", shard, 1).await.unwrap();
        assert_eq!(after.epoch, before.epoch + 1);
        assert!(matches!(
            append(&store, before, "m1").await,
            Err(StoreError::FenceChanged { .. })
        ));
    }

    #[tokio::test]
    async fn a_released_shard_is_free_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let shard = store.shard_of("d:1");
        let a = take(&store, "a", shard, 0).await.unwrap();
        assert_eq!(
            store
                .release_shards(Duty::Sequencing, "b", &[a])
                .await
                .unwrap(),
            [shard],
            "only the owner releases"
        );
        assert!(take(&store, "b", shard, 1).await.is_none());
        assert!(
            store
                .release_shards(Duty::Sequencing, "a", &[a])
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            take(&store, "b", shard, 1).await.is_some(),
            "no need to wait for the lease"
        );
    }

    #[tokio::test]
    async fn a_hand_off_flips_owner_and_epoch_in_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let shard = store.shard_of("d:1");
        let a = take(&store, "a", shard, 0).await.unwrap();
        assert_eq!(append(&store, a, "m1").await.unwrap(), 1);
        let b = store.hand_off_shard(a, "a", "b", 5, LEASE).await.unwrap();
        assert_eq!(b.epoch, a.epoch + 1);
        let owner = store
            .shard_owner(Duty::Sequencing, shard)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (owner.node.as_str(), owner.lease_until_ms),
            ("b", 5 + LEASE)
        );
        assert!(matches!(
            append(&store, a, "m2").await,
            Err(StoreError::FenceChanged { .. })
        ));
        assert_eq!(append(&store, b, "m2").await.unwrap(), 2);
        assert!(
            matches!(
                store.hand_off_shard(a, "a", "c", 6, LEASE).await,
                Err(StoreError::FenceChanged { .. })
            ),
            "a hand-off by a node that no longer owns the shard is refused"
        );
    }

    #[tokio::test]
    async fn a_hand_off_goes_through_a_renewal_of_the_same_owner() {
        use crate::faulty_engine::FaultyEngine;
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        let shard = store.shard_of("d:1");
        let a = take(&store, "a", shard, 0).await.unwrap();
        // The owner's lease round renews the record between the hand-off's read and its commit.
        let renewer = store.clone();
        engine.before_next_commit(Box::pin(async move {
            let lost = renewer
                .renew_shards(Duty::Sequencing, "a", &[a], 1, LEASE)
                .await
                .unwrap();
            assert!(lost.is_empty());
        }));
        let b = store.hand_off_shard(a, "a", "b", 2, LEASE).await.unwrap();
        assert_eq!(b.epoch, a.epoch + 1);
        assert_eq!(
            store
                .shard_owner(Duty::Sequencing, shard)
                .await
                .unwrap()
                .unwrap()
                .node,
            "b"
        );
    }
}
