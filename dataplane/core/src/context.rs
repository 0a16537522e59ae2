//! A role's [`Context`] (in the style of controller-rs): what chat, fanout, the receipt relay
//! and the push notifier are built on, given to each as one value rather than as arguments.
//! `courier serve` fills it with in-process bindings (this process's gateway); a cluster node
//! fills it with gRPC ones (`courier-rpc`'s `ClusterGateways`, which reach every gateway
//! node), so a role does not know which it runs with.

use crate::gateways::Gateways;
use crate::membership::MembershipCache;
use crate::metrics::Metrics;
use courier_store::MessageStore;
use std::sync::Arc;

/// The store and the bindings a role is built on; cheap to clone (handles only).
#[derive(Clone)]
pub struct Context {
    /// The message store: the embedded engine, a store node or FoundationDB.
    pub store: MessageStore,
    /// The connected devices: this process's gateway, or every gateway node of a cluster.
    pub gateways: Arc<dyn Gateways>,
    /// Who belongs to each conversation, cached and kept correct by sequenced membership
    /// events.
    pub membership: Arc<MembershipCache>,
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
}
