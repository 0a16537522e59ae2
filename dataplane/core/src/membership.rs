//! Conversation membership as the delivery roles see it (fanout, notifier, receipts, typing),
//! cached per conversation and kept in step with the conversation's own order.
//!
//! An entry holds every current and former member with its periods of membership
//! ([`MemberRecord`]), so "who may read seq N" is answered exactly for every N up to the
//! entry's `through`: the highest seq whose membership it is known to reflect. Entries are
//! only ever replaced by newer ones (larger `through`), so a load that raced a membership
//! commit cannot overwrite what fanout applied since. Two rules keep the cache from being
//! poisoned:
//! - a conversation without members is never cached (it may not exist yet; its first message
//!   creates it), and callers acting for a user check that user's membership in the store
//!   before asking the cache anything;
//! - fanout, which sees each conversation's events in order, applies each membership event as
//!   it passes ([`MembershipCache::recipients`]) with the same transitions the sequenced commit
//!   wrote ([`MemberRecord::join`], [`MemberRecord::leave`]).
//!
//! A reader asking about a seq beyond an entry's `through` (the notifier running ahead of
//! fanout) reloads the entry from the store, where that seq is committed.
//!
//! A member record that does not decode (damage) leaves its user out of the entry, logged at
//! error ([`MessageStore::readable_member_records`]): the user misses the conversation's live
//! deliveries and pushes, and no delivery role is held back on the conversation's shard.

