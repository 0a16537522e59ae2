//! Cluster-wide jobs that one node at a time runs: passes over the whole keyspace (retention,
//! the media sweep, the push notifier) that every node able to run them starts, but only the
//! job's leader does.
//!
//! Each job has a leader record (`("lead", job)`: node and lease deadline). Before each pass a
//! node calls [`MessageStore::lead`], which takes the record if it is free, lapsed or already
//! the node's, and renews it; a node that finds another node's live lease skips the pass. The
//! leader keeps the job as long as it renews it within its lease; when it dies, another node
//! takes the job at its first pass after the lease lapsed. A leader record that does not
//! decode (damage) names no one: the job is free, logged at error, and its next leader writes a
//! record that decodes; so is one whose lease ends further ahead than any node writes one
//! (more than a day past the node's own lease: damage, or a hostile write).
//!
//! **No fence.** The jobs are idempotent and every write they make is safe next to another
//! node's (a retention trim goes through the shard's sequencer and fences on its epoch; a
//! media sweep deletes only what nothing references; push expansion counts no message twice).
//! The lease only keeps them from running on every node at once; two leaders for a moment (a
//! paused node past its lease) cost a pass done twice (for push, at worst a notification sent
//! twice), never a wrong write.

use crate::kv::{Batch, StoreError};
use crate::message_store::{MessageStore, corrupt};
use crate::ownership::beyond_any_lease;
use prost::Message;

/// A cluster-wide job with a leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Trims events past retention and expires idempotency records.
    Retention,
    /// Deletes media no message references any more.
    MediaSweep,
    /// Turns the outboxes' messages into notifications and sends them (the push notifier).
    Push,
}

impl Job {
    pub fn name(self) -> &'static str {
        match self {
            Job::Retention => "retention",
            Job::MediaSweep => "media-sweep",
            Job::Push => "push",
        }
    }
}

/// A job's leader, as stored.
#[derive(Clone, PartialEq, prost::Message)]
struct LeaderRecord {
    #[prost(string, tag = "1")]
    node: String,
    /// The leader holds the job until this time (ms since the Unix epoch).
    #[prost(uint64, tag = "2")]
    lease_until_ms: u64,
}

