//! What every Courier role shares: authentication of clients ([`auth`]), the one mapping from
//! typed errors to the client's error codes ([`error`]), metrics, rate limits, storage health,
//! the membership cache, the data directories' creation ([`dirs`]), the owner of every background loop ([`loops::BackgroundLoops`]), the
//! [`context::Context`] a role is built on, and the seams between roles as traits: [`chat::ChatService`] (gateway, client API and media to
//! chat), [`sequencing::Sequencer`] (chat to sequencer),
//! [`sequencing::CommitListener`] (sequencer to fanout and notifier) and
//! [`gateways::Gateways`] (everyone to the connected devices).
//!
//! It holds no role: the roles are crates of their own (`courier-sequencer`, `courier-fanout`,
//! `courier-chat`, `courier-gateway`, `courier-push`, `courier-media`) and the `courier`
//! binary wires them.

pub mod auth;
pub mod chat;
pub mod clock;
pub mod context;
pub mod dirs;
pub mod error;
pub mod gateways;
pub mod leases;
pub mod limits;
pub mod listed_tails;
pub mod loops;
pub mod membership;
pub mod metrics;
pub mod sequencing;
pub mod shard_cursors;
pub mod storage_health;
pub mod units;