use courier_proto::{Event, EventPayload};
use courier_store::{MemberRecord, MessageStore, StoreError};
use foldhash::{HashMap, HashMapExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// User ids.
pub type Members = Arc<Vec<String>>;

/// Conversations cached before the cache is emptied and refilled on demand.
const CACHE_CONVERSATIONS: usize = 50_000;

/// The membership of one conversation, exact for every seq up to `through`.
struct Entry {
    /// Every member and former member, in id order.
    records: Vec<(String, MemberRecord)>,
    /// The seq of the last membership event reflected.
    version: u64,
    /// The members now (as of `through`).
    current: Members,
    /// The highest seq this entry is known to be exact for; only grows.
    through: AtomicU64,
}

impl Entry {
    fn new(records: Vec<(String, MemberRecord)>, through: u64) -> Self {
        let version = records.iter().map(|(_, r)| r.version()).max().unwrap_or(0);
        let current = Arc::new(
            records
                .iter()
                .filter(|(_, r)| r.is_member())
                .map(|(u, _)| u.clone())
                .collect(),
        );
        Self {
            records,
            version,
            current,
            through: AtomicU64::new(through.max(version)),
        }
    }

    fn through(&self) -> u64 {
        self.through.load(Ordering::Acquire)
    }

    /// The users who may read the event at `seq` (`seq` at most `through`).
    fn members_at(&self, seq: u64) -> Members {
        if seq > self.version {
            return self.current.clone();
        }
        Arc::new(
            self.records
                .iter()
                .filter(|(_, r)| r.sees(seq))
                .map(|(u, _)| u.clone())
                .collect(),
        )
    }

    /// This entry with the membership event `event` applied, as the sequenced commit did.
    fn applied(&self, event: &Event) -> Option<Self> {
        let (users, creator, join) = match &event.payload {
            EventPayload::GroupCreated { members, .. } => (members, Some(&event.sender.user), true),
            EventPayload::MemberAdded(change) => (&change.users, None, true),
            EventPayload::MemberRemoved(change) => (&change.users, None, false),
            EventPayload::Message { .. }
            | EventPayload::Delete { .. }
            | EventPayload::Unknown { .. } => return None,
        };
        let mut records = self.records.clone();
        for user in users {
            let index = match records.binary_search_by(|(u, _)| u.as_str().cmp(user)) {
                Ok(index) => index,
                Err(index) => {
                    records.insert(index, (user.clone(), MemberRecord::default()));
                    index
                }
            };
            let record = &mut records[index].1;
            if join {
                record.join(event.seq, creator == Some(user));
            } else {
                record.leave(event.seq);
            }
        }
        Some(Self::new(records, event.seq))
    }
}

pub struct MembershipCache {
    store: MessageStore,
    cache: Mutex<HashMap<String, Arc<Entry>>>,
    /// Whether [`MembershipCache::current`] checks the conversation's head in the store first
    /// (see [`MembershipCache::checking_heads`]).
    check_heads: bool,
}

impl MembershipCache {
    /// A cache kept current by the fanout of this process, which sees every conversation's
    /// events in order (`courier serve`).
    pub fn new(store: MessageStore) -> Self {
        Self {
            store,
            cache: Mutex::new(HashMap::new()),
            check_heads: false,
        }
    }

    /// A cache for a node whose fanout does not see every conversation (a cluster node):
    /// [`MembershipCache::current`] reads the conversation's head first and loads the entry
    /// again when events were committed past it, so a member removed on another node gets no
    /// typing or receipts from here. One point read per call.
    pub fn checking_heads(store: MessageStore) -> Self {
        Self {
            check_heads: true,
            ..Self::new(store)
        }
    }

    fn cached(&self, conv: &str) -> Option<Arc<Entry>> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(conv)
            .cloned()
    }

    /// Caches `entry` unless a newer one is cached; returns the one kept.
    fn keep_newer(&self, conv: &str, entry: Entry) -> Arc<Entry> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cached) = cache.get(conv)
            && cached.through() >= entry.through()
        {
            return cached.clone();
        }
        if cache.len() >= CACHE_CONVERSATIONS {
            cache.clear();
        }
        let entry = Arc::new(entry);
        cache.insert(conv.to_owned(), entry.clone());
        entry
    }

    /// Drops the entry of `conv`: the next reader loads it from the store. For a membership
    /// change committed that could not be loaded through.
    pub fn forget(&self, conv: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(conv);
    }

    /// The entry of `conv`, exact at least through `seq`; `None` for a conversation without
    /// members (never cached).
    async fn entry(&self, conv: &str, seq: u64) -> Result<Option<Arc<Entry>>, StoreError> {
        if let Some(entry) = self.cached(conv)
            && entry.through() >= seq
        {
            return Ok(Some(entry));
        }
        // The head first: every membership event up to it is in the records read after. A
        // record that does not decode leaves its user out (logged), not the conversation:
        // failing here held the shard of every delivery role for good.
        let head = self.store.head(conv).await?;
        let records = self.store.readable_member_records(conv).await?;
        if records.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.keep_newer(conv, Entry::new(records, head))))
    }

    /// The users who may read the event of `conv` at `seq` (committed).
    pub async fn members_at(&self, conv: &str, seq: u64) -> Result<Members, StoreError> {
        Ok(self
            .entry(conv, seq)
            .await?
            .map_or_else(Members::default, |entry| entry.members_at(seq)))
    }

    /// The members of `conv` now, as far as fanout has applied its membership events (or as
    /// of the head in the store, for a cache [`MembershipCache::checking_heads`]). For
    /// relaying typing and receipts; the caller has checked in the store that the user it acts
    /// for is a member.
    pub async fn current(&self, conv: &str) -> Result<Members, StoreError> {
        let through = match self.check_heads {
            true => self.store.head(conv).await?,
            false => 0,
        };
        Ok(self
            .entry(conv, through)
            .await?
            .map_or_else(Members::default, |entry| entry.current.clone()))
    }

    /// The users an event goes to: those who may read it (a `member_removed` still goes to
    /// the users it removes; nothing after it does). For fanout, which calls it for each
    /// conversation's events in order: membership events are applied as they pass.
    pub async fn recipients(&self, event: &Event) -> Result<Members, StoreError> {
        let conv = &event.conversation_id;
        let Some(entry) = self.entry(conv, event.seq.saturating_sub(1)).await? else {
            return Ok(Members::default());
        };
        if event.seq <= entry.through() {
            return Ok(entry.members_at(event.seq));
        }
        match entry.applied(event) {
            Some(next) => Ok(self.keep_newer(conv, next).members_at(event.seq)),
            None => {
                entry.through.fetch_max(event.seq, Ordering::AcqRel);
                Ok(entry.members_at(event.seq))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::{MembershipChange, Sender};
    use courier_store::embedded::EmbeddedEngine;

    fn record(joined: u64) -> MemberRecord {
        MemberRecord::joined_at(joined, false)
    }

    fn membership_event(seq: u64, payload: EventPayload) -> Event {
        Event {
            conversation_id: "g:1".into(),
            seq,
            server_msg_id: String::new(),
            sender: Sender {
                user: "alice".into(),
                device: "p".into(),
            },
            ts_ms: 0,
            payload,
        }
    }

    async fn cache() -> (tempfile::TempDir, MembershipCache) {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
        let store = MessageStore::open(kv, b"", 4).await.unwrap();
        (dir, MembershipCache::new(store))
    }

    #[tokio::test]
    async fn an_older_entry_never_replaces_a_newer_one() {
        let (_dir, cache) = cache().await;
        let newer = Entry::new(
            vec![("alice".into(), record(1)), ("bob".into(), record(5))],
            5,
        );
        cache.keep_newer("g:1", newer);
        let stale = Entry::new(vec![("alice".into(), record(1))], 4);
        let kept = cache.keep_newer("g:1", stale);
        assert_eq!(*kept.current, ["alice", "bob"]);
        assert_eq!(*cache.members_at("g:1", 5).await.unwrap(), ["alice", "bob"]);
    }

    #[tokio::test]
    async fn a_conversation_without_members_is_never_cached() {
        let (_dir, cache) = cache().await;
        assert!(cache.current("d:nobody").await.unwrap().is_empty());
        assert!(cache.cached("d:nobody").is_none());
    }

    #[tokio::test]
    async fn fanout_applies_membership_events_in_order_and_answers_any_seq() {
        let (_dir, cache) = cache().await;
        cache.keep_newer(
            "g:1",
            Entry::new(vec![("alice".into(), MemberRecord::joined_at(1, true))], 1),
        );
        let added = membership_event(
            2,
            EventPayload::MemberAdded(MembershipChange::new(vec!["bob".into()])),
        );
        assert_eq!(*cache.recipients(&added).await.unwrap(), ["alice", "bob"]);
        let removed = membership_event(
            4,
            EventPayload::MemberRemoved(MembershipChange::new(vec!["bob".into()])),
        );
        let message = |seq| membership_event(seq, EventPayload::Delete { target_seq: 1 });
        assert_eq!(
            *cache.recipients(&message(3)).await.unwrap(),
            ["alice", "bob"]
        );
        assert_eq!(
            *cache.recipients(&removed).await.unwrap(),
            ["alice", "bob"],
            "the removed user gets its own removal"
        );
        assert_eq!(*cache.recipients(&message(5)).await.unwrap(), ["alice"]);
        assert_eq!(*cache.members_at("g:1", 3).await.unwrap(), ["alice", "bob"]);
        assert_eq!(*cache.members_at("g:1", 1).await.unwrap(), ["alice"]);
    }

    #[tokio::test]
    async fn a_cache_checking_heads_sees_membership_committed_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
        let store = MessageStore::open(kv, b"", 4).await.unwrap();
        let lease = store
            .acquire_shards(
                courier_store::ownership::Duty::Sequencing,
                "s",
                &[store.shard_of("d:1")],
                1,
                0,
                u64::MAX,
            )
            .await
            .unwrap()[0];
        let sender = Sender {
            user: "alice".into(),
            device: "p".into(),
        };
        // Another node's chat committed the conversation (alice and bob) and two messages;
        // this node cached an older view: alice alone, through seq 1.
        let append = |id: &str| courier_store::Append {
            create: Some(courier_store::NewConversation::direct("alice", "bob")),
            ..courier_store::Append::message(
                "d:1".into(),
                sender.clone(),
                id.into(),
                courier_proto::Body::Text("hi".into()),
                None,
            )
        };
        store
            .append(
                lease,
                &mut courier_store::HeadCache::default(),
                &[append("m1"), append("m2")],
            )
            .await
            .unwrap();
        let stale = || Entry::new(vec![("alice".into(), record(1))], 1);

        let following = MembershipCache::new(store.clone());
        following.keep_newer("d:1", stale());
        assert_eq!(*following.current("d:1").await.unwrap(), ["alice"]);

        let checking = MembershipCache::checking_heads(store);
        checking.keep_newer("d:1", stale());
        assert_eq!(*checking.current("d:1").await.unwrap(), ["alice", "bob"]);
    }

    /// A member record that does not decode (damage) leaves its user out, logged at error; the
    /// other members are answered. It failed every load of the conversation: fanout retried
    /// the event for good, so its shard delivered nothing more and, past
    /// `--outbox-lag-limit`, refused every send to any of its conversations, and the push
    /// notifier held the shard likewise.
    #[tokio::test]
    async fn a_member_record_that_does_not_decode_leaves_only_its_user_out() {
        use courier_store::kv::{Batch, KvEngine};
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
        let store = MessageStore::open(kv.clone(), b"", 4).await.unwrap();
        let lease = store
            .acquire_shards(
                courier_store::ownership::Duty::Sequencing,
                "s",
                &[store.shard_of("g:1")],
                1,
                0,
                u64::MAX,
            )
            .await
            .unwrap()[0];
        let created = courier_store::Append {
            conversation_id: "g:1".into(),
            sender: Sender {
                user: "alice".into(),
                device: "p".into(),
            },
            key: courier_store::AppendKey::Server("created".into()),
            payload: EventPayload::GroupCreated {
                name: "friends".into(),
                members: vec!["alice".into(), "bob".into(), "carol".into()],
            },
            create: None,
        };
        let mut heads = courier_store::HeadCache::default();
        store.append(lease, &mut heads, &[created]).await.unwrap();
        let mut damage = Batch::new();
        damage.set(store.keys().member("g:1", "bob"), vec![0xff; 3]);
        kv.commit(damage).await.unwrap();
        // alice's own record decodes: her message is sequenced.
        let message = courier_store::Append::message(
            "g:1".into(),
            Sender {
                user: "alice".into(),
                device: "p".into(),
            },
            "m1".into(),
            courier_proto::Body::Text("hi".into()),
            None,
        );
        let sent = store.append(lease, &mut heads, &[message]).await.unwrap();
        let seq = sent[0].as_ref().unwrap().seq;

        let cache = MembershipCache::new(store.clone());
        let event = membership_event(seq, EventPayload::Delete { target_seq: 1 });
        assert_eq!(*cache.recipients(&event).await.unwrap(), ["alice", "carol"]);
        assert_eq!(
            *cache.members_at("g:1", seq).await.unwrap(),
            ["alice", "carol"]
        );
    }
}
