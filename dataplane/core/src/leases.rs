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

/// This node's claim to a cluster-wide job (`courier_store::leaders`): every node able to run
/// the job runs its loop, and before each pass asks whether it leads the job.
#[derive(Clone)]
pub struct JobLead {
    pub store: courier_store::MessageStore,
    pub job: courier_store::leaders::Job,
    /// This node's id.
    pub node: String,
}

impl JobLead {
    /// Whether this node runs the pass that starts now: it takes or renews the job's lead for
    /// three `interval`s (so the lead passes on after a leader missed two passes). A failed
    /// store call is logged and skips the pass.
    pub async fn runs_pass(&self, interval: Duration) -> bool {
        let lease_ms = interval.saturating_mul(3).as_millis() as u64;
        let now = crate::clock::now_ms();
        match self.store.lead(self.job, &self.node, now, lease_ms).await {
            Ok(leads) => leads,
            Err(e) => {
                let job = self.job.name();
                tracing::warn!(job, error = %e, "could not take the job's lead; skipping this pass");
                false
            }
        }
    }
}
