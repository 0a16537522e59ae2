//! Helpers shared by the store's unit tests.

use crate::embedded::EmbeddedEngine;
use crate::message_store::{Append, MessageStore, NewConversation, ShardLease};
use crate::ownership::Duty;
use courier_proto::{Body, Sender};
use std::sync::Arc;

/// A message store with `shards` shards on an embedded engine in `dir`.
pub(crate) async fn temp_store(dir: &tempfile::TempDir, shards: u32) -> MessageStore {
    let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
    MessageStore::open(kv, b"", shards).await.unwrap()
}

/// The lease of the shard that orders `conv`, taken now.
pub(crate) async fn owner(store: &MessageStore, conv: &str) -> ShardLease {
    let shard = store.shard_of(conv);
    store
        .acquire_shards(Duty::Sequencing, "test", &[shard], usize::MAX, 0, u64::MAX)
        .await
        .unwrap()[0]
}

/// alice's message `id` (its text too) to bob, in `d:1`, created by the first one.
pub(crate) fn direct_message(id: &str) -> Append {
    let sender = Sender {
        user: "alice".into(),
        device: "p".into(),
    };
    Append {
        create: Some(NewConversation::direct("alice", "bob")),
        ..Append::message("d:1".into(), sender, id.into(), Body::Text(id.into()), None)
    }
}
