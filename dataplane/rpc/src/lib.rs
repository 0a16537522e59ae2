//! Courier's internal gRPC plumbing, and the store node.
//!
//! - [`auth`]: the cluster token every internal call carries, and the server's check of it;
//! - [`status`]: the one mapping between [`StoreError`](courier_store::StoreError) and
//!   [`tonic::Status`], exact for every variant;
//! - [`store_node`]: [`KvStoreService`] (any [`KvEngine`](courier_store::KvEngine) served
//!   over gRPC) and [`serve_store_node`];
//! - [`remote`]: [`RemoteEngine`], a `KvEngine` that talks to a store node;
//! - [`sequencer`]: the sequencer role over gRPC ([`SequencerService`], [`RemoteSequencer`]);
//! - [`chat`]: the chat role over gRPC ([`ChatNodeService`], [`RemoteChat`], and
//!   [`ClusterChat`], which a gateway node without the chat role calls);
//! - [`delivery`]: delivery across nodes ([`ClusterGateways`] and the gateway's end,
//!   [`delivery::CommitNotifier`] and its listeners' end, `FanoutService`);
//! - [`proto`]: the generated messages and stubs of `courier.internal.v1`, among them the
//!   admin API's client (`proto::admin_client::AdminClient`), which the operator calls.
//!
//! **What the store node is for.** A multi-process *test* or development cluster on one
//! machine, where no FoundationDB runs: its nodes share one embedded store through a store node.
//! **What it is not.** A production store. It is one process on one disk, with no replication
//! and no failover; when it stops, the cluster stops. Production runs on FoundationDB
//! (`courier_store` feature `fdb`), which every role reaches directly.
//!
//! This crate knows the interfaces it carries (the store's, the sequencer's, chat's), not the
//! logic behind them, nor client tokens; it carries client frames (chat's requests) without
//! reading them.

pub mod auth;
pub mod chat;
pub mod delivery;
pub mod directory;
pub mod remote;
pub mod sequencer;
pub mod stall;
pub mod status;
pub mod store_node;

mod convert;

/// The generated messages, client and server of `courier.internal.v1` (`proto/`).
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("courier.internal.v1");
}

pub use auth::{ClusterToken, TokenError};
pub use chat::{ChatNodeService, ClusterChat, RemoteChat};
pub use delivery::{ClusterGateways, CommitNotifier, FanoutService, GatewayService};
pub use remote::RemoteEngine;
pub use sequencer::{RemoteSequencer, SequencerService};
pub use store_node::{KvStoreService, ServeError, serve_store_node, serve_store_node_with};

use courier_store::StoreError;
use courier_store::kv::BatchLimits;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Interval of the HTTP/2 pings on every internal connection, and how long an answer may take:
/// a peer that vanished without closing its connection (a cut link, a stopped process) is
/// noticed within twice this.
pub const KEEPALIVE: Duration = Duration::from_secs(10);

/// Longest wait for a TCP connection to another node.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Calls in flight on one internal connection (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`);
/// further calls wait in the client's HTTP/2 stack.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// The gRPC server of an internal port (a node's, the store node's): at most
/// [`MAX_CONCURRENT_STREAMS`] calls in flight per connection, and an HTTP/2 ping every
/// [`KEEPALIVE`] that the peer must answer within as long, so that a node that vanished
/// without closing its connection (a cut link, a killed pod) does not hold the connection and
/// its calls' tasks for good.
pub fn internal_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
}

/// Largest message the data plane's services and clients decode (the store node's have limits
/// of their own): unbounded, where tonic's default is 4 MiB. A fanout's delivery batch, a
/// chat node's page of `fetch` (a thousand events of up to a client frame each, ~64 MiB with
/// the default `--max-frame-bytes`) or a user's list of conversations may pass 4 MiB; refused,
/// a delivery batch was handed again and again, and its shard delivered nothing more. Every
/// message comes from a node of the cluster, bounded by that node's own limits: a server's
/// token check reads the headers before the body is decoded.
pub const MAX_MESSAGE_BYTES: usize = usize::MAX;

/// A channel to the node at `uri` (`http://host:port`), connected on first use and again after
/// it broke. `what` names the peer in errors.
pub fn lazy_channel(uri: &str, what: &str) -> Result<Channel, StoreError> {
    Ok(Endpoint::from_shared(uri.to_owned())
        .map_err(|e| StoreError::Engine(format!("invalid {what} address {uri}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE)
        .connect_lazy())
}

/// Largest gRPC message the store node and [`RemoteEngine`] send or accept for an engine with
/// `limits`: twice the engine's largest batch, plus 1 MiB.
///
/// The largest request is a commit of one full batch: `max_batch_bytes` of keys and values
/// (as counted by `Batch::approximate_size`) plus its protobuf framing (a few bytes per
/// mutation) and its fences (not counted by the engine). The largest answer is one chunk of a
/// range stream, which the server cuts at this size. A commit whose encoded request is larger
/// is refused by [`RemoteEngine`] with `StoreError::TooLarge` before it is sent, so the
/// transport's own limit is never what refuses it.
pub fn max_message_bytes(limits: &BatchLimits) -> usize {
    limits
        .max_batch_bytes
        .saturating_mul(2)
        .saturating_add(1 << 20)
}

/// Locks `mutex`, whose data stays usable after a panic elsewhere (nothing it guards is left
/// half-written).
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
