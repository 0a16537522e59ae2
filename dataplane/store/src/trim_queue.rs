//! The retention queue: each conversation with the time a retention pass should next look at
//! it (`("trimq", due, conv)`), so that a pass visits the conversations whose oldest event has
//! come of age, or that were held back, instead of every conversation.
//!
//! A conversation enters the queue when it is created (due at once); a pass moves its entry to
//! when it should look again. The queue is built anew from the conversations' records (every
//! one due at once) when it was built for another retention window, was never built (a store
//! from before the queue), or is older than one window: so a conversation no entry names (one
//! created by an earlier version during an upgrade) waits at most a window and a pass.

use crate::kv::{Batch, StoreError, decode_u64};
use crate::message_store::{MessageStore, bound_after, corrupt};

/// Conversations listed, and queued, per commit of a build.
const PAGE: usize = 1024;

/// An entry of the retention queue that has come due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrimDue {
    /// The entry's key, to move it ([`MessageStore::reschedule_trims`]) or page past it.
    pub key: Vec<u8>,
    pub due_ms: u64,
    pub conversation: String,
}

impl MessageStore {
    /// The entries of the retention queue due at or before `now_ms`, in due order, at most
    /// `limit`, after the key `after` (from an earlier page). A key of the queue that does not
    /// decode (damaged, or written by a later version) is logged and cleared, rather than
    /// failing every pass from then on: the conversation it named, if any, is queued again
    /// when the queue is next built (within a window).
    pub async fn due_trims(
        &self,
        now_ms: u64,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<TrimDue>, StoreError> {
        let mut range = self.keys().trims_due(now_ms);
        if let Some(after) = after {
            range.start = bound_after(after);
        }
        let rows = self.kv().range(range, limit, false).await?;
        let mut due = Vec::with_capacity(rows.len());
        let mut undecodable = Batch::new();
        for (key, _) in rows {
            match self.keys().trim_due_entry(&key) {
                Some((due_ms, conversation)) => due.push(TrimDue {
                    key,
                    due_ms,
                    conversation,
                }),
                None => {
                    tracing::error!(error = %corrupt(&key, "retention queue key"), "a retention queue entry does not decode: cleared (its conversation is queued again when the queue is next built)");
                    undecodable.clear(key);
                }
            }
        }
        if !undecodable.mutations.is_empty() {
            self.kv().commit(undecodable).await?;
        }
        Ok(due)
    }

    /// Moves each entry to its due time, in one commit per partition, deferred: a move lost
    /// to a power loss only has a pass look at the conversation again. Each move is fenced on
    /// its entry: an entry another pass moved meanwhile (two passes overlapping) stays where
    /// that pass put it, rather than the conversation being queued twice, and the other moves
    /// of its commit are made again without it.
    pub async fn reschedule_trims(&self, moves: &[(&TrimDue, u64)]) -> Result<(), StoreError> {
        let partition = |(entry, _): &(&TrimDue, u64)| {
            self.partition_of_shard(self.shard_of(&entry.conversation))
        };
        let mut moves = moves.to_vec();
        moves.sort_by_key(partition);
        let runs = self.runs_by_partition(&moves, partition);
        futures::future::try_join_all(runs.into_iter().map(|run| self.move_trims(run.to_vec())))
            .await
            .map(drop)
    }

    /// Moves the entries of `moves`, which lie in one partition, in one commit, leaving out
    /// those another pass moved first.
    async fn move_trims(&self, mut moves: Vec<(&TrimDue, u64)>) -> Result<(), StoreError> {
        while !moves.is_empty() {
            let mut batch = Batch::new();
            for (entry, due_ms) in &moves {
                batch
                    .fence(entry.key.clone(), Some(Vec::new()))
                    .clear(entry.key.clone())
                    .set(
                        self.keys().trim_due(*due_ms, &entry.conversation),
                        Vec::new(),
                    );
            }
            batch.deferred();
            match self.kv().commit(batch).await {
                Err(StoreError::FenceChanged { key }) => {
                    let before = moves.len();
                    moves.retain(|(entry, _)| entry.key != key);
                    if moves.len() == before {
                        return Err(StoreError::FenceChanged { key });
                    }
                }
                done => return done.map(drop),
            }
        }
        Ok(())
    }

    /// Builds the retention queue for `window_ms` at `now_ms` unless it was built for that
    /// window less than a window ago: clears it, then queues every conversation, due at once.
    /// Returns how many conversations were queued (0 when the queue stands).
    pub async fn build_trim_queue(&self, window_ms: u64, now_ms: u64) -> Result<u64, StoreError> {
        let built_key = self.keys().trim_queue_built();
        if let Some(built) = self.kv().get(&built_key).await? {
            let (window, at) = built
                .split_at_checked(8)
                .ok_or_else(|| corrupt(&built_key, "length"))?;
            if decode_u64(window) == window_ms && now_ms.saturating_sub(decode_u64(at)) < window_ms
            {
                return Ok(0);
            }
        }
        self.clear_where(self.keys().trim_queue(), |_, _| true)
            .await?;
        let mut queued = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.conversation_ids(after.as_deref(), PAGE).await?;
            let Some(last_key) = page.last_key else {
                break;
            };
            let mut batch = Batch::new();
            for conv in &page.ids {
                batch.set(self.keys().trim_due(now_ms, conv), Vec::new());
            }
            self.commit_independent(batch).await?;
            queued += page.ids.len() as u64;
            after = Some(last_key);
        }
        let built = [window_ms.to_le_bytes(), now_ms.to_le_bytes()].concat();
        let mut batch = Batch::new();
        batch.set(built_key, built);
        self.kv().commit(batch).await?;
        Ok(queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faulty_engine::FaultyEngine;
    use crate::message_store::{Append, AppendKey, HeadCache};
    use crate::testing::{direct_message, owner, temp_store};
    use courier_proto::{EventPayload, Sender};

    const WINDOW: u64 = 60_000;

    /// `store` with one conversation, `d:1` (queued at its creation), and a damaged key: the
    /// one `damaged` makes of the store's keys, written empty and returned.
    async fn one_conversation_and(
        store: &MessageStore,
        damaged: impl FnOnce(&crate::keys::Keys) -> Vec<u8>,
    ) -> Vec<u8> {
        let lease = owner(store, "d:1").await;
        let mut heads = HeadCache::default();
        store
            .append(lease, &mut heads, &[direct_message("a")])
            .await
            .unwrap();
        let damaged = damaged(store.keys());
        let mut batch = Batch::new();
        batch.set(damaged.clone(), Vec::new());
        store.kv().commit(batch).await.unwrap();
        damaged
    }

    /// A damaged key in the retention queue failed every page that read it, so every pass
    /// from then on trimmed nothing: it is cleared, and the entries beside it are listed.
    #[tokio::test]
    async fn a_queue_key_that_does_not_decode_is_cleared_and_holds_back_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        let damaged = one_conversation_and(&store, |keys| {
            [keys.trims_due(0).start, vec![0xff, 0x01]].concat()
        })
        .await;

        let due: Vec<String> = (store.due_trims(u64::MAX, None, 100).await.unwrap())
            .into_iter()
            .map(|e| e.conversation)
            .collect();
        assert_eq!(due, ["d:1"]);
        assert_eq!(store.kv().get(&damaged).await.unwrap(), None, "cleared");
    }

    /// A conversation key that does not parse (damage, or a bug) holds back no other
    /// conversation from the queue, in its page or after it: failing on it, every build of
    /// the queue failed, and retention trimmed nothing from then on.
    #[tokio::test]
    async fn a_conversation_key_that_does_not_parse_queues_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        // Sorted before every conversation's key, so it comes first in the first page.
        one_conversation_and(&store, |keys| {
            [keys.conversations().start, vec![0x01]].concat()
        })
        .await;
        let page = store.conversation_ids(None, 1).await.unwrap();
        assert!(page.ids.is_empty(), "{page:?}");
        let next = store.conversation_ids(page.last_key.as_deref(), 1);
        assert_eq!(next.await.unwrap().ids, ["d:1"], "the page after it");

        assert_eq!(store.build_trim_queue(WINDOW, 1_000).await.unwrap(), 1);
        assert_eq!(queued(&store).await, [(1_000, "d:1".to_owned())]);
    }

