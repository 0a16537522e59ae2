//! How a node holds the shards it works on: the sequencer role its shards' appends, the fanout
//! role their outboxes (`courier_store::ownership`).

use std::time::Duration;

/// A node's identity and lease length in the shards' ownership records.
#[derive(Debug, Clone)]
pub struct Ownership {
    /// This node's id in the shards' ownership records.
    pub node: String,
    /// How long a lease runs without renewal; it is renewed every third of it, and another
    /// node takes the shard over once it lapsed.
    pub lease: Duration,
}

impl Ownership {
    pub fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }

    /// The time between two lease rounds: a third of the lease, so that a lease outlives two
    /// failed renewals.
    pub fn round(&self) -> Duration {
        self.lease / 3
    }
}
