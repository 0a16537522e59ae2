//! Where a consumer of per-shard queues (the fanout's outboxes, the notifier's push intents)
//! has read up to, in memory.

use std::collections::HashMap;
use std::sync::Mutex;

/// The last key a consumer took from each shard's queue (in memory: after a restart the first
/// read starts at the head of the queue).
#[derive(Default)]
pub struct ShardCursors(Mutex<HashMap<u32, Vec<u8>>>);

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

    /// Forgets where `shard` was read up to: the next read starts at the head of its queue.
    pub fn forget(&self, shard: u32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&shard);
    }
}
