//! Where a consumer of per-shard queues (the outboxes, read by fanout and by the push
//! notifier) has read up to, in memory.

use foldhash::HashMap;
use std::sync::Mutex;

/// Per shard, where a consumer's next read of its queue starts (a bound: the first key it has
/// not taken). In memory: a consumer that starts reads its bound from the store.
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

    pub fn set(&self, shard: u32, bound: Vec<u8>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(shard, bound);
    }

    /// Forgets where `shard` was read up to: the next read starts at the head of its queue.
    pub fn forget(&self, shard: u32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&shard);
    }

    /// Forgets every shard's: a consumer that may have been passed by another reads its
    /// bounds again.
    pub fn forget_all(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
