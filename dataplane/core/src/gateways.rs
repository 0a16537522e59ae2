//! The delivery seam: how the roles that hold no connections (fanout, chat for typing,
//! receipts, device unlinks, the notifier's presence check) reach connected devices. Whoever
//! holds the connections implements [`Gateways`]: in one process, the gateway's route registry
//! (`courier_gateway::Routes`).
//!
//! No call waits on a connection: a delivery to a connection whose queue is full is dropped,
//! and what that means is the caller's to decide from the outcome (an event is read again from
//! the store by the connection itself; a receipt is held and offered again; typing is lost).
//! In a cluster a delivery waits for the gateways to take it (one call per gateway), so that
//! fanout clears its outbox only once the events are on their way.

use crate::membership::Members;
use courier_proto::{Event, ServerFrame};
use courier_store::StoreError;
use std::collections::HashMap;
use std::sync::Arc;

/// A delivery that did not reach every gateway holding its recipients: hand it again.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("reading the recipients' routes failed: {0}")]
    Store(#[from] StoreError),
    #[error("gateway node {gateway} did not take a delivery: {reason}")]
    Gateway { gateway: String, reason: String },
}

/// The connected devices, as the roles without connections see them.
#[async_trait::async_trait]
pub trait Gateways: Send + Sync + 'static {
    /// Hands committed events, each with its recipients, to every connected device of those
    /// recipients, except the device that sent the event (it got `sent`). Returns once every
    /// gateway holding one of those devices took its part (queued it on the connections), or
    /// an error when one could not be reached: the caller hands the batch again (connections
    /// skip what they have). Delivery is at-least-once: a connection with no room reads the
    /// event from the store once it has written what is queued.
    async fn deliver(&self, batch: Vec<(Event, Members)>) -> Result<(), DeliveryError>;

    /// Offers frames that may be lost (typing) or are retried by their sender (receipts), each
    /// to every connected device of its users, only where they leave room for events. A device
    /// takes every frame offered to it in one call, in order and as one delivery, or none: a
    /// flush of 10,000 receipts for one sender is one delivery to it, not 10,000. Returns the
    /// users with connections that took none, and how many such connections each has.
    fn offer<'a>(&self, offers: &[Offer<'a>]) -> Refused<'a>;

    /// An event for `recipients` that this node could not decode (handed by a node of another
    /// version, or damaged in transit), of conversation and seq `at` when those could be read.
    /// It is not skipped silently: each connection of `recipients` reads that conversation
    /// from the store through that seq, after what is queued on it, as it reads the events a
    /// full queue dropped, so the conversation's order holds and nothing is lost. Where `at`
    /// is unknown, the connections are told to `reconnect`: the catch-up of the next one
    /// reads every conversation from the device's cursors.
    fn missed(&self, recipients: &[String], at: Option<(&str, u64)>);

    /// Closes the connections of `user`'s `device`, which was unlinked.
    fn unlinked(&self, user: &str, device: &str);

    /// The devices of `user` connected now.
    async fn connected_devices(&self, user: &str) -> Result<Vec<String>, StoreError>;
}

/// A frame for every connected device of each of `users` ([`Gateways::offer`]).
pub struct Offer<'a> {
    pub users: Vec<&'a str>,
    pub frame: Arc<ServerFrame>,
}

/// The users some of whose connections took no offered frame, with how many connections.
pub type Refused<'a> = HashMap<&'a str, usize>;

/// Gateways with no device connected: for a process that runs no gateway, and for tests of
/// the roles that deliver.
pub struct NoGateways;

#[async_trait::async_trait]
impl Gateways for NoGateways {
    async fn deliver(&self, _batch: Vec<(Event, Members)>) -> Result<(), DeliveryError> {
        Ok(())
    }

    fn offer<'a>(&self, _offers: &[Offer<'a>]) -> Refused<'a> {
        Refused::new()
    }

    fn missed(&self, _recipients: &[String], _at: Option<(&str, u64)>) {}

    fn unlinked(&self, _user: &str, _device: &str) {}

    async fn connected_devices(&self, _user: &str) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
}
