//! The sequencing seam: what the chat role asks of the sequencer role ([`Sequencer`]) and what
//! the sequencer tells those who tail its outbox after each commit ([`CommitListener`]). The
//! in-process binding is `courier_sequencer::LocalSequencer`.

use courier_store::{Append, AppendOutcome, AppendRefused, ListedEntry, StoreError};
use futures::future::BoxFuture;
use std::sync::Arc;

/// Why an append was not sequenced. The store's error is kept as it is, so that clients learn
/// by its type whether a retry with the same `client_msg_id` is safe (see `error.rs`); a
/// `Refused` append is refused for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SequencerError {
    /// Refused at its place in the conversation's order (membership); retrying changes nothing.
    #[error(transparent)]
    Refused(#[from] AppendRefused),
    #[error("the sequencer is overloaded; retry with the same client_msg_id")]
    Overloaded,
    /// Past the conversation's send rate (a group's, kept by the owner of its shard).
    #[error("too many sends to this group; slow down")]
    RateLimited { retry_after_ms: u64 },
    #[error("this node no longer owns the conversation's shard; retry")]
    ShardMoved,
    /// The conversation's shard has an outbox entry older than the sequencer's
    /// `outbox_lag_limit` (fanout is behind on it): a message is refused before anything is
    /// committed, and the client retries with the same `client_msg_id`.
    #[error("delivery is behind; retry shortly")]
    DeliveryBehind,
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
}

/// An append in flight; resolves once it is durable (or refused).
pub type PendingAppend = BoxFuture<'static, Result<AppendOutcome, SequencerError>>;

/// A retention trim in flight; resolves to the number of seqs cleared.
pub type PendingTrim = BoxFuture<'static, Result<u64, SequencerError>>;

/// Orders and persists appends; the only writer of a conversation's events.
pub trait Sequencer: Send + Sync + 'static {
    /// Queues `append` before returning, so two calls from one task keep their order within a
    /// conversation; the future resolves after the durable commit.
    fn submit(&self, append: Append) -> PendingAppend;

    /// Clears the events of `conversation_id` below `new_floor` (retention), fenced by the
    /// shard's epoch like every other shard write.
    fn trim(&self, conversation_id: &str, new_floor: u64) -> PendingTrim;
}

/// Told after each commit which shard's outbox grew (fanout, in-process).
pub trait CommitListener: Send + Sync + 'static {
    /// `events` new entries in `shard`'s outbox that nobody lists: committed by another node,
    /// or by a commit whose outcome was unknown for a while (then possibly none).
    fn committed(&self, shard: u32, events: usize);

    /// The entries a commit of this process added to `shard`'s outbox, in key order: a shard's
    /// commits are told in their order. By default only their count is taken.
    fn committed_entries(&self, shard: u32, entries: &[ListedEntry]) {
        self.committed(shard, entries.len());
    }
}

/// Several listeners told of every commit, in order.
pub struct Listeners(pub Vec<Arc<dyn CommitListener>>);

impl CommitListener for Listeners {
    fn committed(&self, shard: u32, events: usize) {
        for listener in &self.0 {
            listener.committed(shard, events);
        }
    }

    fn committed_entries(&self, shard: u32, entries: &[ListedEntry]) {
        for listener in &self.0 {
            listener.committed_entries(shard, entries);
        }
    }
}
