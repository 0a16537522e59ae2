//! The Courier Kubernetes operator.
//!
//! It turns three custom resources (group `courier.dev`, [`crd`]) into the data plane's
//! workloads ([`render`]), scales gateways from their connections ([`autoscale`]), and moves
//! hot sequencer shards between pods through the data plane's admin API ([`rebalance`]), or
//! proposes the moves in a fourth resource, `ShardRebalance`, for a person to approve.
//! Planners are pure functions of what was observed, tested without a cluster; controllers
//! ([`controllers`]) read the cluster, call the planners and renderers, and apply the result
//! with server-side apply. They watch every namespace, or one ([`scope`]), while this replica
//! holds the leader Lease ([`leader`]).
//!
//! Not in here: the data plane itself (`dataplane/`), which the operator only talks to over
//! its admin gRPC API.

pub mod autoscale;
pub mod controllers;
pub mod crd;
pub mod data_plane;
pub mod leader;
pub mod metrics;
pub mod rebalance;
pub mod render;
pub mod scope;