    async fn queued(store: &MessageStore) -> Vec<(u64, String)> {
        let due = store.due_trims(u64::MAX, None, 100).await.unwrap();
        due.into_iter()
            .map(|e| (e.due_ms, e.conversation))
            .collect()
    }

    /// A conversation is queued when it is created, due at once; the queue is built anew
    /// (every conversation due at once, none twice) when it was never built, when the window
    /// changes and when it is a window old, and stands otherwise.
    #[tokio::test]
    async fn conversations_are_queued_when_created_and_when_the_queue_is_built() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        let lease = owner(&store, "d:1").await;
        let mut heads = HeadCache::default();
        let sent = store
            .append(
                lease,
                &mut heads,
                &[direct_message("a"), direct_message("b")],
            )
            .await
            .unwrap();
        let created = sent[0].as_ref().unwrap().ts_ms;
        assert_eq!(queued(&store).await, [(created, "d:1".to_owned())]);

        // A store from before the queue (or an entry lost): the first build queues it again.
        let entry = store.due_trims(u64::MAX, None, 1).await.unwrap().remove(0);
        store.reschedule_trims(&[(&entry, 5)]).await.unwrap();
        assert_eq!(store.build_trim_queue(WINDOW, 1_000).await.unwrap(), 1);
        assert_eq!(queued(&store).await, [(1_000, "d:1".to_owned())], "once");
        assert_eq!(
            store
                .build_trim_queue(WINDOW, 1_000 + WINDOW - 1)
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            store.build_trim_queue(WINDOW + 1, 2_000).await.unwrap(),
            1,
            "window changed"
        );
        assert_eq!(
            store
                .build_trim_queue(WINDOW + 1, 2_000 + WINDOW + 1)
                .await
                .unwrap(),
            1,
            "a window old"
        );
        assert_eq!(
            queued(&store).await,
            [(2_000 + WINDOW + 1, "d:1".to_owned())]
        );
    }

    /// A group enters the queue when it is created, as a direct conversation does: its
    /// retention does not wait for the next build of the queue (up to a window later).
    #[tokio::test]
    async fn a_group_is_queued_when_created() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        let lease = owner(&store, "g:1").await;
        let mut heads = HeadCache::default();
        let created = Append {
            conversation_id: "g:1".into(),
            sender: Sender {
                user: "alice".into(),
                device: "p".into(),
            },
            key: AppendKey::Server("create".into()),
            payload: EventPayload::GroupCreated {
                name: "g".into(),
                members: vec!["alice".into(), "bob".into()],
            },
            create: None,
        };
        let sent = store.append(lease, &mut heads, &[created]).await.unwrap();
        let created_ms = sent[0].as_ref().unwrap().ts_ms;
        assert_eq!(queued(&store).await, [(created_ms, "g:1".to_owned())]);
    }

    /// Two passes that overlap (a long one, a paused leader resuming) both move an entry, each
    /// to a time of its own clock: the one that moves it second finds it gone and moves
    /// nothing, so the conversation keeps one entry, not two.
    #[tokio::test]
    async fn an_entry_two_overlapping_passes_move_is_moved_once() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let lease = owner(&store, "d:1").await;
        let mut heads = HeadCache::default();
        store
            .append(lease, &mut heads, &[direct_message("a")])
            .await
            .unwrap();
        let entry = store.due_trims(u64::MAX, None, 1).await.unwrap().remove(0);
        let (other, raced) = (store.clone(), entry.clone());
        engine.before_next_commit(Box::pin(async move {
            other.reschedule_trims(&[(&raced, 100)]).await.unwrap();
        }));
        store.reschedule_trims(&[(&entry, 200)]).await.unwrap();
        assert_eq!(queued(&store).await, [(100, "d:1".to_owned())]);
    }
}