impl MessageStore {
    /// Takes or renews the lead of `job` for `node` until `now_ms + lease_ms`, unless another
    /// node's lease on it still runs; returns whether `node` leads it. Of two nodes taking a
    /// free job at once, the commit of one fails on the record it read and that one does not
    /// lead.
    pub async fn lead(
        &self,
        job: Job,
        node: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<bool, StoreError> {
        let key = self.keys().leader(job.name());
        let stored = self.kv().get(&key).await?;
        if let Some(record) = stored.as_deref().and_then(|value| readable(&key, value))
            && record.node != node
            && record.lease_until_ms > now_ms
        {
            if !beyond_any_lease(record.lease_until_ms, now_ms, lease_ms) {
                return Ok(false);
            }
            // Damage, or a hostile write: held by it, the job stayed with a node that may be
            // gone, and then no node ran it again. Taken as free; two leaders for a moment
            // cost a pass done twice (see the module's doc).
            tracing::error!(
                job = job.name(),
                leader = record.node,
                lease_until_ms = record.lease_until_ms,
                "a job's leader record whose lease ends further ahead than any node writes one: the job is taken as free"
            );
        }
        let record = LeaderRecord {
            node: node.to_owned(),
            lease_until_ms: now_ms.saturating_add(lease_ms),
        };
        let mut batch = Batch::new();
        batch
            .fence(key.clone(), stored)
            .set(key, record.encode_to_vec());
        match self.kv().commit(batch).await {
            Ok(_) => Ok(true),
            Err(StoreError::FenceChanged { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The node whose lease on `job` runs at `now_ms`, if any.
    pub async fn leader(&self, job: Job, now_ms: u64) -> Result<Option<String>, StoreError> {
        let key = self.keys().leader(job.name());
        let Some(value) = self.kv().get(&key).await? else {
            return Ok(None);
        };
        Ok(readable(&key, &value)
            .filter(|record| record.lease_until_ms > now_ms)
            .map(|record| record.node))
    }
}

/// The leader record stored under `key` as `value`; `None`, logged at error, when it does not
/// decode (damage): a job whose record names no one is free, and the next node to lead it
/// writes a record that decodes. Failing on it, no node led the job again (no retention pass,
/// no media sweep, no push notification, anywhere in the cluster).
fn readable(key: &[u8], value: &[u8]) -> Option<LeaderRecord> {
    LeaderRecord::decode(value)
        .inspect_err(|e| {
            tracing::error!(
                error = %corrupt(key, e),
                "a job's leader record does not decode: the job is taken as free"
            );
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_store;

    const LEASE: u64 = 10_000;

    #[tokio::test]
    async fn one_node_leads_a_job_until_its_lease_lapses() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        let retention = Job::Retention;

        assert_eq!(store.leader(retention, 1_000).await.unwrap(), None);
        assert!(store.lead(retention, "a", 1_000, LEASE).await.unwrap());
        assert!(!store.lead(retention, "b", 2_000, LEASE).await.unwrap());
        assert_eq!(
            store.leader(retention, 2_000).await.unwrap().as_deref(),
            Some("a")
        );
        // Another job has its own leader.
        assert!(
            store
                .lead(Job::MediaSweep, "b", 2_000, LEASE)
                .await
                .unwrap()
        );
        // The leader renews: b still cannot take it after the first lease would have ended.
        assert!(store.lead(retention, "a", 9_000, LEASE).await.unwrap());
        assert!(!store.lead(retention, "b", 12_000, LEASE).await.unwrap());
        // a stops renewing: once its lease lapsed, b takes the job and a no longer leads.
        assert_eq!(store.leader(retention, 19_001).await.unwrap(), None);
        assert!(store.lead(retention, "b", 19_001, LEASE).await.unwrap());
        assert!(!store.lead(retention, "a", 19_002, LEASE).await.unwrap());
    }

    /// A leader record whose lease ends further ahead than any node writes one (damage: a
    /// deadline at `u64::MAX`, say) leaves the job free: the next node to lead it does. Taken
    /// as live, it held the job for good by a node that may be gone: no retention pass, no
    /// media sweep, no push notification, anywhere in the cluster.
    #[tokio::test]
    async fn a_leader_record_whose_lease_ends_past_any_a_node_writes_leaves_the_job_free() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        let record = LeaderRecord {
            node: "gone".into(),
            lease_until_ms: u64::MAX,
        };
        let mut damage = Batch::new();
        damage.set(
            store.keys().leader(Job::Push.name()),
            record.encode_to_vec(),
        );
        store.kv().commit(damage).await.unwrap();
        assert!(store.lead(Job::Push, "b", 1_000, LEASE).await.unwrap());
        assert_eq!(
            store.leader(Job::Push, 1_000).await.unwrap().as_deref(),
            Some("b")
        );
        // A live lease another node wrote is still its own.
        assert!(!store.lead(Job::Push, "c", 1_001, 1).await.unwrap());
    }

    /// A leader record that does not decode (damage) leaves the job free: the next node to
    /// lead it does, and writes a record that decodes. Every node failed on it: no one led the
    /// job again, anywhere in the cluster.
    #[tokio::test]
    async fn a_leader_record_that_does_not_decode_leaves_the_job_free() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        let mut damage = Batch::new();
        damage.set(store.keys().leader(Job::Push.name()), vec![0xff; 3]);
        store.kv().commit(damage).await.unwrap();
        assert_eq!(store.leader(Job::Push, 1_000).await.unwrap(), None);
        assert!(store.lead(Job::Push, "a", 1_000, LEASE).await.unwrap());
        assert_eq!(
            store.leader(Job::Push, 2_000).await.unwrap().as_deref(),
            Some("a")
        );
        assert!(!store.lead(Job::Push, "b", 2_000, LEASE).await.unwrap());
    }

    #[tokio::test]
    async fn of_two_nodes_taking_a_free_job_at_once_one_leads() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        let (a, b) = tokio::join!(
            store.lead(Job::Retention, "a", 1_000, LEASE),
            store.lead(Job::Retention, "b", 1_000, LEASE),
        );
        assert!(a.unwrap() ^ b.unwrap(), "exactly one of them leads");
    }
}
