//! Courier's storage.
//!
//! - [`kv`]: the ordered key-value interface with FoundationDB's semantics ([`KvEngine`]);
//! - [`embedded`]: the default engine, on one machine's disk, no set-up at all;
//! - [`backup`]: a copy of the embedded store as of one moment, and a new store written from it;
//! - `fdb` (feature `fdb`): the FoundationDB engine, see `docs/foundationdb.md`;
//! - [`MessageStore`]: the message-store logic written once over any engine: shards and epochs,
//!   appends with dense seqs and idempotency, the outbox, cursors and receipts;
//! - [`membership`]: who may read which seqs of a conversation (periods of membership);
//! - [`ownership`]: each shard's owner (leases, epochs, hand-off);
//! - [`nodes`]: the cluster's node registry (leases; lapsed nodes forgotten);
//! - [`shard_map`]: every shard's owners and outbox lag, as the store has them (admin API);
//! - [`partitions`]: storage partitions (shard ranges on several stores) and their routing;
//! - [`contract`]: the checks every engine passes.
//!
//! This crate knows nothing of sockets, tokens or frames beyond the stored `Event`.

pub mod backup;
pub mod contract;
pub mod embedded;
mod event_cache;
/// Test support for the crates above the store (feature `faulty-engine`).
#[cfg(any(test, feature = "faulty-engine"))]
pub mod faulty_engine;
#[cfg(feature = "fdb")]
pub mod fdb;
mod group_writes;
pub mod idempotency;
pub mod keys;
mod keyspaces;
pub mod kv;
pub mod leaders;
pub mod membership;
mod message_store;
pub mod nodes;
mod outbox_rows;
pub mod ownership;
pub mod partitions;
pub mod push_tokens;
pub mod routes;
mod row_cache;
pub mod shard_map;
#[cfg(test)]
mod testing;
pub mod trim_queue;
mod volume;
mod warm_up;

pub use keys::{Keys, PUSH_REGISTRATION_SLOTS, Placement, ReceiptKind, push_registration_slot};
pub use kv::{Batch, CommitStamp, KvEngine, StoreError};
pub use membership::{MemberRecord, UserConversation, Visibility};
pub use message_store::{
    AckBounds, Append, AppendKey, AppendOutcome, AppendRefused, AppendResult, Appended, CLEAR_PAGE,
    ConversationIds, ConversationRecord, ConversationRow, DeliveredBound, DeviceRecord, HeadCache,
    ListedEntry, MediaAdmission, MediaRecord, MediaReference, MessageStore, NewConversation,
    OutboxEntry, OutboxHeaders, OutboxPage, OwedPush, PUSH_EXPANSION_BYTES, PendingPush,
    PushRegistrationCounts, PushedBound, ReadBounds, ShardLease, TooManyDevices, UndecodableEvent,
    bound_after, rest_after_clear_page,
};
pub use outbox_rows::EventHeader;
pub use partitions::{PartitionStore, PartitionTable, TableError};
